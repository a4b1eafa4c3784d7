"""Weight-only quantization (models/quant.py): int8 against torch's per-channel quantizer, int4 against torch's
fake-quantizer per group, NF4 against bitsandbytes' own `quantize_4bit` / `dequantize_4bit` (codes, packing,
absmax, dequantized values); error bounds; bytes per parameter on the arrays; a quantized LLaVA (scanned,
unscanned, sharded over the 8 simulated devices, with LoRA on top) computes the float model on the dequantized
weights."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import torch
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from llava_jax import parallel
from llava_jax.config import QUANTIZE_MODES, LlavaConfig, LoraConfig, RuntimeOptions, TextConfig, VisionConfig
from llava_jax.models import lora as lora_lib
from llava_jax.models import quant
from llava_jax.models.llava import LlavaModel, init_params, logical_partition_specs

VISION = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                      patch_size=8)
TEXT = TextConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
IMAGE = 95
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config(**runtime):
  return LlavaConfig(vision=VISION, text=TEXT, image_token_index=IMAGE, runtime=RuntimeOptions(**runtime))


def inputs():
  """4 rows (the sharded test splits the batch over data × fsdp = 4): one with the image, three text-only."""
  k = config().num_image_tokens
  ids = np.array([[1, 5] + [IMAGE] * k + [7, 8, 9, 10], [1, 11, 12, 13, 14] + [0] * (k + 1),
                  [1] + list(range(20, 20 + k + 5)), [1, 3, 4] + [0] * (k + 3)], np.int32)
  mask = (np.arange(ids.shape[1])[None] < np.array([[ids.shape[1]], [5], [ids.shape[1]], [3]])).astype(np.int32)
  pixels = np.random.RandomState(0).randn(1, 16, 16, 3).astype(np.float32)
  return jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)


_JITTED = {}


def logits(cfg, params):
  if cfg not in _JITTED:  # one compile per config across the tests
    _JITTED[cfg] = jax.jit(LlavaModel(cfg).apply)
  return np.asarray(_JITTED[cfg]({"params": params}, *inputs()))


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def weights(shape, seed=0):
  """Float32 weights with a spread of column / group magnitudes and a few outliers (as trained LLMs have)."""
  rs = np.random.RandomState(seed)
  w = rs.randn(*shape).astype(np.float32) * np.exp(rs.randn(1, shape[-1])).astype(np.float32) * 0.02
  w.flat[rs.randint(0, w.size, 5)] *= 20
  return w


def dequantized_tree(qparams, mode):
  """The float tree a quantized tree stands for: every kernel_q / kernel_scale pair → kernel (float32)."""
  out = {}
  f = traverse_util.flatten_dict(qparams)
  for path, v in f.items():
    if path[-1] == quant.KERNEL_Q:
      out[path[:-1] + ("kernel",)] = np.asarray(quant.dequantize_kernel(v, f[path[:-1] + (quant.KERNEL_SCALE,)],
                                                                        mode))
    elif path[-1] != quant.KERNEL_SCALE:
      out[path] = v
  return traverse_util.unflatten_dict(out)


_FLOAT = {}


def float_params(scan=True):
  """A fresh copy (quantize_params works in place) of the float model's random init."""
  if scan not in _FLOAT:
    _FLOAT[scan] = jax.tree.map(np.asarray, init_params(config(scan_layers=scan), jax.random.key(0)))
  return jax.tree.map(np.copy, _FLOAT[scan])


# ---------------------------------------------------------------------------------------------------------
# kernels against the oracles


def test_int8_equals_torch_quantize_per_channel():
  w = weights((256, 96))
  got = quant.quantize_kernel(w, "int8")
  scale = got["kernel_scale"]
  assert got["kernel_q"].dtype == np.int8 and got["kernel_q"].shape == (256, 96) and scale.shape == (96,)
  np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
  want = torch.quantize_per_channel(torch.from_numpy(w), torch.from_numpy(scale).double(),
                                    torch.zeros(96, dtype=torch.long), axis=1, dtype=torch.qint8)
  np.testing.assert_array_equal(got["kernel_q"], want.int_repr().numpy())
  assert got["kernel_q"].min() >= -127 and np.abs(got["kernel_q"]).max() == 127
  deq = np.asarray(quant.dequantize_kernel(jnp.asarray(got["kernel_q"]), jnp.asarray(scale), "int8"))
  np.testing.assert_allclose(deq, want.dequantize().numpy(), rtol=1e-6, atol=1e-9)
  assert np.all(np.abs(deq - w) <= scale / 2 * (1 + 1e-5))


