"""Serving memory: the real generate prefill and decode steps (`infer/generate.py`), compiled ahead of time.

`compile_generate` lowers `generate._prefill` and `generate._decode` — the jitted functions `generate()` calls —
on abstract inputs laid out as `generate()` lays them out (params by the logical axis rules, rows over
data × fsdp, the rest replicated; decode takes prefill's output state), so `memory_analysis()` is the serving
footprint per device: params, the KV cache (k, v [L, B, Hkv, S, hd] in the compute dtype), the decode state and
the compiler's temporaries. `plan_serving` measures that at 1 and `probe_rows` rows per device (2; a larger probe
skips the small-batch overheads that make 1 → 2 rows steeper than the rest), fits bytes = fixed + rows × per-row,
and reports the most rows per device that fit a context (prompt + new tokens) in the chip's budget,
then compiles the estimate to check it (a few rounds of secant search between the largest batch that fits and the
smallest that does not: temporaries are not exactly linear in the batch).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, List, Optional, Sequence

from llava_jax.scale.hardware import GIB


def _size(x: float) -> str:
  """Bytes as GiB (MiB / KiB when small)."""
  for unit, name in ((GIB, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
    if x >= unit:
      return f"{x / unit:.3g} {name}" if x < 100 * unit else f"{x / unit:,.0f} {name}"
  return f"{x:.0f} B"


def kv_bytes_per_token(model_config) -> int:
  """KV-cache bytes per token of context (all layers, k and v; compute dtype): 2 · L · Hkv · hd · itemsize."""
  import numpy as np
  t = model_config.text
  return 2 * t.num_hidden_layers * t.num_key_value_heads * t.resolved_head_dim * np.dtype(
      model_config.runtime.jnp_dtype).itemsize


@dataclasses.dataclass
class Compiled:
  """One compiled phase and the abstract arguments it was lowered with."""
  compiled: Any
  args: tuple


def compile_generate(model_config, mesh, *, batch: int, prompt_len: int, max_new: int, num_images: int = 1):
  """Compile generate's prefill and decode for `batch` rows (a multiple of data × fsdp) of `prompt_len` prompt
  slots and `max_new` new tokens (cache of prompt_len + max_new slots). → (prefill, decode) `Compiled`s.

  Prefill args: params, input_ids / prompt_mask [B, Tb] int32, pixel_values [N, S, S, 3] float32,
  image_valid [N] bool, row_active [B] bool, seeds [B] uint32, salts [B] int32, temperature / top_p [B]
  float32, top_k [B] int32, stop_ids [4] int32, pad_id () int32. Decode args: params, the prefill's output
  DecodeState (donated), stop_now [B] bool, limit () int32.
  """
  import jax
  import jax.numpy as jnp
  from llava_jax import parallel
  from llava_jax.infer import generate as gen
  from llava_jax.models.llava import sharded_abstract_params

  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch % shards:
    raise ValueError(f"batch {batch} must be a multiple of data × fsdp = {shards}")
  s = model_config.vision.image_size
  row = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape)))
  rep = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.replicated(mesh))
  b, t = int(batch), int(prompt_len)
  params = sharded_abstract_params(model_config, mesh)
  images = (rep((num_images, s, s, model_config.vision.num_channels), jnp.float32), rep((num_images,), jnp.bool_)) \
      if num_images else (None, None)
  prefill_args = (params, row((b, t), jnp.int32), row((b, t), jnp.int32), *images, row((b,), jnp.bool_),
                  row((b,), jnp.uint32), row((b,), jnp.int32), row((b,), jnp.float32), row((b,), jnp.float32),
                  row((b,), jnp.int32), rep((4,), jnp.int32), rep((), jnp.int32))
  with parallel.mesh_context(mesh):
    prefill = gen._prefill.lower(*prefill_args, config=model_config, max_new=int(max_new),
                                 output_scores=False).compile()
    state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                         prefill.out_info, prefill.output_shardings)
    decode_args = (params, state, row((b,), jnp.bool_), rep((), jnp.int32))
    decode = gen._decode.lower(*decode_args, config=model_config).compile()
  return Compiled(prefill, prefill_args), Compiled(decode, decode_args)


@dataclasses.dataclass
class PhaseMemory:
  """Per-device bytes of one compiled phase (see `jax.stages.Compiled.memory_analysis`)."""
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  generated_code: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

  @classmethod
  def of(cls, compiled) -> "PhaseMemory":
    ma = compiled.memory_analysis()
    return cls(int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes), int(ma.alias_size_in_bytes),
               int(ma.temp_size_in_bytes), int(ma.generated_code_size_in_bytes))


@dataclasses.dataclass
class ServeMeasure:
  rows_per_device: int
  prefill: PhaseMemory
  decode: PhaseMemory
  seconds: float

  @property
  def peak(self) -> int:
    return max(self.prefill.total, self.decode.total)


@dataclasses.dataclass
class ServePlan:
  """Serving `context` = prompt + new tokens per row on `num_devices` devices of mesh `mesh`."""
  mesh: tuple
  num_devices: int
  context: int
  prompt_len: int
  max_new: int
  budget_bytes: float
  params_per_device: int         # params as sharded (unpadded)
  kv_per_token: int              # bytes per token of context, whole model
  kv_per_row_per_device: float   # one row's cache on one device (its context; heads split over tensor)
  measures: List[ServeMeasure]
  fixed_bytes: float = 0.0       # fitted: bytes per device with no rows
  per_row_bytes: float = 0.0     # fitted: bytes per device per row on it
  max_rows_per_device: int = 0   # the most rows per device that fit (0: none)
  checked: Optional[ServeMeasure] = None

  def render(self) -> str:
    d, f, t = self.mesh
    lines = [f"Serving ({self.context} tokens of context per row: prompt {self.prompt_len} + {self.max_new} new; "
             f"mesh {d}x{f}x{t}, rows over data×fsdp; budget {_size(self.budget_bytes)} per device):",
             f"  params {_size(self.params_per_device)} per device; KV cache {_size(self.kv_per_token)} per token = "
             f"{_size(self.kv_per_row_per_device)} per row per device",
             "  compiled (generate prefill / decode) per device: "
             + "; ".join(f"{m.rows_per_device} row{'s' if m.rows_per_device > 1 else ''}: {_size(m.prefill.total)} / "
                         f"{_size(m.decode.total)}" for m in self.measures)]
    if self.max_rows_per_device < 1:
      lines.append(f"  one row per device does not fit the budget {_size(self.budget_bytes)}: use more devices or a "
                   "shorter context")
      return "\n".join(lines)
    lines.append(f"  largest batch: {self.max_rows_per_device} rows per device ({self.max_rows_per_device * (d * f)} "
                 f"in all; {_size(self.checked.peak)} per device, compiled), about {_size(self.fixed_bytes)} + "
                 f"{_size(self.per_row_bytes)} per row")
    return "\n".join(lines)


def serve_mesh(num_devices: int) -> tuple:
  """(data, fsdp, tensor) for serving: params sharded over every device (FSDP), rows over them too."""
  return (1, int(num_devices), 1)


def plan_serving(model_config, devices: Sequence[Any], budget_bytes: float, *, context: int = 4096,
                 max_new: int = 512, mesh: Optional[tuple] = None, max_rows: int = 1024,
                 max_checks: int = 6, probe_rows: int = 2, log=None) -> ServePlan:
  """Most rows per device whose prefill and decode fit `budget_bytes` at `context` tokens per row (see module)."""
  from llava_jax import parallel
  from llava_jax.models.llava import sharded_abstract_params
  from llava_jax.scale.memory import _bytes_per_device
  n = len(devices)
  mesh_shape = tuple(mesh) if mesh else serve_mesh(n)
  m = parallel.make_mesh(mesh_shape, devices=list(devices))
  shards = m.shape["data"] * m.shape["fsdp"]
  prompt_len = int(context) - int(max_new)
  if prompt_len < 1:
    raise ValueError(f"context {context} must exceed max_new {max_new}")
  kv = kv_bytes_per_token(model_config)

  def run(rows: int) -> ServeMeasure:
    t0 = time.perf_counter()
    prefill, decode = compile_generate(model_config, m, batch=rows * shards, prompt_len=prompt_len, max_new=max_new)
    out = ServeMeasure(rows, PhaseMemory.of(prefill.compiled), PhaseMemory.of(decode.compiled),
                       time.perf_counter() - t0)
    if log is not None:
      log(f"  [{rows} row{'s' if rows > 1 else ''} per device] prefill {_size(out.prefill.total)}, decode "
          f"{_size(out.decode.total)} ({out.seconds:.0f} s)")
    return out

  params = _bytes_per_device(sharded_abstract_params(model_config, m))
  plan = ServePlan(mesh=mesh_shape, num_devices=n, context=int(context), prompt_len=prompt_len, max_new=int(max_new),
                   budget_bytes=float(budget_bytes), params_per_device=params, kv_per_token=kv,
                   kv_per_row_per_device=kv * context / m.shape["tensor"],
                   measures=[run(1), run(max(2, min(int(probe_rows), int(max_rows))))])
  one, two = plan.measures
  plan.per_row_bytes = max(1.0, float(two.peak - one.peak) / (two.rows_per_device - 1))
  plan.fixed_bytes = float(one.peak) - plan.per_row_bytes
  # search between the largest batch that fits and the smallest that does not: a secant step (through the
  # largest fitting point and the nearest failing / fitting one) alternating with bisection once both are known,
  # which keeps convex (faster than linear) growth from stalling the secant on one side
  for i in range(int(max_checks)):
    fit = [x for x in plan.measures if x.peak <= budget_bytes]
    fail = [x for x in plan.measures if x.peak > budget_bytes]
    lo = max(fit, key=lambda x: x.rows_per_device, default=None)
    hi = min((x.rows_per_device for x in fail), default=None)
    if lo is None or (hi is not None and hi - lo.rows_per_device <= 1) or lo.rows_per_device >= max_rows:
      break
    if hi is not None and i % 2:
      guess = (lo.rows_per_device + hi) // 2
    else:
      other = next((x for x in fail if x.rows_per_device == hi), None) or max(
          (x for x in fit if x is not lo), key=lambda x: x.rows_per_device, default=None)
      slope = plan.per_row_bytes if other is None else (
          (other.peak - lo.peak) / (other.rows_per_device - lo.rows_per_device))
      slope = slope if slope > 0 else plan.per_row_bytes
      guess = lo.rows_per_device + int((budget_bytes - lo.peak) // slope)
    top = int(max_rows) if hi is None else hi - 1
    plan.measures.append(run(max(lo.rows_per_device + 1, min(guess, top))))  # always inside (fits, fails)
  fit = [x for x in plan.measures if x.peak <= budget_bytes]
  plan.checked = max(fit, key=lambda x: x.rows_per_device, default=None)
  plan.max_rows_per_device = plan.checked.rows_per_device if plan.checked else 0
  plan.measures.sort(key=lambda x: x.rows_per_device)
  return plan


# ---------------------------------------------------------------------------------------------------------
# In a child process with the topology's devices (simulated CPU devices need XLA_FLAGS before jax starts)


def _from_dict(d: dict) -> ServePlan:
  measure = lambda m: ServeMeasure(m["rows_per_device"], PhaseMemory(**m["prefill"]), PhaseMemory(**m["decode"]),
                                   m["seconds"])
  d = dict(d, mesh=tuple(d["mesh"]), measures=[measure(m) for m in d["measures"]],
           checked=None if d["checked"] is None else measure(d["checked"]))
  return ServePlan(**d)


def plan_serving_process(config, num_devices: int, budget_bytes: float, *, backend: str,
                         tpu_topology: Optional[str] = None, context: int = 4096, max_new: int = 512,
                         max_rows: int = 1024, max_checks: int = 6, probe_rows: int = 2, log=None) -> ServePlan:
  """`plan_serving` for the recipe ConfigDict `config` in a child process holding the topology's devices
  (`num_devices` simulated CPU devices, or libtpu's devices of `tpu_topology`). Raises RuntimeError when the
  child fails."""
  import json
  import subprocess
  import sys
  from llava_jax.scale.memory import child_env
  setup = dict(config=config.to_dict(), num_devices=int(num_devices), budget_bytes=float(budget_bytes),
               backend=backend, tpu_topology=tpu_topology, context=int(context), max_new=int(max_new),
               max_rows=int(max_rows), max_checks=int(max_checks), probe_rows=int(probe_rows))
  proc = subprocess.Popen([sys.executable, "-m", "llava_jax.scale.serve"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=child_env(num_devices, backend))
  proc.stdin.write(json.dumps(setup) + "\n")
  proc.stdin.close()
  result = None
  for line in proc.stdout:
    if line.startswith("{"):
      result = json.loads(line)
    elif log is not None and line.strip():
      log(line.rstrip("\n"))
  err = proc.stderr.read()
  code = proc.wait()
  if code or result is None:
    tail = [x for x in err.splitlines() if x.strip() and "TPU_WORKER_HOSTNAMES" not in x][-5:]
    raise RuntimeError(f"the serving plan's process failed (exit code {code}): " + " | ".join(tail))
  return _from_dict(result)


def _serve_main() -> None:
  import json
  import sys
  import jax
  import ml_collections
  from llava_jax import recipes
  from llava_jax.scale.tpu import tpu_devices
  setup = json.loads(sys.stdin.readline())
  config = ml_collections.ConfigDict(setup["config"])
  devices = tpu_devices(setup["tpu_topology"]) if setup["backend"] == "tpu" else jax.devices("cpu")
  devices = devices[:setup["num_devices"]]
  plan = plan_serving(recipes.llava_config(config.model), devices, setup["budget_bytes"], context=setup["context"],
                      max_new=setup["max_new"], max_rows=setup["max_rows"],
                      max_checks=setup["max_checks"], probe_rows=setup["probe_rows"], log=lambda s: print(s, flush=True))
  print(json.dumps(dataclasses.asdict(plan)), flush=True)


if __name__ == "__main__":
  _serve_main()
