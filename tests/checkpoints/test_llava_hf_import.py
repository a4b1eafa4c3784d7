"""load_pretrained on llava-hf directories in every key layout (and pickle), against transformers' logits."""
import json
import os

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from llava_jax import load_pretrained
from llava_jax.checkpoints.hf import CheckpointFormatError, CheckpointKeyError
from llava_jax.models.llava import param_shardings
from llava_jax.checkpoints.layouts import llava_hf_config
from llava_jax.checkpoints.table import get_in
from llava_jax.parallel import make_mesh
from tests.fixtures import hf_checkpoints as H


@pytest.fixture(scope="module")
def model():
  return H.tiny_llava(seed=0)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
  return H.save_llava_hf(model, str(tmp_path_factory.mktemp("saved")), "saved")


def test_save_pretrained_layout_is_what_we_expect(saved):
  """transformers 5 writes language_model.model.* and vision_tower.* without vision_model (checked, not assumed)."""
  from llava_jax.checkpoints.reader import TensorReader
  keys = TensorReader(saved).keys()
  assert "vision_tower.embeddings.class_embedding" in keys
  assert "language_model.model.embed_tokens.weight" in keys and "language_model.lm_head.weight" in keys
  assert not any(k.startswith(("vision_tower.vision_model.", "model.")) for k in keys)


@pytest.mark.parametrize("layout,shards", [("saved", 1), ("hub", 1), ("hub", 3), ("in_memory", 1),
                                           ("in_memory_4x", 2)])
def test_layouts_give_reference_logits(model, saved, tmp_path, layout, shards):
  d = saved if layout == "saved" else H.save_llava_hf(model, str(tmp_path / layout), layout, shards)
  if shards > 1:
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
  config, params = load_pretrained(d)
  assert config.image_token_index == H.IMAGE and config.projector_type == "mlp2x_gelu"
  assert config.vision.num_hidden_layers == 3 and config.text.num_key_value_heads == 2
  H.check_against(model, config, params)


def test_unscanned_params_and_image_token_id_spelling(model, tmp_path):
  d = H.save_llava_hf(model, str(tmp_path / "hub"), "hub")
  cfg = json.load(open(os.path.join(d, "config.json")))
  cfg["image_token_id"] = cfg.pop("image_token_index")  # newer transformers spelling
  json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
  from llava_jax.config import RuntimeOptions
  config, params = load_pretrained(d, runtime=RuntimeOptions(scan_layers=False))
  assert config.image_token_index == H.IMAGE
  assert "layers_1" in params["language_model"] and "layers" not in params["language_model"]
  H.check_against(model, config, params)


def test_feature_layer_list_and_full_strategy(tmp_path):
  model = H.tiny_llava(seed=1, vision_feature_layer=[-3, -1], vision_feature_select_strategy="full")
  d = H.save_llava_hf(model, str(tmp_path / "m"), "saved")
  config, params = load_pretrained(d)
  assert config.vision_feature_layer == (-3, -1) and config.vision_feature_select_strategy == "full"
  H.check_against(model, config, params)


