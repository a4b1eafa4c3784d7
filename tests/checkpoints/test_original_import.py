"""load_pretrained on original LLaVA checkpoints (liuhaotian layout) and on CLIP + LLaMA (+ stage-1 projector)
directories, against transformers' LlavaForConditionalGeneration holding the same weights."""
import os

import numpy as np
import pytest
import torch

from llava_jax import load_pretrained
from llava_jax.checkpoints.hf import CheckpointKeyError
from llava_jax.checkpoints.layouts import original_llava_options
from tests import fixtures
from tests.fixtures import hf_checkpoints as H


@pytest.fixture(scope="module")
def linear_model():
  """Reference for the paper's linear projector: HF projector with act = identity, linear_2 = I, bias 0.
  Its vocabulary has 3 rows beyond the config's 128, as paper-era checkpoints (<im_patch>, <im_start>, <im_end>)."""
  model = H.tiny_llava(seed=10, text=dict(vocab_size=131))
  fixtures.make_linear_projector(model)
  return model


@pytest.fixture(scope="module")
def mlp_model():
  return H.tiny_llava(seed=11)


def _write_original(d, model, *, linear, vision_prefix=None, extra=None, **mm):
  sd = {**H.llama_state(model), **H.projector_state(model, linear=linear)}
  if vision_prefix:
    sd.update(H.vision_state(model, vision_prefix))
  sd.update(extra or {})
  H.write_safetensors(d, sd, shards=2)
  H.write_config(d, H.original_llava_config(model, **mm))
  return d


def test_linear_with_separate_clip_vision_model_dir(linear_model, tmp_path):
  d = _write_original(str(tmp_path / "llava"), linear_model, linear=True, vocab_size=128, mm_use_im_start_end=True)
  clip = H.save_clip_vision(linear_model, str(tmp_path / "clip"))
  config, params = load_pretrained(d, vision_tower=clip)
  assert config.projector_type == "linear" and config.image_token_index == -200  # no mm_projector_type: 'linear'
  assert config.text.vocab_size == 131 and params["language_model"]["lm_head"]["kernel"].shape == (64, 131)
  assert config.vision_feature_select_strategy == "default" and config.vision_feature_layer == -2
  assert "linear_2" not in params["multi_modal_projector"]
  H.check_against(linear_model, config, params)
  assert original_llava_options(d) == {"image_aspect_ratio": "pad", "mm_use_im_start_end": True,
                                       "mm_use_im_patch_token": False, "tokenizer_model_max_length": None,
                                       "mm_vision_tower": "openai/clip-tiny"}


def test_full_clip_model_dir_wins_over_tower_in_checkpoint(tmp_path):
  model = H.tiny_llava(seed=12, vision_feature_layer=-1, vision_feature_select_strategy="full")
  junk = {k: torch.zeros_like(v) for k, v in H.vision_state(model, "model.vision_tower.vision_tower.vision_model.").items()}
  d = _write_original(str(tmp_path / "llava"), model, linear=False, extra=junk, mm_projector_type="mlp2x_gelu",
                      mm_vision_select_layer=-1, mm_vision_select_feature="cls_patch")
  clip = H.save_clip_full(model, str(tmp_path / "clip"))  # vision_model.* plus text_model.*, projections, logit_scale
  config, params = load_pretrained(d, vision_tower=clip)
  assert config.vision_feature_layer == -1 and config.vision_feature_select_strategy == "full"
  H.check_against(model, config, params)


def test_vision_tower_inside_checkpoint_config_from_shapes(tmp_path):
  """Self-trained checkpoints hold the tower; with no CLIP dir its config is read off the tensor shapes
  (heads = hidden // 64, CLIP's head size)."""
  model = H.tiny_llava(seed=13, vision=dict(hidden_size=128, num_attention_heads=2, intermediate_size=64))
  inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(2)}
  d = _write_original(str(tmp_path / "llava"), model, linear=False, extra=inv_freq, mm_projector_type="mlp2x_gelu",
                      vision_prefix="model.vision_tower.vision_tower.vision_model.")
  config, params = load_pretrained(d)
  assert config.vision.num_attention_heads == 2 and config.vision.num_hidden_layers == 3
  assert config.vision.image_size == 28 and config.vision.patch_size == 7
  H.check_against(model, config, params)


def test_config_only_vision_dir_states_heads(mlp_model, tmp_path):
  d = _write_original(str(tmp_path / "llava"), mlp_model, linear=False, mm_projector_type="mlp2x_gelu",
                      vision_prefix="model.vision_tower.vision_tower.vision_model.")
  cfg_dir = str(tmp_path / "clipcfg")
  os.makedirs(cfg_dir)
  mlp_model.config.vision_config.to_json_file(os.path.join(cfg_dir, "config.json"))
  config, params = load_pretrained(d, vision_tower=cfg_dir)
  assert config.vision.num_attention_heads == 4
  H.check_against(mlp_model, config, params)


