"""The real TPU compiler on this CPU-only machine (libtpu's compile-only devices of a v5e 2x2 slice): the tiny
recipe's train step and generate's prefill / decode compile for TPU, and memory_analysis() agrees with the
bytes we compute from the shardings and the compiler's tiled layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax import parallel, recipes
from llava_jax.config import ATTENTION_IMPLS
from llava_jax.scale import tpu as tpu_lib
from llava_jax.scale.hardware import GIB
from tests.fixtures import load_config

pytestmark = pytest.mark.skipif(not tpu_lib.libtpu_available(),
                                reason="libtpu is not installed (pip install -e '.[dev]': the version jax[tpu] pins)")

TOPOLOGY = "v5e:2x2"
# the TPU attention kernel: the Pallas splash kernel when this checkout has it, else XLA's
TPU_ATTENTION = "splash" if "splash" in ATTENTION_IMPLS else "xla"


@pytest.fixture(scope="module")
def v5e_devices():
  devices = tpu_lib.tpu_devices(TOPOLOGY)
  assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
  return devices


def _count(tree) -> int:
  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def test_tiled_bytes_matches_the_compiler(v5e_devices):
  """A float32 matrix in (8, 128) tiles, a short vector in (128,) tiles, a transposed bf16 array, bools: the
  compiler's argument bytes equal our tiled count, and exceed the plain count."""
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(v5e_devices), ("x",))
  args = (jax.ShapeDtypeStruct((64, 300), jnp.float32, sharding=NamedSharding(mesh, P("x"))),
          jax.ShapeDtypeStruct((3,), jnp.float32, sharding=NamedSharding(mesh, P())),
          jax.ShapeDtypeStruct((2, 5, 7), jnp.bfloat16, sharding=NamedSharding(mesh, P())),
          jax.ShapeDtypeStruct((10,), jnp.bool_, sharding=NamedSharding(mesh, P())))
  compiled = jax.jit(lambda a, b, c, d: (a * 2, b + 1, c, d), donate_argnums=(0, 1)).lower(*args).compile()
  ma = compiled.memory_analysis()
  assert ma.argument_size_in_bytes == tpu_lib.tiled_bytes_per_device(args, compiled.input_formats[0])
  assert tpu_lib.tiled_bytes((16, 300), np.float32, compiled.input_formats[0][0].layout) == 16 * 384 * 4
  plain = 16 * 300 * 4 + 3 * 4 + 70 * 2 + 10
  assert ma.argument_size_in_bytes > plain
  # the donated matrix and vector are reused for their outputs
  assert ma.alias_size_in_bytes == tpu_lib.tiled_bytes_per_device(args[:2], compiled.input_formats[0][:2])


def test_train_step_compiles_for_tpu(v5e_devices):
  """The tiny recipe's real train step (FSDP over the 4 chips) on the TPU compiler."""
  from llava_jax.scale.memory import Candidate, _bytes_per_device, compile_step
  config = load_config("tiny")
  candidate = Candidate(mesh=(1, 4, 1), remat_policy="full", attention_impl=TPU_ATTENTION, micro_batches=1,
                        chunked_loss=0)
  compiled, state, batch = compile_step(config, candidate, v5e_devices)
  ma = compiled.memory_analysis()
  formats = compiled.input_formats[0]
  # the arguments are exactly the sharded state and batch as the TPU stores them (tiled)
  assert ma.argument_size_in_bytes == tpu_lib.tiled_bytes_per_device((state, batch), formats)
  # ... which holds what we count from the shapes and shardings: params split 4 ways over fsdp
  params = _bytes_per_device(state.params)
  full = 4 * _count(state.params)  # float32
  assert full / 4 <= params < full / 4 + 16 * 1024  # split 4 ways; small replicated norms / biases on top
  assert _bytes_per_device(state.opt_state) == pytest.approx(2 * params, abs=64)  # AdamW mu, nu (+ counts)
  assert ma.argument_size_in_bytes >= params + _bytes_per_device(state.frozen) + _bytes_per_device(
      state.opt_state) + _bytes_per_device(batch)
  # donation: the new state reuses every byte of the old one; only the step's metrics are new outputs
  assert ma.alias_size_in_bytes == tpu_lib.tiled_bytes_per_device(state, formats[0])
  assert 0 <= ma.output_size_in_bytes - ma.alias_size_in_bytes < 64 * 1024
  assert ma.temp_size_in_bytes > 0
  hlo = compiled.as_text()
  assert "all-gather" in hlo or "all-reduce" in hlo or "reduce-scatter" in hlo  # a real SPMD program
  if TPU_ATTENTION == "splash":
    assert "tpu_custom_call" in hlo  # the Pallas kernel was compiled, not a fallback


