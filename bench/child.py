"""Benchmark processes started by bench/run.py, all with the same thread environment and CPU affinity.

    python -m bench.child TASK ARGS_JSON OUT_JSON    one-shot task (prepare, data, ckpt_*, big_*): result → OUT_JSON
    python -m bench.child serve SIDE ARGS_JSON       a side ('jax' | 'torch') that loads the model once, then
                                                     answers commands read from stdin, one JSON per line:
        {"cmd": "list"} | {"cmd": "warmup", "bench": B, "n": k} | {"cmd": "rep", "bench": B}
        | {"cmd": "info", "bench": B} | {"cmd": "quit"}
      with one line `@@BENCH@@ <json>` on stdout per command (other output, e.g. library warnings, is ignored).

jax and torch never share a process (their thread pools would spin against each other), and the orchestrator
alternates the two servers repetition by repetition, so both sides see the same machine load.
"""
from __future__ import annotations

import json
import os
import sys
import time

from bench import common


def _task(name: str, a: dict):
  if name.startswith("big_"):  # the 7B-shaped group (bench/big.py)
    from bench import big, big_ckpt
    if name == "big_gen":
      return big_ckpt.ensure_checkpoint(big_ckpt.SHAPES[a["shapes"]], a["ckpt_dir"])
    if name.startswith("big_kernels_"):
      from bench import big_kernels
      return big_kernels.measure_jax(a) if name == "big_kernels_jax" else big_kernels.measure_torch(a)
    return big.measure_ours(a) if name == "big_ours" else big.measure_hf(a)
  p = common.PRESETS[a["preset"]]
  threads = int(a["threads"])
  if name == "prepare":
    from bench import data_bench, torch_side
    torch_facts = torch_side.set_threads(threads)
    info = torch_side.save_model(p, a["model_dir"])
    data_bench.make_tokenizer(p, a["tokenizer_dir"])
    out = dict(info, facts=torch_facts)
    if a.get("make_ckpt"):
      from bench import memory
      out["ckpt"] = memory.generate_checkpoint(p, a["ckpt_dir"])
    return out
  if name == "data":
    from bench import data_bench, torch_side
    torch_side.set_threads(threads)
    return dict(ours=data_bench.run_ours(p, a["tokenizer_dir"], p.data_workers),
                torch=data_bench.run_torch(p, a["tokenizer_dir"], p.data_workers))
  if name == "ckpt_ours":
    from bench import memory
    return memory.measure_ours(a["ckpt_dir"])
  if name == "ckpt_hf":
    from bench import memory
    return memory.measure_hf(a["ckpt_dir"], threads)
  raise ValueError(f"unknown task {name!r}")


MARK = "@@BENCH@@ "


def _emit(obj) -> None:
  sys.stdout.write(MARK + json.dumps(obj, default=common._json_default) + "\n")
  sys.stdout.flush()


def serve(side: str, args_path: str) -> int:
  import traceback
  with open(args_path) as f:
    a = json.load(f)
  p = common.PRESETS[a["preset"]]
  if side == "jax":
    from bench import jax_side as mod
  elif side == "torch":
    from bench import torch_side as mod
  else:
    raise ValueError(f"unknown side {side!r}")
  try:
    facts, benches = mod.make_benches(p, a)
    _emit({"ready": True, "facts": dict(facts, **common.child_facts()), "benches": list(benches)})
    for line in sys.stdin:
      cmd = json.loads(line)
      if cmd["cmd"] == "quit":
        _emit({"bye": True})
        return 0
      bench = benches[cmd["bench"]]
      if cmd["cmd"] == "warmup":
        _emit({"reps": [bench.run() for _ in range(int(cmd.get("n", 1)))]})
      elif cmd["cmd"] == "rep":
        _emit({"rep": bench.run(), "loadavg": common.loadavg()})
      elif cmd["cmd"] == "info":
        _emit({"info": bench.info()})
      else:
        raise ValueError(f"unknown command {cmd!r}")
  except Exception:
    _emit({"error": traceback.format_exc()})
    return 1
  return 0


def main(argv) -> int:
  if len(argv) == 3 and argv[0] == "serve":
    return serve(argv[1], argv[2])
  if len(argv) != 3:
    print(__doc__, file=sys.stderr)
    return 2
  name, args_path, out_path = argv
  with open(args_path) as f:
    a = json.load(f)
  t0 = time.perf_counter()
  load_before = common.loadavg()
  result = _task(name, a)
  common.write_json(out_path, dict(task=name, result=result, facts=common.child_facts(),
                                   loadavg_before=load_before, loadavg_after=common.loadavg(),
                                   wall_s=time.perf_counter() - t0))
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main(sys.argv[1:]))