def test_int4_equals_torch_fake_quantize_per_group():
  w = weights((256, 48), seed=1)
  got = quant.quantize_kernel(w, "int4")
  q, scale = got["kernel_q"], got["kernel_scale"]
  assert q.dtype == np.uint8 and q.shape == (128, 48) and scale.shape == (4, 48)
  groups = w.reshape(4, 64, 48)
  np.testing.assert_allclose(scale, np.abs(groups).max(axis=1) / 7, rtol=1e-6)
  # torch: each (group, column) a channel of 64 values, quant range [-8, 7], zero point 0
  rows = torch.from_numpy(np.ascontiguousarray(groups.transpose(0, 2, 1).reshape(4 * 48, 64)))
  want = torch.fake_quantize_per_channel_affine(rows, torch.from_numpy(scale.reshape(-1)),
                                                torch.zeros(4 * 48, dtype=torch.int32), 0, -8, 7)
  want = want.numpy().reshape(4, 48, 64).transpose(0, 2, 1).reshape(256, 48)
  deq = np.asarray(quant.dequantize_kernel(jnp.asarray(q), jnp.asarray(scale), "int4"))
  np.testing.assert_allclose(deq, want, rtol=1e-6, atol=1e-9)
  # packing: row 2i in the high nibble, stored as q + 8
  ints = np.round(deq.reshape(4, 64, 48) / scale[:, None]).reshape(256, 48).astype(np.int64)
  assert ints.min() >= -8 and ints.max() <= 7
  np.testing.assert_array_equal(q, ((ints[0::2] + 8) << 4) | (ints[1::2] + 8))
  assert np.all(np.abs(deq - w) <= np.repeat(scale, 64, axis=0) / 2 * (1 + 1e-5))


def test_nf4_equals_bitsandbytes():
  bnb = pytest.importorskip("bitsandbytes.functional")
  w = weights((256, 80), seed=2)
  got = quant.quantize_kernel(w, "nf4")
  q, absmax = got["kernel_q"], got["kernel_scale"]
  np.testing.assert_array_equal(np.asarray(bnb.get_4bit_type("nf4", device="cpu")), quant.NF4_CODE)
  weight = torch.from_numpy(np.ascontiguousarray(w.T))  # torch Linear weight [out, in]
  packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4")
  assert not state.nested  # no double quantization, as ours
  np.testing.assert_array_equal(q, packed.numpy().reshape(80, 128).T)  # same codes, same nibble order
  np.testing.assert_array_equal(absmax, state.absmax.numpy().reshape(80, 4).T)
  want = bnb.dequantize_4bit(packed, state).numpy().T
  deq = np.asarray(quant.dequantize_kernel(jnp.asarray(q), jnp.asarray(absmax), "nf4"))
  np.testing.assert_array_equal(deq, want)
  half_gap = np.diff(quant.NF4_CODE).max() / 2
  assert np.all(np.abs(deq - w) <= np.repeat(absmax, 64, axis=0) * half_gap * (1 + 1e-5))