def test_generate_prefill_and_decode_compile_for_tpu(v5e_devices):
  """generate's jitted prefill and decode, laid out as generate() lays them out, on the TPU compiler."""
  from llava_jax.scale.memory import _bytes_per_device
  from llava_jax.scale.serve import compile_generate, kv_bytes_per_token
  model_config = recipes.llava_config(load_config("tiny").model).with_runtime(attention_impl=TPU_ATTENTION)
  mesh = parallel.make_mesh((1, 4, 1), devices=v5e_devices)
  batch, prompt, new = 8, 96, 32
  prefill, decode = compile_generate(model_config, mesh, batch=batch, prompt_len=prompt, max_new=new)
  pm, dm = prefill.compiled.memory_analysis(), decode.compiled.memory_analysis()
  assert pm.argument_size_in_bytes == tpu_lib.tiled_bytes_per_device(prefill.args,
                                                                     prefill.compiled.input_formats[0])
  assert dm.argument_size_in_bytes == tpu_lib.tiled_bytes_per_device(decode.args, decode.compiled.input_formats[0])
  # the KV cache: k, v [L, B, Hkv, S, hd] with rows split over the 4 chips, as our per-token formula says
  state = decode.args[1]
  t = model_config.text
  assert state.cache.k.shape == (t.num_hidden_layers, batch, t.num_key_value_heads, prompt + new, t.resolved_head_dim)
  kv = _bytes_per_device((state.cache.k, state.cache.v))
  assert kv == kv_bytes_per_token(model_config) * (prompt + new) * batch // 4
  # prefill's output is the decode state; decode donates it and writes its output in place
  # (output bytes also hold the output tuple's table of buffer pointers: one 512-byte tile)
  assert 0 <= pm.output_size_in_bytes - tpu_lib.tiled_bytes_per_device(state, prefill.compiled.output_formats) <= 512
  assert dm.alias_size_in_bytes == tpu_lib.tiled_bytes_per_device(state, decode.compiled.output_formats)
  assert 0 <= dm.output_size_in_bytes - dm.alias_size_in_bytes <= 512
  assert pm.temp_size_in_bytes > 0 and dm.temp_size_in_bytes > 0


def test_plan_uses_the_tpu_compiler_and_splash(v5e_devices):
  """plan() on TPU devices: the TPU compiler's numbers, unscaled; the TPU search tries 'splash' (or 'chunked'
  without it) as its attention saver."""
  from llava_jax.scale import plan
  from llava_jax.scale.hardware import GIB, Chip, Topology, get_topology
  from llava_jax.scale.plan import resolve_backend
  from llava_jax.scale.memory import Candidate, measure_state
  config = load_config("tiny")
  # a chip that holds the state (else nothing is compiled) but not the step
  state = measure_state(config, Candidate((4, 1, 1), "none", "xla", 1, 0), v5e_devices).state
  memory = (state + (1 << 20)) / 0.9
  toy = Topology("v5e-4", Chip("v5e-toy", "tpu", 1e12, memory, "a test chip"), 4, 1)
  p = plan(config, toy, recipe="configs/tiny.py", devices=v5e_devices, max_trials=2)
  assert p.backend == "tpu" and p.temp_factor == 1.0 and not p.fits
  expected = "splash" if "splash" in ATTENTION_IMPLS else "chunked"
  assert [tr.candidate.attention_impl for tr in p.trials] == ["xla", expected]
  for tr in p.trials:
    assert tr.memory.error is None and tr.memory.backend == "tpu"
    assert tr.memory.compiled_attention == tr.candidate.attention_impl  # not replaced by 'chunked' as on CPU
    assert tr.total == tr.memory.total > memory
  text = p.render()
  assert "libtpu's TPU compiler" in text and "FALLBACK" not in text and "NOTHING FITS" in text
  # default backend: the TPU compiler for TPU topologies (libtpu is importable here); GPUs stay simulated
  v5e = get_topology("v5e-4")
  assert resolve_backend(v5e) == ("tpu", "") and v5e.tpu_topology() == TOPOLOGY
  assert resolve_backend(get_topology("8xA100-80G")) == ("cpu", "")
  assert v5e.chip.memory_bytes == 16 * GIB


def test_megacore_chips_give_one_device_per_chip_and_a_mesh():
  """libtpu lists a v4 chip's two TensorCores as two devices; jax builds meshes from one per chip (megacore), so
  `tpu_devices` keeps one per chip — v4-16 = 8 chips = 8 devices — and a mesh over them can be made."""
  devices = tpu_lib.tpu_devices("v4:2x2x2")
  assert len(devices) == 8 and len({tuple(d.coords) for d in devices}) == 8
  mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  assert mesh.devices.size == 8
  # and each device has the whole chip's HBM (a v4 chip: 32 GiB; one TensorCore alone sees half): 20 GiB of
  # arguments + outputs compile for one device (the per-TensorCore device refused them: 40 GiB > 15.25 GiB)
  one = jax.sharding.SingleDeviceSharding(devices[0])
  n = 10 * GIB // 4
  compiled = jax.jit(lambda x: x * 2.0, out_shardings=one).lower(
      jax.ShapeDtypeStruct((n,), jnp.float32, sharding=one)).compile()
  assert compiled.memory_analysis().argument_size_in_bytes == 10 * GIB
