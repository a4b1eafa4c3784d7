"""The memory / throughput plan: which way of running a recipe fits a topology, and how long it takes.

`plan(config, '8xA100-80G')` compiles the recipe's real training step for the topology's mesh with abstract
inputs (no weights; `llava_jax.scale.memory`), reads per-device memory, and searches a short, ordered list
of candidates — the recipe as configured, then one memory saver at a time:
  1. attention kernel → 'cudnn' on GPU (flash; measured as 'chunked' on simulated devices) / 'chunked' on TPU
  2. chunked vocabulary loss (no [B, T, V] float32 logits)
  3. remat policy → 'full' (save only each layer's input)
  4. micro-batches ×2, ×4, ... (gradient accumulation) down to one row per device per micro-batch
stopping at the first that fits in (1 - headroom) × the chip's memory. The micro-batch ladder is bisected (memory
falls as micro-batches grow): the fewest micro-batches that fit in ~log2(ladder) compiles instead of one each.
Before compiling anything, the state alone (trainable and frozen parameters, optimizer state: the training's own
abstract TrainState, so LoRA adapters and quantized frozen kernels count as they are stored) is counted per
device; when it exceeds the budget nothing can fit and nothing is compiled. With `explore`, policies that
recompute less ('save_attn_out', 'dots_no_batch', 'dots') are also tried at the fitting setting. FLOPs are
analytical (`llava_jax.models.flops`); step time = model FLOPs / (devices × peak × MFU), and the recipe's wall clock =
steps × step time.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

from llava_jax.config import ATTENTION_IMPLS
from llava_jax.models import flops as flops_lib
from llava_jax.scale import recipe_time
from llava_jax.scale import tpu as tpu_lib
from llava_jax.scale.hardware import Topology, get_topology
from llava_jax.scale.memory import Candidate, MeasureProcess, MemoryReport, measure, measure_state
from llava_jax.scale.plan_report import gib, render

DEFAULT_MFU = 0.4
DEFAULT_HEADROOM = 0.10
LOSS_CHUNK = 512
# Temporaries measured on simulated CPU devices are scaled by this before comparing with the budget: the TPU
# compiler (deviceless libtpu compile of the same 7B / 13B stage-2 steps) needed 1.19× / 1.24× the CPU
# compiler's temporaries (docs/scaling.md). Arguments (params, optimizer state, batch) are exact either way.
CPU_TEMP_FACTOR = 1.25


@dataclasses.dataclass
class Trial:
  """One measured candidate. `temporaries` / `total` are per-device bytes after `temp_factor` (the calibration of
  simulated-CPU temporaries; 1 for the TPU compiler); `memory` holds the compiler's raw numbers."""
  candidate: Candidate
  memory: MemoryReport
  fits: bool
  flops: flops_lib.StepFlops
  step_seconds: float
  temp_factor: float = 1.0

  @property
  def temporaries(self) -> float:
    return self.memory.temporaries * self.temp_factor

  @property
  def total(self) -> float:
    return self.memory.total + (self.temp_factor - 1.0) * self.memory.temporaries


@dataclasses.dataclass
class Plan:
  recipe: str
  topology: Topology
  backend: str
  headroom: float
  mfu: float
  temp_factor: float
  global_batch: int
  seq_len: int
  images: int
  rows_per_device: int
  trainable_params: int
  frozen_params: int
  trials: List[Trial]
  chosen: Optional[Trial]
  steps: Optional[int] = None
  samples: Optional[int] = None
  dataset: str = ""
  mean_tokens: Optional[int] = None
  published_hours: Optional[float] = None
  problem: str = ""
  epochs: float = 1.0
  backend_note: str = ""     # why the simulated-CPU fallback was used for a TPU topology
  state: Optional[MemoryReport] = None  # the state alone per device, counted before compiling (`measure_state`)
  flops_fn: Optional[Callable] = dataclasses.field(default=None, repr=False)

  @property
  def budget_bytes(self) -> float:
    return self.topology.chip.memory_bytes * (1.0 - self.headroom)

  @property
  def fits(self) -> bool:
    return self.chosen is not None

  @property
  def state_exceeds_budget(self) -> bool:
    """The state alone (params + optimizer state per device) is over the budget: nothing was compiled."""
    return self.state is not None and self.state.error is None and self.state.state > self.budget_bytes

  def wall_clock_hours(self, seq_len: Optional[int] = None) -> Optional[float]:
    """Projected hours of the whole run for the chosen candidate (rows of `seq_len` tokens, default max)."""
    if self.chosen is None or not self.steps:
      return None
    t = seq_len or self.seq_len
    f = self._flops(self.chosen.candidate, t)
    return self.steps * recipe_time.step_seconds(f, self.topology.peak_flops, self.mfu) / 3600.0

  def packed_steps(self, mean_tokens: int) -> Optional[int]:
    """Steps when samples of `mean_tokens` tokens on average are packed into rows of seq_len tokens
    (data.packing; perfect packing: rows per step stay the global batch, samples per row = seq_len / mean)."""
    if not self.samples or not mean_tokens:
      return None
    return max(1, math.ceil(self.epochs * self.samples * min(mean_tokens, self.seq_len) / self.seq_len
                            / self.global_batch))

  def packed_wall_clock_hours(self, mean_tokens: int) -> Optional[float]:
    """Projected hours with packed rows (`packed_steps` × the full-length step time)."""
    steps = self.packed_steps(mean_tokens)
    if self.chosen is None or steps is None:
      return None
    return steps * self.chosen.step_seconds / 3600.0

  def _flops(self, c: Candidate, seq_len: int) -> flops_lib.StepFlops:
    return self.flops_fn(c, seq_len)

  def render(self) -> str:
    return render(self)


