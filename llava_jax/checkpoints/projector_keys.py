"""Key tables for the projector in the two naming schemes seen in checkpoints.

- 'hf' (llava-hf): `{prefix}linear_1.weight`, `{prefix}linear_2.weight`, ... (prefix 'multi_modal_projector.')
- 'original' (liuhaotian/llava-*): `model.mm_projector.weight` for 'linear'; `model.mm_projector.{0,2,4..}.weight`
  for 'mlpNx_gelu' (odd indices are the GELUs of the nn.Sequential).
"""
from __future__ import annotations

from typing import List

from llava_jax.checkpoints.table import KeySpec, transpose
from llava_jax.config import LlavaConfig, projector_depth


def projector_key_specs(config: LlavaConfig, style: str = "hf", prefix: str | None = None,
                        path_prefix=("multi_modal_projector",)) -> List[KeySpec]:
  depth = projector_depth(config.projector_type)
  if style == "hf":
    prefix = "multi_modal_projector." if prefix is None else prefix
    names = [f"{prefix}linear_{i}" for i in range(1, depth + 1)]
  elif style == "original":
    prefix = "model.mm_projector" if prefix is None else prefix.rstrip(".")
    names = [prefix] if config.projector_type == "linear" else [f"{prefix}.{2 * i}" for i in range(depth)]
  else:
    raise ValueError(f"projector key style {style!r}; expected 'hf' or 'original'")
  specs = []
  for i, name in enumerate(names, start=1):
    specs.append(KeySpec(f"{name}.weight", path_prefix + (f"linear_{i}", "kernel"), to_flax=transpose, to_hf=transpose))
    if config.projector_bias:
      specs.append(KeySpec(f"{name}.bias", path_prefix + (f"linear_{i}", "bias")))
  return specs
