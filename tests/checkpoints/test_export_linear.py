"""The paper's 'linear' projector exported to llava-hf's fixed linear_1 → act → linear_2 projector: act 'linear'
(transformers' identity), linear_2 = I with zero bias. transformers reloads it with our logits, and
load_pretrained collapses it back to 'linear' (only when linear_2 is exactly the identity with zero bias)."""
import json
import os

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from llava_jax import LlavaConfig, export_hf, load_pretrained
from llava_jax.models.llava import abstract_params
from llava_jax.config import TextConfig, VisionConfig
from tests.fixtures import hf_checkpoints as H

IMAGE = 95


def _config(bias=True):
  return LlavaConfig(
      vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=28, patch_size=7),
      text=TextConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
      projector_type="linear", projector_bias=bias, image_token_index=IMAGE)


def _random_params(config, seed):
  """Random values in the model's param shapes (norm scales around 1)."""
  shapes, _ = abstract_params(config)
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.randn(*s.shape).astype(np.float32) * 0.1 + (len(s.shape) == 1)),
                      shapes)


def _reload(out):
  import transformers
  model, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  return model.eval()


def _assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_linear_projector_reloads_in_transformers_with_our_logits(tmp_path):
  config = _config()
  params = _random_params(config, seed=4)
  out = export_hf(config, params, str(tmp_path / "lin"))
  assert json.load(open(os.path.join(out, "config.json")))["projector_hidden_act"] == "linear"
  model = _reload(out)
  proj = model.model.multi_modal_projector
  x = torch.randn(3, 64)
  assert model.config.projector_hidden_act == "linear" and torch.equal(proj.act(x), x)
  assert torch.equal(proj.linear_2.weight, torch.eye(64)) and torch.equal(proj.linear_2.bias, torch.zeros(64))
  ours = params["multi_modal_projector"]["linear_1"]
  np.testing.assert_array_equal(proj.linear_1.weight.detach().numpy(), np.asarray(ours["kernel"]).T)
  np.testing.assert_array_equal(proj.linear_1.bias.detach().numpy(), np.asarray(ours["bias"]))
  ids, mask, pixels = H.inputs(config.num_image_tokens, image_token=IMAGE)
  H.assert_logits_close(H.our_logits(config, params, ids, mask, pixels, image_token=IMAGE),
                        H.reference_logits(model, ids, mask, pixels), mask)

  config2, params2 = load_pretrained(out)  # collapsed back: same config, same params, no linear_2
  assert config2 == config and "linear_2" not in params2["multi_modal_projector"]
  _assert_same_params(params, params2)


@pytest.mark.parametrize("bias, dtype", [(False, None), (True, "bfloat16")])
def test_linear_round_trip_without_bias_and_in_bfloat16(tmp_path, bias, dtype):
  config = _config(bias)
  params = _random_params(config, seed=5)
  out = export_hf(config, params, str(tmp_path / "lin"), dtype=dtype)
  from safetensors.numpy import load_file
  tensors = load_file(os.path.join(out, "model.safetensors"))
  w2 = tensors["multi_modal_projector.linear_2.weight"]
  assert w2.dtype == tensors["multi_modal_projector.linear_1.weight"].dtype
  np.testing.assert_array_equal(w2.astype(np.float32), np.eye(64, dtype=np.float32))
  assert ("multi_modal_projector.linear_2.bias" in tensors) == bias
  _reload(out)  # transformers finds exactly the tensors it expects
  config2, params2 = load_pretrained(out)
  assert config2.projector_type == "linear" and config2.projector_bias == bias
  want = params if dtype is None else jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  _assert_same_params(want, jax.tree.map(lambda x: x.astype(jnp.float32), params2))


def _rewrite(out, key, change):
  from safetensors.numpy import load_file, save_file
  path = os.path.join(out, "model.safetensors")
  tensors = load_file(path)
  tensors[key] = change(tensors[key])
  save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("key, change, message", [
    ("multi_modal_projector.linear_2.weight", lambda w: w * 2, "linear_2.weight is not the identity"),
    ("multi_modal_projector.linear_2.bias", lambda b: b + 1e-3, "linear_2.bias is not zero"),
])
def test_linear_act_collapses_only_an_exact_identity(tmp_path, key, change, message):
  """A 'linear' act with any other linear_2 is two Dense layers without an activation: no LLaVA projector."""
  out = export_hf(_config(), _random_params(_config(), seed=6), str(tmp_path / "lin"))
  _rewrite(out, key, change)
  with pytest.raises(ValueError, match=message):
    load_pretrained(out)


def test_transformers_saved_linear_act_with_random_linear_2_is_refused(tmp_path):
  model = H.tiny_llava(seed=22, projector_hidden_act="linear")
  d = H.save_llava_hf(model, str(tmp_path / "saved"))
  with pytest.raises(ValueError, match="linear_2.weight is not the identity"):
    load_pretrained(d)
  with pytest.raises(ValueError, match="vision_tower= is for original LLaVA"):
    load_pretrained(d, vision_tower=str(tmp_path))