def resolve_mesh(mesh, num_devices: int, global_batch: int, num_heads: int, num_kv_heads: int) -> tuple:
  """config.mesh (one entry may be -1) → a concrete (data, fsdp, tensor) for `num_devices`; when the global batch
  does not split over data × fsdp, the tensor axis grows (powers of two dividing the kv heads) until it does."""
  d, f, t = (int(x) for x in mesh)
  def fill(d, f, t):
    known = [x for x in (d, f, t) if x != -1]
    prod = math.prod(known)
    if (d, f, t).count(-1) == 1 and prod and num_devices % prod == 0:
      rest = num_devices // prod
      return tuple(rest if x == -1 else x for x in (d, f, t))
    return (d, f, t) if prod == num_devices and -1 not in (d, f, t) else None
  out = fill(d, f, t)
  if out is None:  # the recipe's mesh does not fit this device count: FSDP over everything
    out = (1, num_devices, 1)
  d, f, t = out
  while global_batch % (d * f) and f % 2 == 0 and num_kv_heads % (t * 2) == 0 and num_heads % (t * 2) == 0:
    f //= 2
    t *= 2
  return (d, f, t)


def resolve_backend(topology: Topology, backend: str = "auto") -> Tuple[str, str]:
  """'auto' | 'tpu' | 'cpu' → (the backend to compile with, why a TPU topology falls back to simulated CPU
  devices or ''). 'auto': the TPU compiler for TPU topologies when libtpu is importable, else simulated CPU."""
  if backend not in ("auto", "cpu", "tpu"):
    raise ValueError(f"backend={backend!r}: 'auto', 'cpu' (simulated devices) or 'tpu' (libtpu deviceless compile)")
  if backend == "cpu" or topology.platform != "tpu":
    if backend == "tpu":
      raise ValueError(f"backend='tpu' needs a TPU topology, not {topology.name!r}")
    return "cpu", ("asked for with --plan.backend=cpu" if topology.platform == "tpu" else "")
  if topology.tpu_topology() is None:
    if backend == "tpu":
      raise ValueError(f"backend='tpu' needs a TPU topology with a known libtpu shape, not {topology.name!r}")
    return "cpu", f"no libtpu topology shape known for {topology.name}"
  if not tpu_lib.libtpu_available():
    if backend == "tpu":
      raise ValueError("backend='tpu' needs libtpu: pip install -e '.[dev]' (or the libtpu version jax[tpu] pins)")
    return "cpu", "libtpu is not installed (pip install -e '.[dev]')"
  return "tpu", ""


def fast_attention(platform: str, compute_dtype: str) -> str:
  """The memory-saving attention kernel the search tries: cuDNN flash attention on GPU (bf16 / fp16), the
  Pallas splash kernel on TPU (when this build has it), else 'chunked'."""
  if platform == "gpu" and compute_dtype in ("bfloat16", "float16"):
    return "cudnn"
  if platform == "tpu" and "splash" in ATTENTION_IMPLS:
    return "splash"
  return "chunked"


