"""The `7b` group: llava_jax and transformers on a randomly initialised llava-v1.5-7b-shaped checkpoint.

    python -m bench.run --only 7b                       # → bench/results/<date>-7b.{json,md}
    python -m bench.run --only 7b --big-rows ours_bf16,hf_bf16 --big-new-tokens 16

Every row is one child process (`bench/child.py big_ours|big_hf`): a 7B model needs ~14 GB, so two never run
at once and the sides cannot alternate repetition by repetition as the small-model group does; the load
average is recorded around every row instead. Per row:
  import   peak RSS while loading (sampled every 2 ms, minus the RSS before loading: the libraries and the
           backend are not the import's), beside the checkpoint's bf16 bytes; ours is `load_pretrained(dtype=
           'bfloat16')` (+ weight-only quantization for the int8 / 4-bit rows), theirs `from_pretrained(dtype=
           torch.bfloat16)` (+ torch's dynamic int8 Linear, `quantize_dynamic`'s module, for every nn.Linear in
           `torch_int8`, float32 activations: its quantized Linear takes float32 only).
  warm-up  ours: one `generate` of 2 tokens on the measured prompt (compiles the prefill and the decode step,
           which `max_new_tokens` ≤ 16 share); theirs: 2 tokens on a short text-only prompt (kernel set-up).
  timed    one greedy generate of N new tokens (no stop ids) on 1 image (336 px) + 32 text tokens, with a time
           stamp per token (ours: `stream_callback` with `steps_per_chunk=1`; theirs: a `BaseStreamer`):
           time to first token = first stamp − start; decode step = (last − first stamp) / (N − 1).
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from bench import big_ckpt, common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("ours_bf16", "hf_bf16", "torch_int8", "ours_int8", "ours_int4", "ours_nf4")
KERNELS = "kernels"  # not a model row: the matmul ceilings of bench/big_kernels.py, one process per side
OURS_QUANT = {"ours_bf16": None, "ours_int8": "int8", "ours_int4": "int4", "ours_nf4": "nf4"}
# (row, reference row): the reference each of our rows is compared with. transformers has no CPU 4-bit path
# (bitsandbytes' 4-bit needs CUDA), so the 4-bit rows are compared with transformers bf16.
PAIRS = {"ours_bf16": "hf_bf16", "ours_int8": "torch_int8", "ours_int4": "hf_bf16", "ours_nf4": "hf_bf16"}
# fraction of the bf16 checkpoint a row holds at its peak: bf16 params; int8 / 4-bit decoder kernels (+ the
# bf16 vision tower, embeddings, lm_head, one float leaf being quantized); transformers' bf16 model
NEED = {"ours_bf16": 1.0, "ours_int8": 0.6, "ours_int4": 0.4, "ours_nf4": 0.4, "hf_bf16": 1.0, "torch_int8": 1.0}
TARGET_IMPORT = 1.3      # our import peak RSS / bf16 param bytes ≤ 1.3
TARGET_INT8 = 1.8        # our int8 decode tokens/s ≥ 1.8 × our bf16
TARGET_VS_HF = 1.5       # ours ≥ 1.5 × the reference at every row


def prompt(s: big_ckpt.BigShapes, text: int = 32, seed: int = 0) -> Dict[str, np.ndarray]:
  """[1, 1 + text + K] ids: BOS, 2/3 of the text, K image placeholders, the rest; pixels [1, S, S, 3]."""
  rng = np.random.default_rng(seed)
  words = rng.integers(3, min(s.image_token, 29000), size=text).astype(np.int32)
  pre = (2 * text) // 3
  ids = np.concatenate([[1], words[:pre], np.full(s.num_patches, s.image_token, np.int32), words[pre:]])
  ids = ids.astype(np.int32)[None]
  pixels = rng.standard_normal((1, s.image_size, s.image_size, 3)).astype(np.float32)
  return dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=pixels)


def _timings(t0: float, stamps: List[float], n: int) -> dict:
  if len(stamps) != n:
    raise RuntimeError(f"expected {n} token time stamps, got {len(stamps)}")
  return dict(ttft_s=stamps[0] - t0, total_s=stamps[-1] - t0,
              decode_step_s=(stamps[-1] - stamps[0]) / (n - 1) if n > 1 else None)


def _param_bytes(ckpt_dir: str) -> int:
  with open(os.path.join(ckpt_dir, big_ckpt.INDEX)) as f:
    return int(json.load(f)["metadata"]["total_size"])


def _memory(sampler, status: dict) -> dict:
  return dict(baseline_rss=sampler.baseline, import_peak_rss=sampler.max_rss,
              import_peak_delta=sampler.max_rss - sampler.baseline, import_peak_anon=sampler.max_anon,
              after_import=status)


def measure_ours(a: dict) -> dict:
  import jax
  from bench.memory import _Sampler
  from llava_jax.infer.generate import compile_counts, generate
  s = big_ckpt.SHAPES[a["shapes"]]
  n = int(a["new_tokens"])
  quant = OURS_QUANT[a["row"]]
  _first_to_die()
  jax.devices()  # backend start-up belongs to the baseline, not to the import
  t0 = time.perf_counter()
  with _Sampler() as sampler:
    config, params = load_ours(a["ckpt_dir"], quant)
    jax.block_until_ready(params)
  load_s = time.perf_counter() - t0
  out = dict(row=a["row"], quantize=quant, load_s=load_s, ckpt_bytes=_param_bytes(a["ckpt_dir"]),
             param_bytes=int(sum(x.nbytes for x in jax.tree.leaves(params))),
             **_memory(sampler, common.proc_status()))
  common.write_json(partial_path(a), out)  # survives the process being killed (out of memory) while generating
  inputs = prompt(s, a["prompt_text"])

  def run(k: int, stamps=None):
    return generate(config, params, input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                    max_new_tokens=k, stop_token_ids=(), steps_per_chunk=1 if stamps is not None else None,
                    stream_callback=None if stamps is None else (lambda e: stamps.append(time.perf_counter())))

  try:  # the import numbers above stand even when generating fails (e.g. XLA asks for more memory than exists)
    out["warmup_s"], _ = common.clock(lambda: run(2))
    compiles = compile_counts()
    stamps: List[float] = []
    t0 = time.perf_counter()
    res = run(n, stamps)
  except Exception as e:  # noqa: BLE001 — reported in the row, not raised: the other rows still run
    out.update(error=f"{type(e).__name__}: {str(e)[:500]}", peak_rss=common.proc_status().get("VmHWM"))
    return out
  out.update(_timings(t0, stamps, n), tokens=[int(t) for t in res.token_ids[0]],
             recompiled=compile_counts() != compiles, peak_rss=common.proc_status().get("VmHWM"))
  return out


def partial_path(a: dict) -> str:
  """Where a row leaves its import numbers before generating (read back if the row's process is killed)."""
  return os.path.join(a["workdir"], f"{a['row']}.partial.json")


def _first_to_die() -> None:
  """Make this process the kernel OOM killer's first choice (a 7B row must not take another job down)."""
  try:
    with open("/proc/self/oom_score_adj", "w") as f:
      f.write("1000")
  except OSError:
    pass


def load_ours(ckpt_dir: str, quant):
  """(config, params) in bfloat16, weight-only quantized when `quant` is 'int8' | 'int4' | 'nf4'."""
  from llava_jax.checkpoints.hf import load_pretrained
  if quant is None:
    return load_pretrained(ckpt_dir, dtype="bfloat16")
  from llava_jax.config import RuntimeOptions
  return load_pretrained(ckpt_dir, dtype="bfloat16", runtime=RuntimeOptions(dtype="bfloat16", param_dtype="bfloat16",
                                                                           quantize=quant))


def dynamic_int8_linear(linear):
  """torch's dynamic int8 Linear (what `quantize_dynamic` puts in place of an nn.Linear: int8 weight, per-tensor
  scale, float32 activations) made from a float32 copy of `linear`'s weights, which is dropped on return."""
  import torch
  from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
  from torch.ao.quantization import default_dynamic_qconfig
  f32 = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
  with torch.no_grad():
    f32.weight = torch.nn.Parameter(linear.weight.detach().float(), requires_grad=False)
    if linear.bias is not None:
      f32.bias = torch.nn.Parameter(linear.bias.detach().float(), requires_grad=False)
  f32.qconfig = default_dynamic_qconfig
  return DynamicLinear.from_float(f32)


def quantize_torch_int8(model) -> None:
  """torch's dynamic int8 quantization of every nn.Linear: one Linear at a time is copied to float32, quantized
  and swapped in (`dynamic_int8_linear`), so besides the bf16 model only one Linear's float32 weight exists
  (converting a whole decoder layer at a time, as `quantize_dynamic` on the layer needs, was killed by the OOM
  killer at 7B: its anonymous memory passed 17 GB)."""
  import torch
  for parent in list(model.modules()):
    for name, child in list(parent.named_children()):
      if type(child) is torch.nn.Linear:
        setattr(parent, name, dynamic_int8_linear(child))
  model.float()  # embeddings, norms, the vision tower's convolution: float32 (the quantized Linear wants it)


def measure_hf(a: dict) -> dict:
  import torch
  import transformers
  from transformers.generation.streamers import BaseStreamer
  from bench import torch_side
  from bench.memory import _Sampler
  s = big_ckpt.SHAPES[a["shapes"]]
  n = int(a["new_tokens"])
  facts = torch_side.set_threads(int(a["threads"]))
  _first_to_die()
  t0 = time.perf_counter()
  with _Sampler() as sampler:
    model = transformers.LlavaForConditionalGeneration.from_pretrained(a["ckpt_dir"], dtype=torch.bfloat16).eval()
  load_s = time.perf_counter() - t0
  out = dict(row=a["row"], load_s=load_s, ckpt_bytes=_param_bytes(a["ckpt_dir"]), torch=facts,
             transformers=transformers.__version__, **_memory(sampler, common.proc_status()))
  if a["row"] == "torch_int8":
    t0 = time.perf_counter()
    with _Sampler() as qs:
      quantize_torch_int8(model)
    out.update(quantize_s=time.perf_counter() - t0, quantize_peak_rss=qs.max_rss)
  out["param_bytes"] = int(sum(x.numel() * x.element_size() for x in model.parameters())
                           + sum(_packed_bytes(m) for m in model.modules()))
  common.write_json(partial_path(a), out)
  model.generation_config.eos_token_id = None  # exactly N tokens
  model.generation_config.pad_token_id = 0
  inputs = prompt(s, a["prompt_text"])
  tensors = dict(input_ids=torch.from_numpy(inputs["input_ids"]).long(),
                 attention_mask=torch.from_numpy(inputs["attention_mask"]).long(),
                 pixel_values=torch.from_numpy(inputs["pixel_values"]).permute(0, 3, 1, 2).contiguous())

  class Stamps(BaseStreamer):
    def __init__(self):
      self.t: List[float] = []

    def put(self, value):
      self.t.append(time.perf_counter())

    def end(self):
      pass

  def run(k: int, streamer=None, **kw):
    with torch.inference_mode():
      return model.generate(**kw, max_new_tokens=k, do_sample=False, num_beams=1, use_cache=True, streamer=streamer)

  short = tensors["input_ids"][:, :9]
  out["warmup_s"], _ = common.clock(lambda: run(2, input_ids=short, attention_mask=torch.ones_like(short)))
  st = Stamps()
  t0 = time.perf_counter()
  res = run(n, st, **tensors)
  out.update(_timings(t0, st.t[1:], n), tokens=res[0, tensors["input_ids"].shape[1]:].tolist(),
             peak_rss=common.proc_status().get("VmHWM"))  # st.t[0] is the prompt, put before the prefill
  return out


def _packed_bytes(module) -> int:
  """Bytes of a dynamically quantized Linear's packed int8 weight (not a Parameter)."""
  try:
    w = module.weight()
  except Exception:
    return 0
  return int(w.numel() * w.element_size()) if hasattr(w, "numel") else 0


# ---------------------------------------------------------------------------------------------------------
# The group: rows one after another, then the report


def mem_available() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return 0


def run_group(a, run_child: Callable, workdir: str, env, cpus, previous: Optional[Dict[str, dict]] = None,
              on_row: Optional[Callable[[dict], None]] = None) -> dict:
  """Generate / reuse the checkpoint, run each requested row in its own child (rows of `previous`, an earlier
  run's raw results, are kept unless re-run), return the report doc with the raw results under 'results'.
  `on_row(doc)` gets the report so far after every row (so an interrupted run keeps what it measured)."""
  s = big_ckpt.SHAPES[a.big_shapes]
  rows = [r.strip() for r in a.big_rows.split(",") if r.strip()]
  bad = set(rows) - set(ROWS) - {KERNELS}
  if bad:
    raise SystemExit(f"--big-rows: unknown rows {sorted(bad)}; choose from {', '.join(ROWS + (KERNELS,))}")
  base = dict(shapes=s.name, ckpt_dir=a.big_dir, threads=a.threads, new_tokens=a.big_new_tokens,
              prompt_text=a.big_prompt_text)
  from bench import big_report  # imported now: the report code is the one this run started with
  gen = run_child("big_gen", base, workdir, env, cpus, a.timeout)
  ckpt_bytes = gen["result"]["total_bytes"]
  results, skipped, loads = dict(previous or {}), {}, [gen["loadavg_before"], gen["loadavg_after"]]
  if KERNELS in rows:  # both sides under the run's allocator, and ours under the system malloc as well
    runs = {side: run_child(f"big_kernels_{side}", base, workdir, env, cpus, a.timeout) for side in ("jax", "torch")}
    if common.allocator_of(env) != "system malloc":
      runs["jax_system_malloc"] = run_child("big_kernels_jax", base, workdir, common.thread_env(a.threads, "system"),
                                            cpus, a.timeout)
    results[KERNELS] = dict(git=common.git_state(REPO), allocator=common.allocator_of(env),
                            **{name: o["result"] for name, o in runs.items()},
                            loadavg=[x for o in runs.values() for x in (o["loadavg_before"], o["loadavg_after"])])
    loads += results[KERNELS]["loadavg"]
  for row in (r for r in rows if r != KERNELS):
    results.pop(row, None)
    need = int(NEED[row] * ckpt_bytes) + 2 ** 29  # what the row holds at its peak + runtime
    deadline = time.time() + a.big_wait
    while mem_available() < need and time.time() < deadline:  # other jobs on the machine may finish
      time.sleep(15)
    if mem_available() < need:
      skipped[row] = f"needs ~{need / 2 ** 30:.1f} GiB, {mem_available() / 2 ** 30:.1f} GiB available"
      print(f"[bench] skip {row}: {skipped[row]}", flush=True)
      continue
    task = "big_hf" if row in ("hf_bf16", "torch_int8") else "big_ours"
    git, load_before, t0 = common.git_state(REPO), common.loadavg(), time.time()
    args = dict(base, row=row, workdir=workdir)
    try:
      out = run_child(task, args, workdir, env, cpus, a.timeout)
    except Exception as e:  # one failed row (e.g. out of memory) is reported, the others still run
      print(f"[bench] {row} failed: {e}", flush=True)
      why = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
      if "exit -9" in why:
        why += " — SIGKILL: the kernel's OOM killer (the row's process asks to be its first choice)"
      if not os.path.exists(partial_path(args)):
        skipped[row] = f"failed before its import finished: {why}"
        continue
      with open(partial_path(args)) as f:
        out = dict(result=dict(json.load(f), error=f"killed after loading: {why}"), loadavg_before=load_before,
                   loadavg_after=common.loadavg(), wall_s=time.time() - t0, facts={})
    results[row] = dict(out["result"], loadavg_before=out["loadavg_before"], loadavg_after=out["loadavg_after"],
                        wall_s=out["wall_s"], facts=out["facts"], git=git)
    loads += [out["loadavg_before"], out["loadavg_after"]]
    if on_row is not None:
      on_row(dict(big_report.build(s, gen["result"], results, skipped, loads), results=results))
  return dict(big_report.build(s, gen["result"], results, skipped, loads), results=results)