def test_bfloat16_checkpoint_reads_exact_values(model, tmp_path):
  sd = {k: v.to(torch.bfloat16) for k, v in H.rename(H.state_dict(model), H.HUB).items()}
  H.write_safetensors(str(tmp_path), sd)
  model.config.to_json_file(str(tmp_path / "config.json"))
  config, params = load_pretrained(str(tmp_path), dtype="float32")
  embed = np.asarray(params["language_model"]["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(embed, sd["language_model.model.embed_tokens.weight"].float().numpy())
  q = np.asarray(params["vision_tower"]["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"][1])
  np.testing.assert_array_equal(q, sd["vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight"].float().numpy().T)
  config16, params16 = load_pretrained(str(tmp_path), dtype="bfloat16")
  assert config16.runtime.param_dtype == "bfloat16" and config16.runtime.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
  np.testing.assert_array_equal(np.asarray(params16["language_model"]["embed_tokens"]["embedding"]).view(np.uint16),
                                sd["language_model.model.embed_tokens.weight"].view(torch.int16).numpy().view(np.uint16))


@pytest.mark.parametrize("shards", [1, 2])
def test_pickle_needs_the_flag_then_matches(model, tmp_path, shards):
  H.write_pickle(str(tmp_path), H.rename(H.state_dict(model), H.HUB), shards)
  model.config.to_json_file(str(tmp_path / "config.json"))
  with pytest.raises(CheckpointFormatError, match="allow_pickle=True"):
    load_pretrained(str(tmp_path))
  config, params = load_pretrained(str(tmp_path), allow_pickle=True)
  H.check_against(model, config, params)


def test_unknown_and_missing_keys_are_named(model, tmp_path):
  sd = H.rename(H.state_dict(model), H.HUB)
  del sd["language_model.model.layers.1.mlp.up_proj.weight"]
  sd["language_model.model.layers.1.mlp.extra_proj.weight"] = torch.zeros(2, 2)
  sd["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)  # harmless: skipped
  sd["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # harmless: skipped
  H.write_safetensors(str(tmp_path), sd)
  model.config.to_json_file(str(tmp_path / "config.json"))
  with pytest.raises(CheckpointKeyError) as err:
    load_pretrained(str(tmp_path))
  msg = str(err.value)
  assert "1 unknown tensor(s): language_model.model.layers.1.mlp.extra_proj.weight" in msg
  assert "1 missing tensor(s): language_model.model.layers.1.mlp.up_proj.weight" in msg
  assert "inv_freq" not in msg and "position_ids" not in msg


def test_long_key_lists_are_truncated(model, tmp_path):
  sd = {k: v for k, v in H.rename(H.state_dict(model), H.HUB).items() if not k.startswith("vision_tower.")}
  H.write_safetensors(str(tmp_path), sd)
  model.config.to_json_file(str(tmp_path / "config.json"))
  with pytest.raises(CheckpointKeyError, match=r"missing tensor\(s\): .* and \d+ more"):
    load_pretrained(str(tmp_path))


def test_config_and_weights_disagree_is_a_shape_error(model, tmp_path):
  d = H.save_llava_hf(model, str(tmp_path / "m"), "hub")
  cfg = json.load(open(os.path.join(d, "config.json")))
  cfg["text_config"]["intermediate_size"] = 96
  json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
  with pytest.raises(ValueError, match=r"gate_proj.*shape \(2, 64, 128\).*\(2, 64, 96\)"):
    load_pretrained(d)


def test_partial_hub_config_uses_transformers_defaults():
  """A hub config.json omits fields; they take transformers' defaults, not ours."""
  cfg = {"model_type": "llava", "text_config": {"model_type": "llama", "vocab_size": 32064},
         "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "num_attention_heads": 16,
                           "num_hidden_layers": 24, "patch_size": 14, "model_type": "clip_vision_model"},
         "image_token_index": 32000}
  from transformers import LlavaConfig as HFLlavaConfig
  ref = HFLlavaConfig.from_dict(cfg)
  ours = llava_hf_config(cfg, 2)
  assert ours.text.rms_norm_eps == ref.text_config.rms_norm_eps == 1e-6
  assert ours.text.max_position_embeddings == ref.text_config.max_position_embeddings
  assert ours.text.num_key_value_heads == ref.text_config.num_key_value_heads
  assert ours.text.rope_theta == ref.text_config.rope_parameters["rope_theta"]
  assert ours.vision.layer_norm_eps == ref.vision_config.layer_norm_eps
  assert ours.vision.num_channels == ref.vision_config.num_channels
  assert (ours.vision_feature_layer, ours.vision_feature_select_strategy) == (ref.vision_feature_layer,
                                                                               ref.vision_feature_select_strategy)


def test_loading_onto_a_mesh_places_each_leaf_on_its_sharding(model, saved):
  mesh = make_mesh((2, 2, 2))
  config, params = load_pretrained(saved, mesh=mesh)
  expected = param_shardings(config, mesh)
  flat = jax.tree_util.tree_leaves_with_path(params)
  exp = dict(jax.tree_util.tree_leaves_with_path(expected, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))
  assert len(flat) == len(exp)
  for path, leaf in flat:
    assert leaf.sharding.is_equivalent_to(exp[path], leaf.ndim), (jax.tree_util.keystr(path), leaf.sharding)
  lm = params["language_model"]
  assert lm["embed_tokens"]["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert lm["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert len(lm["layers"]["mlp"]["gate_proj"]["kernel"].addressable_shards[0].data.shape) == 3
  assert lm["layers"]["mlp"]["gate_proj"]["kernel"].addressable_shards[0].data.shape == (2, 32, 64)
  H.check_against(model, config, params)


def test_streams_leaf_by_leaf(model, saved, monkeypatch):
  """Each leaf is placed on its device before the next leaf's tensors are read: between two placements
  only one leaf's rows (its layer slices) are read."""
  from llava_jax.checkpoints import hf, reader
  events = []
  get, place = reader.TensorReader.get, hf._place
  monkeypatch.setattr(reader.TensorReader, "get", lambda self, k: events.append(("read", k)) or get(self, k))
  monkeypatch.setattr(hf, "_place", lambda leaf, sh, path: events.append(("place", path)) or place(leaf, sh, path))
  config, params = load_pretrained(saved)
  reads_between, n = [], 0
  for kind, _ in events:
    if kind == "read":
      n += 1
    else:
      reads_between.append(n)
      n = 0
  assert n == 0 and len(reads_between) == len(jax.tree.leaves(params))
  assert max(reads_between) == max(config.vision.num_hidden_layers, config.text.num_hidden_layers)
  assert min(reads_between) == 1


@pytest.mark.parametrize("ckpt_dtype,dtype", [(torch.float32, "bfloat16"), (torch.bfloat16, "bfloat16"),
                                              (torch.float32, "float32")])
def test_stacked_leaves_are_filled_in_place_with_the_checkpoint_values(model, tmp_path, monkeypatch, ckpt_dtype, dtype):
  """Every layer slice of every stacked leaf equals transformers' tensor (cast to the param dtype), and on the
  CPU backend `device_put` adopts the stacked array the loader filled (no second copy of the leaf)."""
  from llava_jax.checkpoints import hf
  from llava_jax.checkpoints.export import llava_hf_key_specs
  sd = {k: v.to(ckpt_dtype) for k, v in H.rename(H.state_dict(model), H.HUB).items()}
  H.write_safetensors(str(tmp_path), sd, shards=2)
  model.config.to_json_file(str(tmp_path / "config.json"))
  adopted = {}
  place = hf._place

  def recording_place(leaf, sh, path):
    out = place(leaf, sh, path)
    adopted[path] = leaf.ctypes.data == out.unsafe_buffer_pointer()
    return out

  monkeypatch.setattr(hf, "_place", recording_place)
  config, params = load_pretrained(str(tmp_path), dtype=dtype)
  assert config.runtime.scan_layers
  stacked = 0
  for spec in llava_hf_key_specs(config):
    ref = spec.to_flax(sd[spec.hf_key].float().numpy()).astype(jnp.dtype(dtype))
    leaf = np.asarray(get_in(params, spec.path))
    if spec.layer is not None:
      leaf, stacked = leaf[spec.layer], stacked + 1
      if jax.default_backend() == "cpu":
        assert adopted[spec.path], spec.path
    assert leaf.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(leaf.astype(np.float32), ref.astype(np.float32), err_msg=spec.hf_key)
  # LLaMA: q/k/v/o, gate/up/down, 2 norms per layer; CLIP: q/k/v/out, fc1/fc2 and 2 LayerNorms, weight + bias each
  assert stacked == 9 * config.text.num_hidden_layers + 16 * config.vision.num_hidden_layers
