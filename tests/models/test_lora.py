"""LoRA on the decoder (models/lora.py): off = the base model bit for bit, a fresh adapter (B = 0) = the base
model, merged = unmerged, scanned = unscanned, remat = no remat, dropout on the adapter input only, PEFT's init.
The PEFT oracle (our logits = PeftModel's on the same adapter) is in tests/checkpoints/test_peft.py."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util

from llava_jax.config import LlavaConfig, LoraConfig, RuntimeOptions, TextConfig, VisionConfig
from llava_jax.models import lora as lora_lib
from llava_jax.models.llava import LlavaModel, init_params, logical_partition_specs

VISION = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                      patch_size=8)
TEXT = TextConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2)
IMAGE = 95
LORA = LoraConfig(rank=4, alpha=12.0, dropout=0.1)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config(lora=None, **runtime):
  return LlavaConfig(vision=VISION, text=TEXT, image_token_index=IMAGE,
                     runtime=RuntimeOptions(lora=lora, **runtime))


def inputs():
  k = config().num_image_tokens
  ids = np.array([[1, 5] + [IMAGE] * k + [7, 8, 9, 10], [1, 11, 12, 13, 14] + [0] * (k + 1)], np.int32)
  mask = (np.arange(ids.shape[1])[None] < np.array([[ids.shape[1]], [5]])).astype(np.int32)
  pixels = np.random.RandomState(0).randn(1, 16, 16, 3).astype(np.float32)
  return jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)


def logits(cfg, params):
  return np.asarray(jax.jit(LlavaModel(cfg).apply)({"params": params}, *inputs()))


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def randomize_adapters(params, seed=1, scale=0.3):
  """Nonzero B (and new A) everywhere, so a wrong formula shows in the logits."""
  rs = np.random.RandomState(seed)
  out = {p: (rs.randn(*v.shape).astype(np.float32) * scale if p.endswith(("lora_a", "lora_b")) else v)
         for p, v in flat(params).items()}
  return traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in out.items()})


def unscan(params, num_layers):
  """A scanned tree's 'layers' subtrees [L, ...] → 'layers_i' subtrees (the unscanned layout)."""
  out = {}
  for path, v in traverse_util.flatten_dict(params).items():
    if "layers" in path:
      i = path.index("layers")
      for layer in range(num_layers if path[0] == "language_model" else VISION.num_hidden_layers):
        out[path[:i] + (f"layers_{layer}",) + path[i + 1:]] = np.asarray(v[layer])
    else:
      out[path] = v
  return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def base_params():
  return init_params(config(), jax.random.key(0))


@pytest.fixture(scope="module")
def lora_params():
  return init_params(config(LORA), jax.random.key(0))


def test_lora_off_and_untargeted_lora_are_the_base_model(base_params):
  nothing = config(LoraConfig(rank=4, alpha=8.0, target="no_such_module"))
  p = init_params(nothing, jax.random.key(0))
  fb, fp = flat(base_params), flat(p)
  assert fb.keys() == fp.keys() and not any("lora" in k for k in fb)
  for k in fb:
    np.testing.assert_array_equal(fp[k], fb[k], err_msg=k)
  np.testing.assert_array_equal(logits(nothing, p), logits(config(), base_params))


def test_lora_tree_shapes_and_logical_axes(base_params, lora_params):
  fb, fl = flat(base_params), flat(lora_params)
  added = sorted(set(fl) - set(fb))
  assert set(fb) <= set(fl)
  blocks = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
  assert added == sorted(f"language_model/layers/{blocks[n]}/{n}/{ab}" for n in TARGETS for ab in ("lora_a", "lora_b"))
  specs = flat(logical_partition_specs(config(LORA)))
  for n in TARGETS:
    base = f"language_model/layers/{blocks[n]}/{n}/"
    l, d_in, d_out = fl[base + "kernel"].shape
    assert fl[base + "lora_a"].shape == (l, d_in, 4) and fl[base + "lora_b"].shape == (l, 4, d_out)
    kernel_axes = tuple(specs[base + "kernel"])
    assert tuple(specs[base + "lora_a"]) == ("layers", kernel_axes[1], None)
    assert tuple(specs[base + "lora_b"]) == ("layers", None, kernel_axes[2])


def test_peft_init_and_fresh_adapter_computes_the_base_model(base_params, lora_params):
  fl = flat(lora_params)
  for path, v in fl.items():
    if path.endswith("lora_b"):
      assert not np.any(v), path
    elif path.endswith("lora_a"):  # torch kaiming_uniform_(a=√5) on [r, in]: U(-1/√in, 1/√in)
      bound = 1 / np.sqrt(v.shape[-2])
      assert np.abs(v).max() <= bound and np.abs(v).max() > 0.8 * bound, path
      np.testing.assert_allclose(np.std(v), bound / np.sqrt(3), rtol=0.25, err_msg=path)
  base = lora_lib.strip_lora(lora_params)
  np.testing.assert_array_equal(logits(config(LORA), lora_params), logits(config(), base))


