"""llava_jax: LLaVA (visual instruction tuning) in JAX/Flax.

Public API:
  LlavaConfig, VisionConfig, TextConfig, RuntimeOptions — model configuration
  LlavaModel(config) — `apply({'params': p}, input_ids [B,T], pixel_values [N,H,W,3], attention_mask=None)` → logits [B,T,V]
  load_pretrained(path, *, vision_tower=None, dtype=...) → (config, params) from llava-hf / original LLaVA / CLIP+LLaMA dirs
  export_hf(config, params, out_dir, tokenizer=None) — write a llava-hf directory transformers loads
"""
from llava_jax import allocator as _allocator

_allocator.restart_with_tcmalloc()  # `python -m llava_jax.main` only, before jax is imported (see allocator.py)

from llava_jax.config import LlavaConfig, RuntimeOptions, TextConfig, VisionConfig  # noqa: E402

__all__ = ["LlavaConfig", "RuntimeOptions", "TextConfig", "VisionConfig", "LlavaModel", "load_pretrained",
           "export_hf", "init_params"]

_LAZY = {
    "LlavaModel": ("llava_jax.models.llava", "LlavaModel"),
    "init_params": ("llava_jax.models.llava", "init_params"),
    "load_pretrained": ("llava_jax.checkpoints.hf", "load_pretrained"),
    "export_hf": ("llava_jax.checkpoints.hf", "export_hf"),
}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f"module 'llava_jax' has no attribute {name!r}")