def _saver_sequence(base: Candidate, topology: Topology, compute_dtype: str,
                    rows_per_device: int) -> Tuple[List[Candidate], List[Candidate]]:
  """(the recipe then one saver at a time, the micro-batch ladder ×2, ×4, ... after the last of them)."""
  out = [base]
  cur = base
  if cur.attention_impl not in ("chunked", "cudnn", "splash"):
    cur = dataclasses.replace(cur, attention_impl=fast_attention(topology.platform, compute_dtype))
    out.append(cur)
  if not cur.chunked_loss:
    cur = dataclasses.replace(cur, chunked_loss=LOSS_CHUNK)
    out.append(cur)
  if cur.remat_policy != "full":
    cur = dataclasses.replace(cur, remat_policy="full")
    out.append(cur)
  ladder = []
  k = cur.micro_batches
  while rows_per_device % (k * 2) == 0:
    k *= 2
    ladder.append(dataclasses.replace(cur, micro_batches=k))
  return out, ladder


def _count(tree) -> int:
  """Parameters in a (possibly quantized) param tree: a 4-bit `kernel_q` packs two weights per byte, a
  `kernel_scale` is not a parameter (models/quant.py)."""
  import numpy as np
  from flax import traverse_util
  total = 0
  for path, x in traverse_util.flatten_dict(tree).items():
    n = int(np.prod(x.shape, dtype=np.int64))
    if path[-1] == "kernel_scale":
      continue
    total += 2 * n if path[-1] == "kernel_q" and np.dtype(x.dtype) == np.uint8 else n
  return total


