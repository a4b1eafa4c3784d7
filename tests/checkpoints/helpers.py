"""Tiny transformers LLaVA models written to disk in the key layouts checkpoints come in, and the reference
logits our loaded params must reproduce."""
import functools
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file

import jax
import jax.numpy as jnp

from llava_jax.models.llava import LlavaModel
from tests import fixtures

TOL = 1e-4
IMAGE = fixtures.TINY_IMAGE_TOKEN


def tiny_llava(seed=0, **kw):
  return fixtures.tiny_hf_llava(seed=seed, **kw)


def state_dict(model):
  """In-memory (transformers 5) names: model.language_model.*, model.vision_tower.*, ..., lm_head.weight."""
  return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def rename(sd, pairs):
  """Replace the first matching prefix of each key (pairs of (old, new), tried in order)."""
  out = {}
  for k, v in sd.items():
    for old, new in pairs:
      if k.startswith(old):
        k = new + k[len(old):]
        break
    out[k] = v
  return out


HUB = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
       ("model.vision_tower.", "vision_tower.vision_model."), ("model.multi_modal_projector.", "multi_modal_projector.")]
IN_MEMORY_4X = [("model.vision_tower.", "model.vision_tower.vision_model.")]


def write_config(d, cfg):
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)


def write_safetensors(d, sd, shards=1):
  """One model.safetensors, or `shards` files + model.safetensors.index.json."""
  os.makedirs(d, exist_ok=True)
  keys = sorted(sd)
  if shards == 1:
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, part in enumerate(np.array_split(np.array(keys, dtype=object), shards)):
    name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    save_file({k: sd[k] for k in part}, os.path.join(d, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in part})
  with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


def write_pickle(d, sd, shards=1):
  os.makedirs(d, exist_ok=True)
  if shards == 1:
    torch.save(sd, os.path.join(d, "pytorch_model.bin"))
    return
  keys = sorted(sd)
  weight_map = {}
  for i, part in enumerate(np.array_split(np.array(keys, dtype=object), shards)):
    name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
    torch.save({k: sd[k] for k in part}, os.path.join(d, name))
    weight_map.update({k: name for k in part})
  with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


def save_llava_hf(model, d, layout="saved", shards=1):
  """layout: 'saved' (transformers 5 save_pretrained), 'hub', 'in_memory', 'in_memory_4x'."""
  if layout == "saved":
    model.save_pretrained(d)
    return d
  sd = state_dict(model)
  sd = {"hub": lambda: rename(sd, HUB), "in_memory": lambda: sd, "in_memory_4x": lambda: rename(sd, IN_MEMORY_4X)}[layout]()
  write_safetensors(d, sd, shards)
  model.config.to_json_file(os.path.join(d, "config.json"))
  return d


def original_llava_config(model, **mm):
  """config.json of an original LLaVA checkpoint: the LlamaConfig fields at top level plus mm_* keys."""
  text = model.config.text_config.to_dict()
  cfg = {k: v for k, v in text.items() if k not in ("architectures", "dtype", "transformers_version")}
  rope = cfg.pop("rope_parameters", None) or {}
  cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
  cfg.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower="openai/clip-tiny",
             mm_hidden_size=model.config.vision_config.hidden_size, mm_vision_select_layer=-2,
             mm_vision_select_feature="patch", image_aspect_ratio="pad", mm_use_im_start_end=False)
  cfg.update(mm)
  return {k: v for k, v in cfg.items() if v is not None}


def llama_state(model):
  """LLaMA keys of a transformers Llava model (model.*, lm_head.weight)."""
  sd = state_dict(model)
  out = {"model." + k[len("model.language_model."):]: v for k, v in sd.items() if k.startswith("model.language_model.")}
  out["lm_head.weight"] = sd["lm_head.weight"]
  return out


def projector_state(model, prefix="model.mm_projector", linear=False):
  sd = state_dict(model)
  p = "model.multi_modal_projector."
  if linear:
    return {f"{prefix}.weight": sd[p + "linear_1.weight"], f"{prefix}.bias": sd[p + "linear_1.bias"]}
  return {f"{prefix}.{2 * (i - 1)}.{w}": sd[f"{p}linear_{i}.{w}"] for i in (1, 2) for w in ("weight", "bias")}


def vision_state(model, prefix):
  sd = state_dict(model)
  return {prefix + k[len("model.vision_tower."):]: v for k, v in sd.items() if k.startswith("model.vision_tower.")}


def save_clip_vision(model, d):
  """CLIPVisionModel directory as transformers 5 writes it (bare `embeddings.*` keys)."""
  model.model.vision_tower.save_pretrained(d)
  return d


def save_clip_full(model, d):
  """Full CLIPModel directory (vision_model.* + a text tower + projections) holding the llava vision weights."""
  import transformers
  vc = model.config.vision_config
  cc = transformers.CLIPConfig(vision_config=vc.to_dict(), projection_dim=16, text_config=dict(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
      bos_token_id=0, eos_token_id=1, pad_token_id=1))
  clip = transformers.CLIPModel(cc)
  clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
  clip.save_pretrained(d)
  return d


# ---------------------------------------------------------------------------------------------------------
# Inputs and logits


def inputs(config_k, image_token=IMAGE, length=None, seed=0, size=28):
  """One row with an image in the middle, one text-only right-padded row; pixels NCHW for torch."""
  rows = [[1, 5] + [image_token] * config_k + [7, 8, 9], [1, 10, 11, 12]]
  length = length or max(len(r) for r in rows)
  ids = np.zeros((2, length), np.int64)
  mask = np.zeros((2, length), np.int64)
  for r, row in enumerate(rows):
    ids[r, :len(row)] = row
    mask[r, :len(row)] = 1
  pixels = np.random.RandomState(seed).randn(1, 3, size, size).astype(np.float32)
  return ids, mask, pixels


def reference_logits(model, ids, mask, pixels):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 pixel_values=torch.from_numpy(pixels)).logits.float().numpy()


@functools.lru_cache(maxsize=None)
def _apply(config):
  return jax.jit(LlavaModel(config).apply)


def our_logits(config, params, ids, mask, pixels, image_token=IMAGE):
  """Logits of our model; the HF placeholder id in `ids` becomes config.image_token_index (e.g. -200)."""
  ids = np.where(ids == image_token, config.image_token_index, ids)
  return np.asarray(_apply(config)({"params": params}, jnp.asarray(ids, jnp.int32),
                                   jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(mask, jnp.int32)))


def assert_logits_close(ours, ref, mask, tol=TOL):
  real = mask.astype(bool)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  diff = np.abs(ours - ref)[real].max()
  assert diff <= tol, f"max |logit diff| {diff:.2e} > {tol}"


def check_against(model, config, params, tol=TOL):
  ids, mask, pixels = inputs(config.num_image_tokens, size=config.vision.image_size)
  assert_logits_close(our_logits(config, params, ids, mask, pixels), reference_logits(model, ids, mask, pixels),
                      mask, tol)


def copy_dir(src, dst):
  shutil.copytree(src, dst)
  return dst
