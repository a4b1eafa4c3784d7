"""export_hf → transformers' LlavaForConditionalGeneration.from_pretrained gives the same weights and logits."""
import json
import os

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from llava_jax import LlavaConfig, export_hf, load_pretrained
from llava_jax.config import RopeScaling, RuntimeOptions, TextConfig, VisionConfig
from llava_jax.models.llava import abstract_params
from tests.fixtures import hf_checkpoints as H


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  model = H.tiny_llava(seed=20)
  d = H.save_llava_hf(model, str(tmp_path_factory.mktemp("src")), "hub")
  config, params = load_pretrained(d)
  return model, config, params


def _reload(out):
  import transformers
  model, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  return model.eval()


def test_export_sharded_with_tokenizer_reloads_in_transformers(loaded, tmp_path, tiny_tokenizer):
  model, config, params = loaded
  out = export_hf(config, params, str(tmp_path / "out"), tokenizer=tiny_tokenizer, max_shard_bytes=40_000)
  names = os.listdir(out)
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  shards = sorted(n for n in names if n.endswith(".safetensors"))
  assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
  assert "tokenizer.model" in names or "tokenizer.json" in names
  reloaded = _reload(out)
  ref, new = model.state_dict(), reloaded.state_dict()
  assert set(ref) == set(new)
  for k in ref:
    assert torch.equal(ref[k], new[k]), k
  ids, mask, pixels = H.inputs(config.num_image_tokens)
  H.assert_logits_close(H.reference_logits(reloaded, ids, mask, pixels), H.reference_logits(model, ids, mask, pixels), mask)
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(out)
  text = "USER: What color is the square? ASSISTANT:"
  assert tok(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_export_then_load_is_exact_and_unscanned_exports_the_same(loaded, tmp_path):
  model, config, params = loaded
  out = export_hf(config, params, str(tmp_path / "a"))
  assert os.listdir(out).count("model.safetensors") == 1
  config2, params2 = load_pretrained(out)
  assert config2 == config
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
  _, flat = load_pretrained(out, runtime=RuntimeOptions(scan_layers=False))
  out_b = export_hf(config.with_runtime(scan_layers=False), flat, str(tmp_path / "b"))
  from safetensors.numpy import load_file
  a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(out_b, "model.safetensors"))
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_bfloat16_export(loaded, tmp_path):
  model, config, params = loaded
  out = export_hf(config, params, str(tmp_path / "bf16"), dtype="bfloat16")
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
  from safetensors.torch import load_file
  sd = load_file(os.path.join(out, "model.safetensors"))
  w = sd["language_model.model.layers.1.mlp.down_proj.weight"]
  assert w.dtype == torch.bfloat16
  ref = model.state_dict()["model.language_model.layers.1.mlp.down_proj.weight"]
  assert torch.equal(w, ref.to(torch.bfloat16))


def _random_params(config, seed):
  """Random values in the model's param shapes (cheaper than compiling the model's init)."""
  shapes, _ = abstract_params(config)
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.randn(*s.shape).astype(np.float32) * 0.1 + (len(s.shape) == 1 and 1.0)),
                      shapes)


def test_tied_gqa_llama3_rope_config_survives_export(tmp_path):
  """Fields transformers must read back: tied head, GQA, head_dim, llama3 rope scaling, feature layer list."""
  config = LlavaConfig(
      vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=28, patch_size=14),
      text=TextConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=32, max_position_embeddings=256, rope_theta=500000.0,
                      rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=16),
                      tie_word_embeddings=True),
      image_token_index=95, vision_feature_layer=(-2, -1), vision_feature_select_strategy="full")
  params = _random_params(config, seed=3)
  out = export_hf(config, params, str(tmp_path / "t"))
  reloaded = _reload(out)
  assert reloaded.lm_head.weight.data_ptr() == reloaded.model.language_model.embed_tokens.weight.data_ptr()
  ids, mask, pixels = H.inputs(config.num_image_tokens, image_token=95, length=30)
  ids[0, -3:] = [60, 61, 62]
  H.assert_logits_close(H.our_logits(config, params, ids, mask, pixels, image_token=95),
                        H.reference_logits(reloaded, ids, mask, pixels), mask)
  config2, params2 = load_pretrained(out)
  assert config2 == config


def test_configs_llava_hf_cannot_express(loaded, tmp_path):
  _, config, params = loaded
  with pytest.raises(ValueError, match="'mlp3x_gelu' cannot be exported"):  # 'linear': test_export_linear.py
    export_hf(config.replace(projector_type="mlp3x_gelu"), params, str(tmp_path / "x"))
  with pytest.raises(ValueError, match="image_token_index -200 is outside the vocabulary"):
    export_hf(config.replace(image_token_index=-200), params, str(tmp_path / "y"))