@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_scanned_leaf_is_per_layer_and_bf16_input_works(mode):
  w = np.stack([weights((128, 64), seed=s) for s in range(3)])  # [L, in, out]
  got = quant.quantize_kernel(w, mode)
  for layer in range(3):
    one = quant.quantize_kernel(w[layer], mode)
    for name in (quant.KERNEL_Q, quant.KERNEL_SCALE):
      np.testing.assert_array_equal(got[name][layer], one[name])
  deq = np.asarray(quant.dequantize_kernel(jnp.asarray(got["kernel_q"]), jnp.asarray(got["kernel_scale"]), mode,
                                           jnp.bfloat16))
  assert deq.dtype == jnp.bfloat16 and deq.shape == w.shape
  bf16 = quant.quantize_kernel(jnp.asarray(w, jnp.bfloat16), mode)
  assert bf16["kernel_q"].shape == got["kernel_q"].shape
  if mode != "int8":  # QuantDense's un-interleaved rows are the kernel's even and odd rows
    even, odd = quant.dequantize_halves(jnp.asarray(got["kernel_q"]), jnp.asarray(got["kernel_scale"]), mode)
    full = np.asarray(quant.dequantize_kernel(jnp.asarray(got["kernel_q"]), jnp.asarray(got["kernel_scale"]), mode))
    np.testing.assert_array_equal(np.asarray(even), full[:, 0::2])
    np.testing.assert_array_equal(np.asarray(odd), full[:, 1::2])


@pytest.mark.parametrize("mode,expected", [("int8", 1 + 4 / 4096), ("int4", 0.5 + 4 / 64), ("nf4", 0.5 + 4 / 64)])
def test_bytes_per_parameter_on_the_arrays(mode, expected):
  w = np.random.RandomState(0).randn(4096, 256).astype(np.float32)
  got = quant.quantize_kernel(w, mode)
  on_device = jax.device_put(got)
  nbytes = sum(int(a.nbytes) for a in jax.tree.leaves(on_device))
  assert nbytes / w.size == pytest.approx(expected, rel=1e-9)
  assert nbytes <= w.nbytes / (3.9 if mode == "int8" else 7.0)


def test_errors():
  with pytest.raises(ValueError, match="quantize='int3'"):
    RuntimeOptions(quantize="int3")
  with pytest.raises(ValueError, match="not a multiple of 64"):
    quant.quantize_kernel(np.zeros((96, 8), np.float32), "int4")
  with pytest.raises(ValueError, match="kernel"):
    quant.quantize_kernel(np.zeros((8,), np.float32), "int8")
  with pytest.raises(ValueError, match="no decoder"):
    quant.quantize_params({"vision_tower": {"kernel": np.zeros((64, 64))}}, "int8")
  zero = quant.quantize_kernel(np.zeros((64, 4), np.float32), "int8")  # an all-zero column: no NaN
  assert not np.any(zero["kernel_q"]) and not np.any(zero["kernel_scale"])


# ---------------------------------------------------------------------------------------------------------
# param trees and the model


@pytest.mark.parametrize("scan", [True, False])
def test_quantize_params_converts_exactly_the_decoder_linears(scan):
  fp = float_params(scan)
  before = flat(fp)
  qp = quant.quantize_params(fp, "int4")
  assert qp is fp  # in place: float leaves dropped as they are converted
  after = flat(qp)
  quantized = {k.rsplit("/", 1)[0] for k in after if k.endswith(quant.KERNEL_Q)}
  assert len(quantized) == 7 * (1 if scan else TEXT.num_hidden_layers)
  assert all(k.split("/")[-1] in TARGETS and k.startswith("language_model/") for k in quantized)
  for k, v in before.items():
    if k.rsplit("/", 1)[0] in quantized:
      assert k not in after
      np.testing.assert_array_equal(after[k[:-len("kernel")] + quant.KERNEL_Q],
                                    quant.quantize_kernel(v, "int4")[quant.KERNEL_Q])
    else:  # lm_head, embeddings, norms, vision tower, projector unchanged
      assert after[k] is v, k
  abstract = flat(jax.eval_shape(lambda: init_params(config(scan_layers=scan, quantize="int4"), jax.random.key(0))))
  assert {k: (v.shape, v.dtype) for k, v in after.items()} == {k: (v.shape, v.dtype) for k, v in abstract.items()}


def test_logical_axes_follow_the_kernel():
  fspecs = flat(logical_partition_specs(config()))
  for mode in QUANTIZE_MODES:
    specs = flat(logical_partition_specs(config(quantize=mode)))
    for k, spec in fspecs.items():
      if k.endswith("/kernel") and k.split("/")[-2] in TARGETS and k.startswith("language_model"):
        base = k[:-len("kernel")]
        assert tuple(specs[base + quant.KERNEL_Q]) == tuple(spec)
        want = (spec[0], spec[2]) if mode == "int8" else tuple(spec)
        assert tuple(specs[base + quant.KERNEL_SCALE]) == want, (mode, k)
      else:
        assert tuple(specs[k]) == tuple(spec), k


