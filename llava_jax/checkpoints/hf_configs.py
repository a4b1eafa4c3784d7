"""transformers config dicts (config.json's `text_config` / `vision_config`, possibly partial) → our TextConfig /
VisionConfig, with transformers' defaults for omitted fields and a clear error for architectures we do not run."""
from __future__ import annotations

import dataclasses

from llava_jax.config import RopeScaling, TextConfig, VisionConfig

# transformers defaults for fields a config.json may omit (5.x values; unchanged since 4.3x). rope_theta
# (10000) is TextConfig's own default, so a 5.x `rope_parameters.rope_theta` is not shadowed.
HF_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=None)
HF_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                               hidden_act="quick_gelu", layer_norm_eps=1e-5)
# `LlavaConfig()` without a vision_config builds this tower (CLIP ViT-L/14-336).
HF_LLAVA_VISION_DEFAULTS = dict(HF_CLIP_VISION_DEFAULTS, intermediate_size=4096, hidden_size=1024, patch_size=14,
                                image_size=336, num_hidden_layers=24, num_attention_heads=16)


def _pick(d: dict, cls, renames: dict | None = None) -> dict:
  renames = renames or {}
  names = {f.name for f in dataclasses.fields(cls)}
  out = {}
  for k, v in d.items():
    k = renames.get(k, k)
    if k in names and v is not None:
      out[k] = v
  return out


def _vision_config(d: dict) -> VisionConfig:
  """A complete HF CLIPVisionConfig dict → VisionConfig (its fields by name)."""
  return VisionConfig(**_pick(d, VisionConfig))


def _text_config(d: dict) -> TextConfig:
  """A complete HF LlamaConfig dict → TextConfig. Rope scaling other than 'llama3' (or none) is rejected."""
  kw = _pick(d, TextConfig)
  kw.pop("rope_scaling", None)
  rs = d.get("rope_scaling") or d.get("rope_parameters")
  if isinstance(rs, dict):
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if "rope_theta" in rs and "rope_theta" not in d:
      kw["rope_theta"] = float(rs["rope_theta"])
    if rope_type == "llama3":
      kw["rope_scaling"] = RopeScaling(**_pick(rs, RopeScaling))
    elif rope_type not in ("default", None):
      raise ValueError(f"rope scaling type {rope_type!r} is not supported (only 'llama3' or none)")
  if isinstance(kw.get("eos_token_id"), list):
    kw["eos_token_id"] = kw["eos_token_id"][0]
  if d.get("attention_bias") or d.get("mlp_bias"):
    raise ValueError("LLaMA configs with attention_bias/mlp_bias are not supported")
  return TextConfig(**kw)


def text_config_from_hf(d: dict) -> TextConfig:
  """HF LlamaConfig dict (possibly partial) → TextConfig, with transformers' defaults for missing fields."""
  mt = d.get("model_type", "llama")
  if mt not in ("llama", "llava", "llava_llama"):
    raise ValueError(f"text model_type {mt!r} is not supported: the decoder must be LLaMA-architecture")
  full = dict(HF_LLAMA_DEFAULTS)
  full.update({k: v for k, v in d.items() if v is not None or k == "pad_token_id"})
  full.setdefault("num_key_value_heads", full["num_attention_heads"])
  if full.get("num_key_value_heads") is None:
    full["num_key_value_heads"] = full["num_attention_heads"]
  if full.get("hidden_act", "silu") != "silu":
    raise ValueError(f"LLaMA hidden_act {full['hidden_act']!r} is not supported (only 'silu')")
  text = _text_config(full)
  return dataclasses.replace(text, pad_token_id=full.get("pad_token_id"))


def vision_config_from_hf(d: dict, defaults: dict = HF_CLIP_VISION_DEFAULTS) -> VisionConfig:
  """HF CLIPVisionConfig dict, or a CLIPConfig dict holding `vision_config`, → VisionConfig."""
  if "vision_config" in d:
    d = d["vision_config"] or {}
  mt = d.get("model_type", "clip_vision_model")
  if mt not in ("clip_vision_model", "clip"):
    raise ValueError(f"vision tower model_type {mt!r} is not supported (only CLIP vision transformers)")
  full = dict(defaults)
  full.update({k: v for k, v in d.items() if v is not None})
  if full["hidden_act"] != "quick_gelu":
    raise ValueError(f"CLIP hidden_act {full['hidden_act']!r} is not supported (only 'quick_gelu')")
  return _vision_config(full)