def test_unscanned_lora_keeps_the_base_init(base_params):
  """Unscanned, adding adapters leaves every base param's random init unchanged (under nn.scan flax draws the
  stacked params' keys differently once a layer holds more params; loaded weights are unaffected)."""
  base = init_params(config(scan_layers=False), jax.random.key(0))
  with_lora = flat(init_params(config(LORA, scan_layers=False), jax.random.key(0)))
  for k, v in flat(base).items():
    np.testing.assert_array_equal(with_lora[k], v, err_msg=k)


def test_merged_equals_adapter_and_scan_equals_unscanned(lora_params):
  params = randomize_adapters(lora_params)
  ours = logits(config(LORA), params)
  base = logits(config(), lora_lib.strip_lora(params))
  assert np.abs(ours - base).max() > 1e-2  # the adapters do something
  merged = lora_lib.merge_lora(params, LORA)
  assert not any("lora" in k for k in flat(merged))
  np.testing.assert_allclose(logits(config(), merged), ours, rtol=0, atol=2e-5)
  unscanned = unscan(params, TEXT.num_hidden_layers)
  np.testing.assert_allclose(logits(config(LORA, scan_layers=False), unscanned), ours, rtol=0, atol=2e-5)
  np.testing.assert_allclose(logits(config(LORA, remat_policy="full"), params), ours, rtol=0, atol=2e-5)


def test_remat_gradients_equal_and_only_adapters_in_the_delta(lora_params):
  params = randomize_adapters(lora_params)
  ids, pixels, mask = inputs()

  def loss(p, cfg):
    return jnp.mean(LlavaModel(cfg).apply({"params": p}, ids, pixels, mask) ** 2)

  g = flat(jax.jit(jax.grad(lambda p: loss(p, config(LORA))))(params))
  g_remat = flat(jax.jit(jax.grad(lambda p: loss(p, config(LORA, remat_policy="full"))))(params))
  for k in g:
    np.testing.assert_allclose(g_remat[k], g[k], rtol=0, atol=1e-6 + 1e-4 * np.abs(g[k]).max(), err_msg=k)
  for k in g:
    if k.endswith(("lora_a", "lora_b")):
      assert np.abs(g[k]).max() > 0, k


def test_dropout_acts_on_the_adapter_input_only():
  """A = B = I, scale 1: delta = dropout(x), whose entries are 0 or x / (1 − p) (torch's inverted dropout); the
  base path x·W never sees the mask; without a 'dropout' rng the layer is deterministic."""
  p, d = 0.5, 8
  cfg = LoraConfig(rank=d, alpha=float(d), dropout=p, target=".*")
  layer = lora_lib.LoraDense(d, cfg, ("embed", "mlp"), name="q_proj")
  x = jnp.asarray(np.random.RandomState(0).randn(4, 16, d).astype(np.float32)) + 3.0  # no zeros in x
  params = nn.unbox(layer.init(jax.random.key(0), x)["params"])
  w = params["kernel"]
  params = dict(params, lora_a=jnp.eye(d), lora_b=jnp.eye(d))
  base = np.asarray(x @ w)
  np.testing.assert_allclose(np.asarray(layer.apply({"params": params}, x)), base + np.asarray(x), atol=1e-5)
  delta = np.asarray(layer.apply({"params": params}, x, rngs={"dropout": jax.random.key(3)})) - base
  xs = np.asarray(x)
  dropped = np.abs(delta) < 1e-5
  np.testing.assert_allclose(delta[~dropped], xs[~dropped] / (1 - p), rtol=1e-5)
  assert 0.35 < dropped.mean() < 0.65
  no_adapter = dict(params, lora_b=jnp.zeros((d, d)))
  np.testing.assert_array_equal(np.asarray(layer.apply({"params": no_adapter}, x, rngs={"dropout": jax.random.key(3)})),
                                base)


def test_lora_config_errors():
  with pytest.raises(ValueError, match="rank"):
    LoraConfig(rank=0)
  with pytest.raises(ValueError, match="dropout"):
    LoraConfig(dropout=1.0)
  assert RuntimeOptions(lora=dict(rank=8, alpha=16.0)).lora == LoraConfig(rank=8, alpha=16.0)
  assert LoraConfig(rank=128, alpha=256).scale == 2.0
