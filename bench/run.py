"""Run every benchmark, llava_jax beside transformers' PyTorch LLaVA, and write the report.

    python -m bench.run                      # the full report: bench/results/<date>.{json,md,png}
    python -m bench.run --preset quick --out-dir /tmp/b     # seconds-long smoke run (tests/test_bench.py)
    python -m bench.run --update-readme      # also put the table into README.md between the bench markers

Each task runs in a child process of this one (`bench/child.py`) with the same environment: N threads for
torch / OpenMP / MKL / OpenBLAS, CPU affinity to N cores (which sizes XLA's CPU thread pool), one jax CPU
device, and OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE removed. The load average is recorded before and after
every task: the numbers are only as good as the machine was quiet.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from bench import common, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "@@BENCH@@ "
SIDES = ("jax", "torch")
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
README7B_START = "<!-- bench7b:start -->"
README7B_END = "<!-- bench7b:end -->"


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", choices=sorted(common.PRESETS), default="full")
  ap.add_argument("--allocator", choices=["tcmalloc", "system"], default="tcmalloc",
                  help="malloc of every child, both sides (llava_jax/allocator.py): tcmalloc when installed, as "
                       "`python -m llava_jax.main` runs, or the system's")
  ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                  help="threads for both frameworks (default: all CPUs this process may use)")
  ap.add_argument("--out-dir", default=os.path.join(REPO, "bench", "results"))
  ap.add_argument("--workdir", default=None, help="scratch directory (default: a new temp dir, removed after)")
  ap.add_argument("--date", default=None, help="report name (default: today, YYYY-MM-DD)")
  ap.add_argument("--only", default=None,
                  help="comma-separated groups to run: model (jax+torch), data, ckpt (default: those three); "
                       "7b (llava-v1.5-7b shapes, ~1 h: only when named)")
  ap.add_argument("--runtime", default="{}", help="JSON RuntimeOptions for llava_jax, e.g. '{\"scan_layers\": false}'")
  ap.add_argument("--update-readme", action="store_true", help="replace the table between the README markers")
  ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per task")
  ap.add_argument("--big-dir", default="/tmp/llava7b-bench",
                  help="7b group: checkpoint directory (generated once, ~14 GB; reused when its index validates)")
  ap.add_argument("--big-shapes", default="7b", choices=["7b", "tiny"], help="7b group: shapes (tiny = smoke test)")
  ap.add_argument("--big-rows", default="ours_bf16,hf_bf16,torch_int8,ours_int8,ours_int4",
                  help="7b group: rows to run, in order (ours_bf16, hf_bf16, torch_int8, ours_int8, ours_int4, "
                       "ours_nf4; kernels = the matmul ceilings of bench/big_kernels.py, run first)")
  ap.add_argument("--big-new-tokens", type=int, default=16, help="7b group: greedy tokens decoded per row")
  ap.add_argument("--big-prompt-text", type=int, default=32, help="7b group: text tokens besides the image")
  ap.add_argument("--big-wait", type=float, default=600.0,
                  help="7b group: seconds to wait for enough free memory before skipping a row")
  ap.add_argument("--big-append", action="store_true",
                  help="7b group: keep the rows of an existing <date>-7b.json that this run does not re-run")
  return ap.parse_args(argv)


def _groups(only: Optional[str]) -> List[str]:
  groups = ["model", "data", "ckpt"] if not only else [g.strip() for g in only.split(",") if g.strip()]
  bad = set(groups) - {"model", "data", "ckpt", "7b"}
  if bad:
    raise SystemExit(f"--only: unknown groups {sorted(bad)}; choose from model, data, ckpt, 7b")
  return groups


def run_child(task: str, args: dict, workdir: str, env: Dict[str, str], cpus: List[int], timeout: float) -> dict:
  """Run one task in a child process; returns its output dict (raises with the child's stderr on failure)."""
  args_path = os.path.join(workdir, f"{task}.args.json")
  out_path = os.path.join(workdir, f"{task}.out.json")
  common.write_json(args_path, args)
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "bench.child", task, args_path, out_path], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout,
                        preexec_fn=lambda: os.sched_setaffinity(0, cpus))
  if proc.returncode != 0:
    raise RuntimeError(f"benchmark task {task!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
  with open(out_path) as f:
    out = json.load(f)
  print(f"[bench] {task:10s} {time.perf_counter() - t0:7.1f} s   load {out['loadavg_before'][0]:.2f} → "
        f"{out['loadavg_after'][0]:.2f}", flush=True)
  return out


class Server:
  """A `bench.child serve SIDE` process: loads its model once, then runs benchmark commands one at a time."""

  def __init__(self, side: str, args_path: str, workdir: str, env: Dict[str, str], cpus: List[int]):
    self.side = side
    self.log_path = os.path.join(workdir, f"{side}.server.log")
    self._log = open(self.log_path, "w")
    self.proc = subprocess.Popen([sys.executable, "-m", "bench.child", "serve", side, args_path], cwd=REPO, env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                 preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    self.facts, self.benches = None, None

  def wait_ready(self) -> "Server":
    ready = self._read()
    self.facts, self.benches = ready["facts"], ready["benches"]
    return self

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(MARK):
        obj = json.loads(line[len(MARK):])
        if "error" in obj:
          raise RuntimeError(f"{self.side} benchmark server failed:\n{obj['error']}")
        return obj
    code = self.proc.wait()
    with open(self.log_path) as f:
      tail = f.read()[-4000:]
    raise RuntimeError(f"{self.side} benchmark server exited with code {code}:\n{tail}")

  def call(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.call(cmd="quit")
        self.proc.wait(timeout=60)
      except Exception:
        self.proc.kill()
        self.proc.wait()
    self._log.close()


def _reps_for(p: common.Preset, name: str) -> int:
  if name == "train":
    return p.train_reps
  if name.startswith("decode"):
    return max(2, p.reps // 2)
  return p.reps


def run_model_group(p: common.Preset, args_path: str, workdir: str, env, cpus, loads: list) -> dict:
  """Both sides as servers; for each benchmark: warm-up on each side, then repetitions alternating between the
  sides (the first side alternating too), so slow drifts of the machine's load hit both alike."""
  servers: Dict[str, Server] = {}
  try:
    for side in SIDES:  # both start (import, load, convert) at once; nothing is timed before both are ready
      servers[side] = Server(side, args_path, workdir, env, cpus)
    for side in SIDES:
      servers[side].wait_ready()
    names = list(servers["jax"].benches) + [b for b in servers["torch"].benches if b not in servers["jax"].benches]
    out = {side: dict(facts=servers[side].facts, benches={}) for side in SIDES}
    for name in names:
      t0 = time.perf_counter()
      sides = [s for s in SIDES if name in servers[s].benches]
      warm = {s: servers[s].call(cmd="warmup", bench=name, n=p.warmup)["reps"] for s in sides}
      reps: Dict[str, list] = {s: [] for s in sides}
      for r in range(_reps_for(p, name)):
        for s in (sides if r % 2 == 0 else sides[::-1]):
          answer = servers[s].call(cmd="rep", bench=name)
          reps[s].append(answer["rep"])
          loads.append(answer["loadavg"])
      for s in sides:
        out[s]["benches"][name] = dict(summary=common.summarize(reps[s]), reps=reps[s], warmup=warm[s],
                                       info=servers[s].call(cmd="info", bench=name)["info"])
      print(f"[bench] {name:16s} {time.perf_counter() - t0:7.1f} s   load {loads[-1][0]:.2f}", flush=True)
    return out
  finally:
    for server in servers.values():
      server.close()


def _ckpt_bytes(p: common.Preset) -> int:
  d, f, layers, v = p.ckpt_t_hidden, p.ckpt_t_mlp, p.ckpt_t_layers, p.vocab
  vd, vf, vl = p.ckpt_v_hidden, p.ckpt_v_mlp, p.ckpt_v_layers
  text = layers * (4 * d * d + 3 * d * f) + 2 * v * d
  vision = vl * (4 * vd * vd + 2 * vd * vf)
  return 4 * (text + vision + vd * d + d * d)


def run(argv=None) -> dict:
  a = parse_args(argv)
  p = common.PRESETS[a.preset]
  groups = _groups(a.only)
  date = a.date or datetime.date.today().isoformat()
  cpus = sorted(os.sched_getaffinity(0))[:a.threads]
  if len(cpus) < a.threads:
    raise SystemExit(f"--threads {a.threads}: only {len(cpus)} CPUs are available to this process")
  env = common.thread_env(a.threads, a.allocator)
  if "7b" in groups:
    doc7 = run_big(a, date, cpus, env)
    groups = [g for g in groups if g != "7b"]
    if not groups:
      return doc7
  own_workdir = a.workdir is None
  workdir = a.workdir or tempfile.mkdtemp(prefix="llava_bench_")
  os.makedirs(workdir, exist_ok=True)
  os.makedirs(a.out_dir, exist_ok=True)
  shared = dict(preset=p.name, threads=a.threads, model_dir=os.path.join(workdir, "model"),
                tokenizer_dir=os.path.join(workdir, "tokenizer"), ckpt_dir=os.path.join(workdir, "ckpt"),
                runtime=json.loads(a.runtime))
  outputs: Dict[str, dict] = {}
  model = None
  skipped: Dict[str, str] = {}
  loads = [common.loadavg()]
  try:
    if "ckpt" in groups:
      need = 2 * _ckpt_bytes(p)
      free = shutil.disk_usage(workdir).free
      if free < need:
        skipped["ckpt"] = f"needs {need / 2 ** 30:.1f} GiB free in {workdir}, has {free / 2 ** 30:.1f} GiB"
      shared["make_ckpt"] = "ckpt" not in skipped
    outputs["prepare"] = run_child("prepare", shared, workdir, env, cpus, a.timeout)
    if shared.get("make_ckpt"):
      outputs["ckpt_gen"] = dict(outputs["prepare"], result=outputs["prepare"]["result"].pop("ckpt"))
    if "model" in groups:
      args_path = os.path.join(workdir, "serve.args.json")
      common.write_json(args_path, shared)
      model = run_model_group(p, args_path, workdir, env, cpus, loads)
    tasks = []
    if "data" in groups:
      tasks.append("data")
    if shared.get("make_ckpt"):
      # transformers' loader is only informative (it memory-maps: no comparable number); not in quick runs
      tasks += ["ckpt_ours"] + (["ckpt_hf"] if p.name != "quick" else [])
    for task in tasks:
      outputs[task] = run_child(task, shared, workdir, env, cpus, a.timeout)
      loads += [outputs[task]["loadavg_before"], outputs[task]["loadavg_after"]]
    shutil.rmtree(shared["ckpt_dir"], ignore_errors=True)
    if "data" in outputs:  # one process ran both pipelines, one after the other
      data = outputs.pop("data")
      for side in ("ours", "torch"):
        outputs[f"data_{side}"] = dict(data, result=data["result"][side])
  finally:
    if own_workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  results = {k: v["result"] for k, v in outputs.items()}
  if model is not None:
    results.update(model)
  rep = report.build(results, p)
  one_minute = [x[0] for x in loads]
  meta = dict(date=date, preset=p.name, threads=a.threads, affinity=cpus, machine=common.machine_facts(),
              allocator=common.allocator_of(env),
              git=common.git_state(REPO),
              load_summary=f"{min(one_minute):.2f}–{max(one_minute):.2f} (1-min, sampled around each task)",
              loadavg_samples=loads, runtime=shared["runtime"], skipped=skipped,
              child_facts=dict({k: v["facts"] for k, v in outputs.items()},
                               **({s: model[s]["facts"] for s in SIDES} if model else {})),
              task_wall_s={k: v["wall_s"] for k, v in outputs.items()})
  doc = dict(meta=meta, preset=p.to_dict(), report=rep, raw=results)
  base = os.path.join(a.out_dir, date)
  common.write_json(base + ".json", doc)
  md = report.markdown(rep, meta)
  if skipped:
    md += "".join(f"- skipped {k}: {v}\n" for k, v in skipped.items())
  with open(base + ".md", "w") as f:
    f.write(md)
  if rep["rows"]:
    report.chart(rep, meta, base + ".png")
  if a.update_readme:
    update_readme(os.path.join(REPO, "README.md"), md, os.path.relpath(base, REPO))
  print(md)
  return doc


def run_big(a, date: str, cpus: List[int], env: Dict[str, str]) -> dict:
  """The 7b group (bench/big.py): its own report, bench/results/<date>-7b.{json,md}."""
  from bench import big, big_ckpt, big_report
  base = os.path.join(a.out_dir, f"{date}-7b")
  previous = None
  if a.big_append and os.path.exists(base + ".json"):  # keep the rows measured earlier (each has its commit)
    with open(base + ".json") as f:
      old = json.load(f)
    if old["meta"].get("shapes") == a.big_shapes and old["meta"].get("new_tokens") == a.big_new_tokens:
      previous = old["raw"]
    else:
      raise SystemExit(f"--big-append: {base}.json was measured with other shapes / new tokens")
  meta = dict(date=date, threads=a.threads, affinity=cpus, machine=common.machine_facts(), git=common.git_state(REPO),
              allocator=common.allocator_of(env),
              new_tokens=a.big_new_tokens, prompt_text=a.big_prompt_text, shapes=a.big_shapes,
              image_size=big_ckpt.SHAPES[a.big_shapes].image_size,
              image_tokens=big_ckpt.SHAPES[a.big_shapes].num_patches)
  os.makedirs(a.out_dir, exist_ok=True)

  def write(doc: dict) -> str:
    rep = dict(doc)
    results = rep.pop("results")
    common.write_json(base + ".json", dict(meta=meta, report=rep, raw=results))
    md = big_report.markdown(rep, meta, results)
    with open(base + ".md", "w") as f:
      f.write(md)
    return md

  workdir = tempfile.mkdtemp(prefix="llava_bench7b_")
  try:
    doc = big.run_group(a, run_child, workdir, env, cpus, previous, on_row=write)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  md = write(doc)
  results = doc.pop("results")
  rep = doc
  if a.update_readme:
    for path in (os.path.join(REPO, "README.md"), os.path.join(REPO, "bench", "README.md")):
      update_readme(path, md, os.path.relpath(base, os.path.dirname(path)), start=README7B_START, end=README7B_END,
                    chart=False)
  print(md)
  return dict(meta=meta, report=rep, raw=results)


def update_readme(path: str, md: str, base_rel: str, start: str = README_START, end: str = README_END,
                  chart: bool = True) -> None:
  """Replace the text between the bench markers of README.md with the latest table (markers must exist)."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if start not in text or end not in text:
    raise SystemExit(f"{path} has no {start} … {end} markers")
  body = md.split("\n", 2)[2] if md.startswith("###") else md  # drop the title line: the README has its own
  link = f"Latest run: [`{base_rel}.md`]({base_rel}.md)" + (
      f", chart [`{base_rel}.png`]({base_rel}.png)." if chart else ".")
  block = f"{start}\n{link}\n\n{body.strip()}\n{end}"
  text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


if __name__ == "__main__":
  run()
