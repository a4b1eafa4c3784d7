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


SCANNED_STACK = "layers"  # the param-tree name of every scanned stack ([L, ...] leaves)


def bf16_from_bits(variables):
  """uint16 leaves (bfloat16 bit patterns, see `infer.cpu_weights`) → bfloat16; every other leaf unchanged."""
  return jax.tree.map(lambda x: jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x,
                      variables)


def scan_blocks(block_cls, length: int, in_axes=()):
  """`nn.scan` over `length` copies of `block_cls`; params gain a leading 'layers' axis.

  The stack's weights may arrive as uint16 bit patterns of bfloat16 (`infer/cpu_weights.py`, for XLA:CPU, which
  would otherwise convert the whole bf16 stack to float32 before slicing it): each layer's slice is turned back
  into bfloat16 inside the loop body, so only one layer is ever converted.

  The block's `__call__(carry, *broadcast_args)` must return `(carry, y)`; `y` is stacked [length, ...].
  A 'dropout' rng (LoRA's, models/lora.py) is split per layer, so layers draw different masks.
  `in_axes` gives `nn.broadcast` (or 0) for each extra positional argument.
  """
  body = nn.map_variables(block_cls, "params", trans_in_fn=bf16_from_bits, init=True)
  return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=in_axes, length=length, metadata_params={nn.PARTITION_NAME: "layers"})


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array], impl: str = "xla",
              mask: Optional[jax.Array] = None) -> jax.Array:
  """Scaled dot-product attention, softmax in float32.

  q [B, T, H, hd], k/v [B, S, Hkv, hd] (Hkv divides H: grouped-query attention), bias [B, 1, T, S] float32
  additive (0 or a large negative) or None; mask [B, 1, T, S] bool (for the `jax.nn` kernels). Returns
  [B, T, H, hd] in q's dtype. Scale is hd^-0.5. 'splash' is the 'xla' path here (CLIP's unmasked encoder; the
  decoder calls the splash kernel through `llama.attend` with segment ids).
  """
  if impl in ("dot_product", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None if impl == "dot_product" else "cudnn")
  if impl == "chunked":
    return chunked_attention(q, k, v, mask=mask, bias=bias)
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


ATTENTION_CHUNK = 256


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array] = None,
                      bias: Optional[jax.Array] = None, chunk: int = ATTENTION_CHUNK) -> jax.Array:
  """The 'xla' kernel over blocks of `chunk` queries; exact (each row's softmax spans all keys).

  Shapes as `attention`. Only one block's float32 scores [B, H, chunk, S] exist at a time, and they are
  recomputed in the backward pass (`jax.checkpoint` per block), so memory is O(B·H·chunk·S) instead of
  O(B·H·T·S): XLA everywhere (CPU, GPU, TPU), what the memory plan compiles for long sequences.
  `mask` [B, 1, T, S] bool or `bias` [B, 1|H, T, S] float32 (mask wins when both are given).
  """
  b, t, h, hd = q.shape
  extra = mask if mask is not None else bias  # sliced per block; a bool mask becomes a bias inside the block
  c = max(1, min(int(chunk), t))
  n = -(-t // c)
  pad = n * c - t
  if pad:
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    if extra is not None:
      extra = jnp.pad(extra, ((0, 0), (0, 0), (0, pad), (0, 0)))
  qs = jnp.moveaxis(q.reshape(b, n, c, h, hd), 1, 0)  # [n, B, c, H, hd]

  @jax.checkpoint
  def block(qb, eb):
    if eb is not None and eb.dtype == jnp.bool_:
      eb = mask_to_bias(eb)
    return attention(qb, k, v, eb, impl="xla")

  if extra is None:
    out = jax.lax.map(lambda qb: block(qb, None), qs)
  else:
    es = jnp.moveaxis(extra.reshape(*extra.shape[:2], n, c, extra.shape[-1]), 2, 0)  # [n, B, 1|H, c, S]
    out = jax.lax.map(lambda xs: block(*xs), (qs, es))
  out = jnp.moveaxis(out, 0, 1).reshape(b, n * c, h, hd)
  return out[:, :t]
