"""Pieces both towers share: remat policies by name, layer stacking (scan or loop), attention kernels."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from llava_jax.config import RuntimeOptions

_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


def remat_policy(name: str):
  """Named `jax.checkpoint` policy ('full' saves nothing; 'dots' saves matmul outputs; ...)."""
  return _POLICIES[name]


def wrap_block(block_cls, runtime: RuntimeOptions, static_argnums=()):
  """`block_cls` wrapped in `nn.remat` with the runtime's policy (unchanged for 'none')."""
  if runtime.remat_policy == "none":
    return block_cls
  return nn.remat(block_cls, policy=remat_policy(runtime.remat_policy), prevent_cse=not runtime.scan_layers,
                  static_argnums=static_argnums)


def scan_blocks(block_cls, length: int, name: str = "layers", in_axes=()):
  """`nn.scan` over `length` copies of `block_cls`; params gain a leading 'layers' axis.

  The block's `__call__(carry, *broadcast_args)` must return `(carry, y)`; `y` is stacked [length, ...].
  `in_axes` gives `nn.broadcast` (or 0) for each extra positional argument.
  """
  return nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=in_axes, length=length, metadata_params={nn.PARTITION_NAME: "layers"})


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array], impl: str = "xla",
              mask: Optional[jax.Array] = None) -> jax.Array:
  """Scaled dot-product attention, softmax in float32.

  q [B, T, H, hd], k/v [B, S, Hkv, hd] (Hkv divides H: grouped-query attention), bias [B, 1, T, S] float32
  additive (0 or a large negative) or None; mask [B, 1, T, S] bool (for the `jax.nn` kernels). Returns
  [B, T, H, hd] in q's dtype. Scale is hd^-0.5.
  """
  if impl in ("dot_product", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None if impl == "dot_product" else "cudnn")
  b, t, h, hd = q.shape
  hkv = k.shape[2]
  groups = h // hkv
  qg = q.reshape(b, t, hkv, groups, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
  if bias is not None:
    scores = scores + bias.reshape(b, 1, 1, t, -1) if bias.shape[1] == 1 else scores + bias.reshape(b, hkv, groups, t, -1)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, hd)


def mask_to_bias(mask: jax.Array) -> jax.Array:
  """bool mask (True = may attend) → float32 additive bias (0 or the float32 minimum; no NaN on empty rows)."""
  return jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
