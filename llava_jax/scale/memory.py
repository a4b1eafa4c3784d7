"""Per-device memory of the real training step, compiled ahead of time for a target mesh (nothing allocated).

`measure` builds the abstract TrainState (`jax.ShapeDtypeStruct`s with their NamedShardings) and an abstract
global batch, lowers `make_train_step(...)` on them, compiles, and reads `compiled.memory_analysis()`: argument
bytes (params, frozen params, optimizer state, batch), output bytes (the new state, aliased to the donated
input), and temporaries (activations saved for the backward pass, gradients, everything else). Per device:
    total = arguments + outputs - aliased + temporaries  (+ generated code)

Devices. Simulated CPU devices (`--xla_force_host_platform_device_count=N`, set before jax starts: `run_worker`
runs the measurement in a child process with that flag) stand in for the target's chips: the SPMD program,
shardings, collectives and the buffers of a step are the target's; the CPU compiler's scheduling and fusion
are not. Two corrections make the CPU's numbers closer to GPU/TPU ones:
  * XLA:CPU has no native bf16 arithmetic; it upcasts bf16 ops to f32, and its loop-invariant code motion then
    hoists the upcast of the stacked per-layer activations out of the backward loop, materializing an f32
    copy of all saved residuals next to the bf16 ones (+3× their size). GPU/TPU compilers do not. We disable
    the two passes (`CPU_COMPILER_OPTIONS`) on simulated devices (and LLVM optimization, which changes no
    buffer: the code is never run).
  * attention_impl 'cudnn' (GPU flash attention) and 'splash' (the TPU Pallas kernel) cannot compile for CPU:
    'chunked' is compiled instead (exact, its memory is an upper bound of flash attention's).
With `libtpu` installed, the step is compiled by the real TPU compiler for a TPU topology without TPUs
(`llava_jax.scale.tpu`), which gives the TPU's own numbers (minutes per 7B compile on a CPU); `plan` does that
by default for TPU topologies.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, List, Optional, Sequence, Tuple

from llava_jax.scale.tpu import tpu_devices

CPU_COMPILER_OPTIONS = {
    "xla_disable_hlo_passes": "while-loop-invariant-code-motion,while-loop-expensive-invariant-code-motion",
    "xla_backend_optimization_level": 0,  # LLVM codegen only: the same buffers, compiled ~1.5-2x faster
}


def _loss_flag(chunk: int) -> str:
  """train.chunked_loss as the recipes type it (a bool: True = the step's default chunk of 512)."""
  return "False" if not chunk else ("True" if chunk == 512 else str(int(chunk)))


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One way to run the recipe: what the plan compiles."""
  mesh: Tuple[int, int, int]          # (data, fsdp, tensor)
  remat_policy: str
  attention_impl: str
  micro_batches: int
  chunked_loss: int                   # 0 = full logits; else positions per loss chunk
  param_dtype: str = "float32"

  def overrides(self) -> List[str]:
    """The command-line flags that select this candidate."""
    return [f"--config.model.runtime.remat_policy={self.remat_policy}",
            f"--config.model.runtime.attention_impl={self.attention_impl}",
            f"--config.model.runtime.param_dtype={self.param_dtype}",
            f"--config.train.micro_batches={self.micro_batches}",
            f"--config.train.chunked_loss={_loss_flag(self.chunked_loss)}",
            f"--config.mesh='({self.mesh[0]},{self.mesh[1]},{self.mesh[2]})'"]

  def label(self) -> str:
    loss = f"loss chunk {self.chunked_loss}" if self.chunked_loss else "full logits"
    d, f, t = self.mesh
    return (f"mesh {d}x{f}x{t}, remat {self.remat_policy}, attention {self.attention_impl}, "
            f"{self.micro_batches} micro-batch{'es' if self.micro_batches > 1 else ''}, {loss}, "
            f"params {self.param_dtype}")


@dataclasses.dataclass
class MemoryReport:
  """Bytes per device of one compiled step (see module doc)."""
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  generated_code: int
  params: int              # trainable parameters (per device)
  frozen: int              # frozen parameters
  optimizer: int           # optimizer state
  batch: int               # the input batch
  compile_seconds: float
  backend: str
  compiled_attention: str  # the kernel actually compiled ('chunked' for 'cudnn' on CPU)
  error: Optional[str] = None
  compiled: bool = True    # False: only the state was counted (`measure_state`); no compiler numbers

  @property
  def state(self) -> int:
    """Parameters (trainable + frozen) and optimizer state per device."""
    return self.params + self.frozen + self.optimizer

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Abstract inputs


def _bytes_per_device(tree) -> int:
  import jax
  import numpy as np
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def abstract_batch(model_config, mesh, global_batch: int, seq_len: int, image_slots: Optional[int] = None):
  """The step's batch as ShapeDtypeStructs on `mesh` (rows and image slots split over data × fsdp).

  input_ids / segment_ids / positions [B, T] int32, loss_mask [B, T] bool, pixel_values [N, S, S, 3] float32,
  image_valid [N] bool, N = image_slots (default B: one image per row, as the pipeline's default slots).
  """
  import jax
  import jax.numpy as jnp
  from llava_jax import parallel
  spec = lambda nd: parallel.batch_sharding(mesh, nd)
  b, t = int(global_batch), int(seq_len)
  n = b if image_slots is None else int(image_slots)
  s = model_config.vision.image_size
  batch = dict(input_ids=jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=spec(2)),
               loss_mask=jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=spec(2)),
               segment_ids=jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=spec(2)),
               positions=jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=spec(2)))
  if n:
    batch["pixel_values"] = jax.ShapeDtypeStruct((n, s, s, 3), jnp.float32, sharding=spec(4))
    batch["image_valid"] = jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=spec(1))
  return batch


# ---------------------------------------------------------------------------------------------------------
# One measurement (in this process, on devices it already has)


def _step_config(config, candidate: Candidate, backend: str):
  from llava_jax import recipes
  attention = candidate.attention_impl
  if backend == "cpu" and attention in ("cudnn", "splash"):  # GPU / TPU-only kernels: 'chunked' in their place
    attention = "chunked"
  model_config = recipes.llava_config(config.model).with_runtime(
      remat_policy=candidate.remat_policy, attention_impl=attention, param_dtype=candidate.param_dtype)
  return model_config, attention


def abstract_state(config, candidate: Candidate, devices: Sequence[Any], *, total_steps: int = 1000):
  """(model_config, mesh, optimizer, the abstract TrainState) of the recipe for `candidate` on `devices`: the
  training's own `abstract_train_state` (the real init's shapes and dtypes — LoRA adapters, quantized frozen
  kernels — split trainable / frozen by train.trainable / freeze, optimizer state for the trainable subtree only),
  ShapeDtypeStructs carrying their NamedShardings. Nothing is allocated or compiled."""
  from llava_jax import parallel
  from llava_jax.train.optim import optimizer_from_config
  from llava_jax.train.state import abstract_train_state
  model_config, _ = _step_config(config, candidate, devices[0].platform)
  tcfg = config.train
  freeze = tcfg.freeze or None
  mesh = parallel.make_mesh(candidate.mesh, devices=list(devices))
  optimizer = optimizer_from_config(tcfg, total_steps)
  state = abstract_train_state(model_config, optimizer, mesh, trainable_patterns=tcfg.trainable, freeze=freeze)
  return model_config, mesh, optimizer, state


def measure_state(config, candidate: Candidate, devices: Sequence[Any], *, total_steps: int = 1000) -> MemoryReport:
  """Per-device bytes of the state alone (trainable params, frozen params, optimizer state) for `candidate` on
  `devices`, without compiling (seconds even for 13B): a lower bound of any step's memory, which `plan` checks
  before compiling. The compiler fields are 0 and `compiled` False; errors come back in `error`."""
  backend = devices[0].platform
  _, attention = _step_config(config, candidate, backend)
  t0 = time.perf_counter()
  report = MemoryReport(0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, backend, attention, compiled=False)
  try:
    _, _, _, state = abstract_state(config, candidate, devices, total_steps=total_steps)
  except Exception as e:  # noqa: BLE001 — reported
    report.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]
  else:
    report.params, report.frozen = _bytes_per_device(state.params), _bytes_per_device(state.frozen)
    report.optimizer = _bytes_per_device(state.opt_state)
  report.compile_seconds = time.perf_counter() - t0
  return report


def compile_step(config, candidate: Candidate, devices: Sequence[Any], *, total_steps: int = 1000,
                 seq_len: Optional[int] = None, image_slots: Optional[int] = None):
  """Lower and compile the recipe's train step for `candidate` on `devices` with abstract inputs.

  Returns (compiled, state, batch): the `jax.stages.Compiled` and the abstract TrainState (`abstract_state`) and
  batch it was lowered with (ShapeDtypeStructs with their NamedShardings). Raises what the compiler raises.
  """
  from llava_jax.train.step import make_train_step

  backend = devices[0].platform
  model_config, mesh, optimizer, state = abstract_state(config, candidate, devices, total_steps=total_steps)
  tcfg = config.train
  batch = abstract_batch(model_config, mesh, int(tcfg.global_batch_size), int(seq_len or config.data.max_length),
                         image_slots)
  step = make_train_step(model_config, optimizer, mesh, micro_batches=candidate.micro_batches,
                         chunked_loss=int(candidate.chunked_loss),
                         compiler_options=CPU_COMPILER_OPTIONS if backend == "cpu" else None)
  return step.lower(state, batch).compile(), state, batch


def measure(config, candidate: Candidate, devices: Sequence[Any], *, total_steps: int = 1000,
            seq_len: Optional[int] = None, image_slots: Optional[int] = None) -> MemoryReport:
  """Compile the recipe's train step for `candidate` on `devices` (abstract inputs) → MemoryReport.

  config: the recipe ConfigDict (model, train, data sections); seq_len defaults to data.max_length, image_slots
  to one per row. Compile errors (e.g. a shape the mesh cannot split) come back in `error`, not raised.
  """
  backend = devices[0].platform
  _, attention = _step_config(config, candidate, backend)
  t0 = time.perf_counter()
  empty = MemoryReport(0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, backend, attention)
  try:
    compiled, state, batch = compile_step(config, candidate, devices, total_steps=total_steps, seq_len=seq_len,
                                          image_slots=image_slots)
  except Exception as e:  # noqa: BLE001 — reported per candidate
    empty.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]
    empty.compile_seconds = time.perf_counter() - t0
    return empty
  ma = compiled.memory_analysis()
  return MemoryReport(
      arguments=int(ma.argument_size_in_bytes), outputs=int(ma.output_size_in_bytes),
      aliased=int(ma.alias_size_in_bytes), temporaries=int(ma.temp_size_in_bytes),
      generated_code=int(ma.generated_code_size_in_bytes) if backend != "cpu" else 0,
      params=_bytes_per_device(state.params), frozen=_bytes_per_device(state.frozen),
      optimizer=_bytes_per_device(state.opt_state), batch=_bytes_per_device(batch),
      compile_seconds=time.perf_counter() - t0, backend=backend, compiled_attention=attention)


# ---------------------------------------------------------------------------------------------------------
# In a child process with the right device count


def child_env(num_devices: int, backend: str) -> dict:
  """Environment of a measuring child process: `num_devices` simulated CPU devices (backend 'cpu'; TPU compiles
  get their devices from libtpu), no backend but CPU, this checkout first on the path."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  if backend == "cpu":
    flags.append(f"--xla_force_host_platform_device_count={int(num_devices)}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("TPU_SKIP_MDS_QUERY", "1")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  return env


class MeasureProcess:
  """A Python child process holding `num_devices` simulated CPU devices (or, with backend 'tpu', the devices of
  `tpu_topology`) that measures candidates one at a time: `measure(candidate) -> MemoryReport`. Use as a
  context manager (`close()` ends the child). XLA_FLAGS must be set before jax starts, hence the process."""

  def __init__(self, config, num_devices: int, *, backend: str = "cpu", tpu_topology: Optional[str] = None,
               total_steps: int = 1000, seq_len: Optional[int] = None, image_slots: Optional[int] = None):
    self.backend = backend
    env = child_env(num_devices, backend)
    self._stderr = open(os.devnull, "w") if os.environ.get("LLAVA_JAX_PLAN_QUIET", "1") == "1" else None
    self._proc = subprocess.Popen([sys.executable, "-m", "llava_jax.scale.memory"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
    setup = dict(config=config.to_dict(), backend=backend, tpu_topology=tpu_topology, total_steps=total_steps,
                 seq_len=seq_len, image_slots=image_slots, num_devices=int(num_devices))
    self._send(setup)

  def _send(self, obj) -> None:
    self._proc.stdin.write(json.dumps(obj) + "\n")
    self._proc.stdin.flush()

  def measure(self, candidate: Candidate, state_only: bool = False) -> MemoryReport:
    """The compiled step's MemoryReport, or with `state_only` the state's bytes without compiling
    (`measure_state`)."""
    try:
      self._send(dict(dataclasses.asdict(candidate), state_only=bool(state_only)))
      while True:
        line = self._proc.stdout.readline()
        if not line:
          break
        if line.startswith("{"):
          row = json.loads(line)
          if "fatal" in row:
            raise RuntimeError(row["fatal"])
          return MemoryReport(**row)
    except (BrokenPipeError, OSError):
      pass
    code = self._proc.poll()
    return MemoryReport(0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, self.backend, candidate.attention_impl,
                        error=f"the measuring process died (exit code {code}; out of host memory?)")

  def close(self) -> None:
    if self._proc.poll() is None:
      try:
        self._proc.stdin.close()
        self._proc.wait(timeout=30)
      except Exception:  # noqa: BLE001
        self._proc.kill()
        self._proc.wait()
    if self._stderr is not None:
      self._stderr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _worker_main() -> None:
  """Child process: a setup JSON line, then one candidate per line → one MemoryReport JSON line each."""
  setup = json.loads(sys.stdin.readline())
  import jax
  import ml_collections
  try:
    config = ml_collections.ConfigDict(setup["config"])
    devices = tpu_devices(setup["tpu_topology"]) if setup["backend"] == "tpu" else jax.devices("cpu")
    if len(devices) < setup["num_devices"]:
      raise RuntimeError(f"the measuring process has {len(devices)} devices, needs {setup['num_devices']}")
    devices = devices[:setup["num_devices"]]
  except Exception as e:  # noqa: BLE001
    for _ in sys.stdin:
      print(json.dumps({"fatal": f"{type(e).__name__}: {e}"}), flush=True)
    return
  for line in sys.stdin:
    c = json.loads(line)
    c["mesh"] = tuple(c["mesh"])
    if c.pop("state_only", False):
      report = measure_state(config, Candidate(**c), devices, total_steps=setup["total_steps"])
    else:
      report = measure(config, Candidate(**c), devices, total_steps=setup["total_steps"], seq_len=setup["seq_len"],
                       image_slots=setup["image_slots"])
    print(json.dumps(report.to_dict()), flush=True)
    jax.clear_caches()


if __name__ == "__main__":
  _worker_main()