def test_missing_vision_tower_is_a_clear_error(mlp_model, tmp_path):
  d = _write_original(str(tmp_path / "llava"), mlp_model, linear=False, mm_projector_type="mlp2x_gelu")
  with pytest.raises(ValueError, match=r"no vision tower.*vision_tower=.*openai/clip-tiny"):
    load_pretrained(d)


def test_projector_type_disagreeing_with_weights(mlp_model, tmp_path):
  d = _write_original(str(tmp_path / "llava"), mlp_model, linear=False, mm_projector_type="linear")
  with pytest.raises(ValueError, match="mm_projector_type='linear'.*'mlp2x_gelu'"):
    load_pretrained(d, vision_tower=H.save_clip_vision(mlp_model, str(tmp_path / "clip")))


# ---------------------------------------------------------------------------------------------------------
# CLIP + LLaMA (+ stage-1 projector)


@pytest.fixture(scope="module")
def parts(mlp_model, tmp_path_factory):
  """A LlamaForCausalLM directory and a CLIPVisionModel directory holding the llava model's weights."""
  import transformers
  root = tmp_path_factory.mktemp("parts")
  llama = transformers.LlamaForCausalLM(mlp_model.config.text_config)
  missing = llama.load_state_dict(H.llama_state(mlp_model))
  assert not missing.missing_keys and not missing.unexpected_keys
  llama.save_pretrained(str(root / "llama"))
  return str(root / "llama"), H.save_clip_vision(mlp_model, str(root / "clip"))


@pytest.mark.parametrize("fmt,prefix", [("bin", "model.mm_projector"), ("safetensors", "mm_projector")])
def test_clip_llama_and_stage1_projector(mlp_model, parts, tmp_path, fmt, prefix):
  llama, clip = parts
  proj = H.projector_state(mlp_model, prefix=prefix)
  path = str(tmp_path / f"mm_projector.{fmt}")
  if fmt == "bin":
    torch.save(proj, path)
    with pytest.raises(ValueError, match="allow_pickle"):
      load_pretrained(llama, vision_tower=clip, projector=path)
  else:
    from safetensors.torch import save_file
    save_file(proj, path)
  config, params = load_pretrained(llama, vision_tower=clip, projector=path, allow_pickle=fmt == "bin",
                                   config_overrides=dict(image_token_index=-200))
  assert config.projector_type == "mlp2x_gelu" and config.image_token_index == -200
  H.check_against(mlp_model, config, params)


def test_clip_llama_fresh_projector_is_seeded(mlp_model, parts):
  llama, clip = parts
  with pytest.raises(ValueError, match="projector_type="):
    load_pretrained(llama, vision_tower=clip)
  with pytest.raises(ValueError, match="vision_tower="):
    load_pretrained(llama, projector_type="linear")
  config, a = load_pretrained(llama, vision_tower=clip, projector_type="linear", seed=0)
  _, b = load_pretrained(llama, vision_tower=clip, projector_type="linear", seed=0)
  _, c = load_pretrained(llama, vision_tower=clip, projector_type="linear", seed=1)
  ka, kb, kc = (np.asarray(p["multi_modal_projector"]["linear_1"]["kernel"]) for p in (a, b, c))
  assert ka.shape == (32, 64) and "linear_2" not in a["multi_modal_projector"]
  np.testing.assert_array_equal(ka, kb)
  assert not np.allclose(ka, kc) and np.std(ka) > 0
  # the towers are the checkpoints' own weights
  sd = H.state_dict(mlp_model)
  np.testing.assert_array_equal(np.asarray(a["language_model"]["lm_head"]["kernel"]), sd["lm_head.weight"].numpy().T)
  np.testing.assert_array_equal(np.asarray(a["vision_tower"]["embeddings"]["class_embedding"]),
                                sd["model.vision_tower.embeddings.class_embedding"].numpy())


def test_projector_file_with_wrong_keys(parts, tmp_path):
  llama, clip = parts
  from safetensors.torch import save_file
  path = str(tmp_path / "p.safetensors")
  save_file({"projector.weight": torch.zeros(64, 32)}, path)
  with pytest.raises(ValueError, match="no 'model.mm_projector"):
    load_pretrained(llama, vision_tower=clip, projector=path)


def test_clip_dir_with_unknown_tensors(parts, tmp_path):
  llama, clip = parts
  import shutil
  from safetensors.torch import load_file, save_file
  bad = str(tmp_path / "clip")
  shutil.copytree(clip, bad)
  sd = load_file(os.path.join(bad, "model.safetensors"))
  sd["encoder.layers.9.mlp.fc1.weight"] = torch.zeros(2, 2)
  save_file(sd, os.path.join(bad, "model.safetensors"))
  with pytest.raises(CheckpointKeyError, match=r"vision tower .*unknown tensor\(s\): encoder.layers.9.mlp.fc1.weight"):
    load_pretrained(llama, vision_tower=bad, projector_type="linear")