def test_random_init_is_the_quantized_float_init():
  """Unscanned (under nn.scan flax draws stacked keys differently once a layer's params change)."""
  fp = float_params(scan=False)
  qp = flat(init_params(config(scan_layers=False, quantize="nf4"), jax.random.key(0)))
  for k, v in flat(quant.quantize_params(fp, "nf4")).items():
    np.testing.assert_array_equal(np.asarray(qp[k]), v, err_msg=k)


@pytest.mark.parametrize("mode", QUANTIZE_MODES)
@pytest.mark.parametrize("scan", [True, False])
def test_quantized_model_computes_the_float_model_on_dequantized_weights(mode, scan):
  qp = quant.quantize_params(float_params(scan), mode)
  want = logits(config(scan_layers=scan), dequantized_tree(qp, mode))
  got = logits(config(scan_layers=scan, quantize=mode), qp)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
  fl = logits(config(scan_layers=scan), float_params(scan))
  assert np.abs(got - fl).max() > 1e-6  # quantization did change the weights
  if scan:  # bfloat16 compute: dequantized to bf16 inside the matmul
    bf = logits(config(scan_layers=scan, quantize=mode, dtype="bfloat16"), qp)
    np.testing.assert_allclose(bf, want, atol=0.05 * np.abs(want).max())


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_qlora_is_lora_on_the_dequantized_base(mode):
  lora = LoraConfig(rank=4, alpha=12.0, dropout=0.1)
  qp = quant.quantize_params(float_params(), mode)
  adapters = flat(jax.eval_shape(lambda: init_params(config(lora=lora, quantize=mode), jax.random.key(1))))
  rs = np.random.RandomState(3)
  extra = {k: rs.randn(*v.shape).astype(np.float32) * 0.3 for k, v in adapters.items() if "lora_" in k}
  assert len(extra) == 14
  qlora = traverse_util.unflatten_dict({**{tuple(k.split("/")): v for k, v in flat(qp).items()},
                                        **{tuple(k.split("/")): v for k, v in extra.items()}})
  assert set(flat(qlora)) == set(adapters)  # the QLoRA init tree: quantized base + adapters
  got = logits(config(lora=lora, quantize=mode), qlora)
  float_lora = traverse_util.unflatten_dict({**traverse_util.flatten_dict(dequantized_tree(qp, mode)),
                                             **{tuple(k.split("/")): v for k, v in extra.items()}})
  want = logits(config(lora=lora), float_lora)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
  assert np.abs(got - logits(config(quantize=mode), qp)).max() > 1e-2  # the adapters act
  assert lora_lib.adapter_paths(qlora) == lora_lib.adapter_paths(float_lora)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_sharded_on_eight_devices_equals_unsharded(mode):
  qp = quant.quantize_params(float_params(), mode)
  cfg = config(quantize=mode)
  want = logits(cfg, qp)
  mesh = parallel.make_mesh((2, 2, 2))
  shardings = parallel.logical_to_sharding(logical_partition_specs(cfg), mesh)
  sharded = jax.device_put(qp, shardings)
  gate = sharded["language_model"]["layers"]["mlp"]["gate_proj"]
  assert gate[quant.KERNEL_Q].sharding.spec == P(None, "fsdp", "tensor")
  assert gate[quant.KERNEL_SCALE].sharding.spec == (P(None, "tensor") if mode == "int8" else
                                                    P(None, "fsdp", "tensor"))
  ids, pixels, mask = inputs()
  batch = parallel.batch_sharding(mesh)
  assert ids.shape[0] % 4 == 0
  with parallel.mesh_context(mesh):
    got = jax.jit(LlavaModel(cfg).apply)({"params": sharded}, jax.device_put(ids, batch), pixels,
                                         jax.device_put(mask, batch))
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)