def plan(config, topology: Union[str, Topology], *, recipe: str = "", mfu: float = DEFAULT_MFU,
         headroom: float = DEFAULT_HEADROOM, backend: str = "auto", temp_factor: Optional[float] = None,
         explore: bool = False, max_trials: int = 10,
         mean_tokens: Optional[int] = None, samples: Optional[int] = None, devices: Optional[Sequence] = None,
         log: Optional[Callable[[str], None]] = None) -> Plan:
  """Plan `config` (a recipe ConfigDict: model, train, data, mesh sections) on `topology` (name or Topology).

  recipe: the config's name ('v15_stage2:7b') for the report and the published-numbers lookup. backend 'auto'
  (`resolve_backend`): libtpu's deviceless TPU compiler for TPU topologies when libtpu is importable, else
  simulated CPU devices (GPU topologies always); 'cpu' / 'tpu' force one. devices: use these (already present)
  devices instead of a child process (a test session's 8 CPU devices, or `tpu.tpu_devices('v5e:2x2')`). samples:
  data-set size for the wall clock (default: the recipe's published data set, or data.synthetic_samples).
  mean_tokens: also project the wall clock at this many tokens per row (default: rows padded to max_length).
  temp_factor: scale of the measured temporaries (default CPU_TEMP_FACTOR on simulated CPU devices, 1 with the
  TPU compiler; 1 reports the CPU compiler's raw numbers).
  log: called with a line per measured candidate (progress).
  """
  from llava_jax import recipes
  from llava_jax.models.llava import abstract_params
  from llava_jax.train.state import split_params

  topo = get_topology(topology) if isinstance(topology, str) else topology
  if not 0 <= headroom < 1:
    raise ValueError(f"headroom={headroom} must be in [0, 1)")
  if not 0 < mfu <= 1:
    raise ValueError(f"mfu={mfu} must be in (0, 1]")
  if devices is not None:
    backend, note = devices[0].platform, ""
  else:
    backend, note = resolve_backend(topo, backend)
  if temp_factor is None:
    temp_factor = CPU_TEMP_FACTOR if backend == "cpu" else 1.0
  tpu_topology = topo.tpu_topology() if backend == "tpu" and devices is None else None
  model_config = recipes.llava_config(config.model)
  tcfg = config.train
  n = topo.num_devices
  gb = int(tcfg.global_batch_size)
  seq_len = int(config.data.max_length)
  images_per_row = int(config.data.max_images_per_sample)
  images = gb * images_per_row
  t = model_config.text
  mesh = resolve_mesh(tuple(config.mesh), n, gb, t.num_attention_heads, t.num_key_value_heads)
  shards = mesh[0] * mesh[1]
  freeze = tcfg.freeze or None
  # no backend started (the child process compiles); XLA attention: the kernel does not change the parameters,
  # and 'cudnn' cannot even be traced without a GPU
  shapes, _ = abstract_params(model_config.with_runtime(attention_impl="xla"))
  trainable, frozen = split_params(shapes, tcfg.trainable, freeze)
  # LoRA: adapters (their FLOPs: flops.lora_flops_per_token) do not make the base matmuls trained
  decoder_trainable, projector_trainable = flops_lib.trainable_parts(trainable)

  def flops_fn(c: Candidate, length: int) -> flops_lib.StepFlops:
    return flops_lib.step_flops(model_config.with_runtime(remat_policy=c.remat_policy, attention_impl=c.attention_impl),
                                global_batch=gb, seq_len=length, images=images,
                                decoder_trainable=decoder_trainable, projector_trainable=projector_trainable,
                                chunked_loss=bool(c.chunked_loss))

  path, _, size = recipe.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  dataset, n_samples = recipe_time.DATASETS.get(name, ("", None))
  if not n_samples and config.data.source == "synthetic":
    dataset, n_samples = "synthetic", int(config.data.synthetic_samples) or None
  n_samples = samples or n_samples
  steps = (recipes.total_steps(tcfg, n_samples)
           if (n_samples or int(tcfg.num_steps) > 0) else None)
  result = Plan(recipe=recipe, topology=topo, backend=backend, backend_note=note, headroom=headroom, mfu=mfu,
                epochs=float(tcfg.num_epochs),
                temp_factor=float(temp_factor), global_batch=gb,
                seq_len=seq_len, images=images, rows_per_device=gb // shards if gb % shards == 0 else 0,
                trainable_params=_count(trainable), frozen_params=_count(frozen), trials=[], chosen=None,
                steps=steps, samples=n_samples, dataset=dataset, mean_tokens=mean_tokens,
                published_hours=recipe_time.PUBLISHED_HOURS.get((name, size or "7b")) if "A100" in topo.name else None,
                flops_fn=flops_fn)
  if gb % shards:
    result.problem = (f"global batch {gb} cannot be split over data×fsdp = {shards} devices of mesh {mesh}: set "
                      f"--config.train.global_batch_size to a multiple of {shards}")
    return result

  rt = model_config.runtime
  loss = tcfg.chunked_loss
  base = Candidate(mesh=mesh, remat_policy=rt.remat_policy, attention_impl=rt.attention_impl,
                   micro_batches=int(tcfg.micro_batches),
                   chunked_loss=LOSS_CHUNK if loss is True else int(loss or 0), param_dtype=rt.param_dtype)
  savers, ladder = _saver_sequence(base, topo, rt.dtype, result.rows_per_device)
  budget = result.budget_bytes

  worker = None
  if devices is None:
    worker = MeasureProcess(config, n, backend=backend, tpu_topology=tpu_topology, seq_len=seq_len,
                            total_steps=steps or 1000)
  run = (lambda c: worker.measure(c)) if worker is not None else (
      lambda c: measure(config, c, list(devices)[:n], seq_len=seq_len, total_steps=steps or 1000))
  count_state = (lambda c: worker.measure(c, state_only=True)) if worker is not None else (
      lambda c: measure_state(config, c, list(devices)[:n], total_steps=steps or 1000))

  def attempt(c: Candidate) -> Trial:
    report = run(c)
    f = flops_fn(c, seq_len)
    trial = Trial(c, report, False, f, recipe_time.step_seconds(f, topo.peak_flops, mfu), float(temp_factor))
    trial.fits = report.error is None and trial.total <= budget
    result.trials.append(trial)
    if log is not None:
      status = "error: " + report.error if report.error else (
          f"{gib(trial.total)} GiB per device, {'fits' if trial.fits else 'does not fit'}")
      log(f"  [{len(result.trials)}] {c.label()}: {status} ({report.compile_seconds:.0f} s)")
    return trial

  try:
    result.state = count_state(base)
    if result.state_exceeds_budget:
      if log is not None:
        log(f"  the state alone is {gib(result.state.state)} GiB per device > the budget {gib(budget)}: "
            "nothing compiled")
      return result
    for c in savers[:max_trials]:
      trial = attempt(c)
      if trial.fits:
        result.chosen = trial
        break
    # the micro-batch ladder, bisected: the fewest micro-batches that fit (memory falls as they grow)
    lo, hi = 0, (len(ladder) - 1 if result.chosen is None else -1)
    while lo <= hi and len(result.trials) < max_trials:
      mid = (lo + hi) // 2
      trial = attempt(ladder[mid])
      if trial.fits:
        result.chosen, hi = trial, mid - 1
      else:
        lo = mid + 1
    if explore and result.chosen is not None:
      for policy in ("save_attn_out", "dots_no_batch", "dots"):  # only those that recompute less
        c = dataclasses.replace(result.chosen.candidate, remat_policy=policy)
        if flops_fn(c, seq_len).hardware < result.chosen.flops.hardware:
          trial = attempt(c)
          if trial.fits:
            result.chosen = trial
  finally:
    if worker is not None:
      worker.close()
  return result
