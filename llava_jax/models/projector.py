"""Vision → language projector: 'linear' (the paper) or 'mlp{N}x_gelu' (v1.5 uses N = 2).

Dense layers with bias named linear_1 … linear_N (HF's names), exact (erf) GELU between them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from llava_jax.config import LlavaConfig, projector_depth


class Projector(nn.Module):
  """[N, K, Dv·k] image features → [N, K, Dt] token embeddings."""
  config: LlavaConfig

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    cfg, rt = self.config, self.config.runtime
    depth = projector_depth(cfg.projector_type)
    x = features.astype(rt.jnp_dtype)
    for i in range(1, depth + 1):
      in_axis = "projector_in" if i == 1 else "mlp"
      x = nn.Dense(
          cfg.text.hidden_size, use_bias=cfg.projector_bias, dtype=rt.jnp_dtype, param_dtype=rt.jnp_param_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (in_axis, "embed")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
          name=f"linear_{i}")(x)
      if i < depth:
        x = jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(rt.jnp_dtype)
    return x
