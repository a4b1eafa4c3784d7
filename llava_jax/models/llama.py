"""LLaMA / Vicuna decoder (HF `LlamaForCausalLM`), Flax linen.

Pre-norm blocks `x + attn(rms1(x))`, `x + mlp(rms2(x))`; RMSNorm in float32 (weight × normed, HF order);
RoPE in HF's rotate_half convention with optional Llama-3 frequency scaling; grouped-query attention;
SwiGLU MLP `down(silu(gate(x)) · up(x))`; no biases anywhere. Param names follow HF and
docs/architecture.md so checkpoints convert by key table (`checkpoints/llama_keys.py`).

Masking is by segment ids: token i attends to token j iff j ≤ i and seg[i] == seg[j] != 0, which covers a
plain attention mask (one segment per row, 0 = padding) and packed samples (several segments per row, with
positions restarting per segment). Attention is split into projections + RoPE (`LlamaAttention`) and the
kernel on (q, k, v, mask); the KV cache sits between them without touching the param tree.

KV cache (decoding, `LlamaForCausalLM.extend`): an explicit pytree `KVCache(k, v, valid)` passed in and
returned, never a flax 'cache' collection. k / v are [L, B, Hkv, S, hd] (layer axis first, head-major); the
whole cache is carried through the layers (scan carry, or the loop's value unscanned) and block `l` writes
its T new rows at [l, :, :, index:index + T] in place, so a step never copies the cache; `valid` [B, S] bool
marks the slots that hold real tokens (left padding, unwritten slots). `extend` writes T new tokens at slots
[index, index + T) (one `index` for the whole batch: rows differ by their positions and `valid`, not by where
they write), and query slot i sees slot j iff j ≤ i and valid[j] (a padding query sees itself only, so no row
is empty).
Being plain arrays, the cache jits with any control flow (while_loop carries it), and shards with logical
constraints like every activation ('batch' over data/fsdp, 'act_kv_heads' over tensor).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import flax.struct
from jax.ad_checkpoint import checkpoint_name

from llava_jax.config import RopeScaling, RuntimeOptions, TextConfig
from llava_jax.models import common, lora, quant, splash

_EMBED_AXES = ("batch", "length", "act_embed")
_INIT = nn.initializers.normal(0.02)  # HF LlamaConfig.initializer_range


# ---------------------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] float32: 1 / θ^(2i/d), then Llama-3 scaling when given.

  Mirrors transformers' `compute_default_rope_parameters` / `_compute_llama3_parameters` in float32:
  wavelengths shorter than original_max / high_freq_factor are kept, longer than original_max /
  low_freq_factor are divided by `factor`, and the band between is interpolated smoothly.
  """
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
  if scaling is None:
    return inv_freq
  if scaling.rope_type != "llama3":
    raise ValueError(f"rope scaling type {scaling.rope_type!r} is not supported (only 'llama3')")
  if scaling.high_freq_factor == scaling.low_freq_factor:
    raise ValueError("llama3 rope scaling needs high_freq_factor != low_freq_factor")
  factor = np.float32(scaling.factor)
  low, high = np.float32(scaling.low_freq_factor), np.float32(scaling.high_freq_factor)
  old_len = np.float32(scaling.original_max_position_embeddings)
  low_freq_wavelen = old_len / low
  high_freq_wavelen = old_len / high
  wavelen = np.float32(2 * math.pi) / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> Tuple[jax.Array, jax.Array]:
  """positions [B, T] int → (cos, sin) [B, T, head_dim] float32 (frequencies repeated over both halves)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, H, hd] rotated by (cos, sin) [B, T, hd] in HF's rotate_half convention; float32 inside."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def segment_causal_mask(segment_ids: jax.Array) -> jax.Array:
  """segment_ids [B, T] (0 = padding) → bool mask [B, 1, T, T]: i sees j iff j ≤ i and seg[i] == seg[j] != 0."""
  t = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
  same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
  return (same & causal[None])[:, None]


# ---------------------------------------------------------------------------------------------------------
# KV cache

_CACHE_AXES = ("layers", "batch", "act_kv_heads", "length", None)


@flax.struct.dataclass
class KVCache:
  """Decoder KV cache. k, v [L, B, Hkv, S, hd] (compute dtype, RoPE already applied to k; head-major, so the
  attention matmuls read each layer's cache in place: a slot-major [B, S, Hkv, hd] cache made XLA transpose
  the whole cache at every decode step, several times slower on CPU: bench/README.md);
  valid [B, S] bool (slot holds a real token that later queries may attend to)."""
  k: jax.Array
  v: jax.Array
  valid: jax.Array

  @property
  def max_length(self) -> int:
    return self.k.shape[3]


def init_kv_cache(config: TextConfig, batch: int, max_length: int, dtype=jnp.float32) -> KVCache:
  """Empty cache for `batch` rows of up to `max_length` tokens (every slot invalid)."""
  shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_length, config.resolved_head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), valid=jnp.zeros((batch, max_length), bool))


def constrain_kv_cache(cache: KVCache) -> KVCache:
  """Logical sharding constraints on a cache (no-op without a mesh and axis rules)."""
  return KVCache(k=nn.with_logical_constraint(cache.k, _CACHE_AXES),
                 v=nn.with_logical_constraint(cache.v, _CACHE_AXES),
                 valid=nn.with_logical_constraint(cache.valid, ("batch", "length")))


def cache_attention_mask(valid: jax.Array, index: jax.Array, length: int) -> jax.Array:
  """valid [B, S] (after writing the new tokens), queries at slots index..index+length-1 → mask [B, 1, T, S]:
  query slot i sees slot j iff (j ≤ i and valid[j]) or j == i."""
  s = valid.shape[-1]
  q_slot = index + jnp.arange(length, dtype=jnp.int32)
  k_slot = jnp.arange(s, dtype=jnp.int32)
  causal = k_slot[None, :] <= q_slot[:, None]
  mask = (causal[None] & valid[:, None, :]) | (k_slot[None, :] == q_slot[:, None])[None]
  return mask[:, None]


# ---------------------------------------------------------------------------------------------------------
# Layers


def _dense(features: int, axes: Tuple[str, str], runtime: RuntimeOptions, name: str, quantizable: bool = True,
           **kw) -> nn.Module:
  """Bias-free Dense with logically partitioned kernel; LoRA-aware (models/lora.py) when `runtime.lora` is set,
  over a quantized kernel (models/quant.py) when `runtime.quantize` is set and the layer is `quantizable`."""
  dt, pdt = runtime.jnp_dtype, runtime.jnp_param_dtype
  if runtime.quantize is not None and quantizable:
    return quant.QuantDense(features, runtime.quantize, axes, dtype=dt, param_dtype=pdt, kernel_init=_INIT,
                            lora=runtime.lora, name=name, **kw)
  if runtime.lora is not None:
    return lora.LoraDense(features, runtime.lora, axes, dtype=dt, param_dtype=pdt,
                          kernel_init=nn.with_logical_partitioning(_INIT, axes), name=name, **kw)
  return nn.Dense(features, use_bias=False, dtype=dt, param_dtype=pdt,
                  kernel_init=nn.with_logical_partitioning(_INIT, axes), name=name, **kw)


class RMSNorm(nn.Module):
  """HF LlamaRMSNorm: x / rms(x) in float32, cast back to x's dtype, times `scale`. [..., D] → [..., D]."""
  eps: float
  runtime: RuntimeOptions

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                       (x.shape[-1],), self.runtime.jnp_param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    normed = normed.astype(x.dtype).astype(jnp.float32)  # HF rounds to the input dtype before the weight
    return (scale.astype(jnp.float32) * normed).astype(self.runtime.jnp_dtype)


class LlamaAttention(nn.Module):
  """Self-attention with RoPE and grouped-query heads: x [B, T, D] → [B, T, D].

  q/k/v kernels are flat [D, heads * hd] (head h = columns h*hd:(h+1)*hd, as HF). `mask` [B, 1, T, S] bool,
  or with attention_impl 'splash' (and no cache) the segment ids [B, T] the kernel masks by.
  With `kv = (k_cache, v_cache)` [L, B, Hkv, S, hd] (the whole cache) and `layer` (this layer's index), the new
  k/v are written in place at [layer, :, :, kv_index : kv_index + T], attention runs over that layer's cache,
  and the call returns `(out, (k_cache, v_cache))`.
  """
  config: TextConfig
  runtime: RuntimeOptions

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, kv=None, kv_index=None,
               layer=None):
    cfg, rt = self.config, self.runtime
    h, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
    b, t, _ = x.shape
    q = _dense(h * hd, ("embed", "heads"), rt, "q_proj")(x).reshape(b, t, h, hd)
    k = _dense(hkv * hd, ("embed", "kv_heads"), rt, "k_proj")(x).reshape(b, t, hkv, hd)
    v = _dense(hkv * hd, ("embed", "kv_heads"), rt, "v_proj")(x).reshape(b, t, hkv, hd)
    q = nn.with_logical_constraint(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None))
    k = nn.with_logical_constraint(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", None))
    v = nn.with_logical_constraint(v, ("batch", "length", "act_kv_heads", None))
    impl = rt.attention_impl
    if kv is not None:  # KV cache: write the new k/v at their slots, attend over the whole cache
      # Only the T new rows are written (in place: the whole cache is the scan / loop carry, never a scanned
      # input and stacked output, which copied every layer's cache in and out at each step); one read of
      # this layer's slice feeds the attention.
      k_cache, v_cache = kv
      start = (layer, 0, 0, kv_index, 0)
      k_cache = jax.lax.dynamic_update_slice(k_cache, jnp.swapaxes(k, 1, 2)[None].astype(k_cache.dtype), start)
      v_cache = jax.lax.dynamic_update_slice(v_cache, jnp.swapaxes(v, 1, 2)[None].astype(v_cache.dtype), start)
      k = jax.lax.dynamic_index_in_dim(k_cache, layer, 0, keepdims=False)
      v = jax.lax.dynamic_index_in_dim(v_cache, layer, 0, keepdims=False)
      k = nn.with_logical_constraint(k, ("batch", "act_kv_heads", "length", None))
      v = nn.with_logical_constraint(v, ("batch", "act_kv_heads", "length", None))
      out = attend_cached(q, k, v, mask, impl)
    else:
      out = attend(q, k, v, mask, impl)
    out = checkpoint_name(out.reshape(b, t, h * hd), "attn_out")
    out = nn.with_logical_constraint(out, ("batch", "length", "act_heads"))
    out = _dense(cfg.hidden_size, ("heads", "embed"), rt, "o_proj")(out)
    return out if kv is None else (out, (k_cache, v_cache))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str) -> jax.Array:
  """Attention kernel: q [B, T, H, hd], k/v [B, S, Hkv, hd], mask [B, 1, T, S] bool → [B, T, H, hd].

  'xla' uses a float32 additive bias (finite, so fully masked padding rows stay NaN-free); the `jax.nn`
  kernels ('dot_product', 'cudnn') take the bool mask directly. 'splash' (self-attention, S = T) takes the
  segment ids [B, T] in place of the mask and applies the causal + segment rule itself (`models/splash.py`).
  """
  if impl == "splash":
    if mask.ndim != 2:
      raise ValueError(f"attention_impl='splash' takes segment ids [B, T] in place of the mask, got {mask.shape}")
    return splash.splash_attention(q, k, v, mask)
  if impl == "xla":
    return common.attention(q, k, v, common.mask_to_bias(mask), impl="xla")
  if impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention_impl='cudnn' needs runtime.dtype bfloat16 or float16, got {q.dtype}")
  return common.attention(q, k, v, None, impl=impl, mask=mask)


def attend_cached(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str) -> jax.Array:
  """Attention over a head-major cache: q [B, T, H, hd], k/v [B, Hkv, S, hd], mask [B, 1, T, S] bool →
  [B, T, H, hd].

  'xla' contracts against the cache in its own layout (batch dims B, Hkv leading), float32 softmax and additive
  bias exactly as `common.attention`; only q and the output are transposed, which are T rows, not S. The other
  kernels ('dot_product', 'cudnn' → 'dot_product': cudnn's flash kernel wants long queries; 'chunked') take the
  slot-major [B, S, Hkv, hd] view. 'splash' uses 'xla' here: the kernel is for causal self-attention over
  segment ids, not for T new queries against a cache (decode has T = 1, where a flash kernel gains nothing).
  """
  if impl == "splash":
    impl = "xla"
  if impl != "xla":
    impl = "dot_product" if impl == "cudnn" else impl
    return attend(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, impl)
  b, t, h, hd = q.shape
  hkv = k.shape[1]
  qg = jnp.transpose(q.reshape(b, t, hkv, h // hkv, hd), (0, 2, 3, 1, 4))  # [B, Hkv, g, T, hd]
  scores = jnp.einsum("bkgtd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
  scores = scores + common.mask_to_bias(mask)[:, :, None]  # [B, 1, 1, T, S]
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, hd)


class LlamaMLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) · up(x)), [B, T, D] → [B, T, D]."""
  config: TextConfig
  runtime: RuntimeOptions

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, rt = self.config, self.runtime
    if cfg.hidden_act != "silu":
      raise ValueError(f"text hidden_act={cfg.hidden_act!r} is not supported (LLaMA uses 'silu')")
    gate = _dense(cfg.intermediate_size, ("embed", "mlp"), rt, "gate_proj")(x)
    up = _dense(cfg.intermediate_size, ("embed", "mlp"), rt, "up_proj")(x)
    y = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return _dense(cfg.hidden_size, ("mlp", "embed"), rt, "down_proj")(y)


class LlamaDecoderLayer(nn.Module):
  """One block: (carry, cos, sin [B, T, hd], mask [B, 1, T, S] (segment ids [B, T] for 'splash' without a
  cache), kv_index, layer) → (carry, None) (scan's (carry, y)). Without a cache (`layer` None) the carry is
  x [B, T, D]; with one it is (x, (k, v)), the whole cache [L, B, Hkv, S, hd], which this block (number
  `layer`) updates in place."""
  config: TextConfig
  runtime: RuntimeOptions

  @nn.compact
  def __call__(self, carry, cos: jax.Array, sin: jax.Array, mask: jax.Array, kv_index=None, layer=None):
    cfg, rt = self.config, self.runtime
    x, kv = (carry, None) if layer is None else carry
    h = RMSNorm(cfg.rms_norm_eps, rt, name="input_layernorm")(x)
    attn = LlamaAttention(cfg, rt, name="self_attn")(h, cos, sin, mask, kv, kv_index, layer)
    if kv is not None:
      attn, kv = attn
    x = x + attn
    h = RMSNorm(cfg.rms_norm_eps, rt, name="post_attention_layernorm")(x)
    x = nn.with_logical_constraint(x + LlamaMLP(cfg, rt, name="mlp")(h), _EMBED_AXES)
    return (x if kv is None else (x, kv)), None


# ---------------------------------------------------------------------------------------------------------
# Model


class LlamaForCausalLM(nn.Module):
  """Decoder with embedding and LM head. Methods: `embed`, `__call__`, `logits` (use `apply(..., method=)`).

  Compute dtype `runtime.dtype`, params `runtime.param_dtype`; norms, softmax, RoPE and logits in float32.
  """
  config: TextConfig
  runtime: RuntimeOptions

  def setup(self):
    cfg, rt = self.config, self.runtime
    if cfg.num_attention_heads % cfg.num_key_value_heads:
      raise ValueError(f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads {cfg.num_key_value_heads}")
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=rt.jnp_dtype, param_dtype=rt.jnp_param_dtype,
        embedding_init=nn.with_logical_partitioning(_INIT, ("vocab", "embed")))
    block = common.wrap_block(LlamaDecoderLayer, rt)
    if rt.scan_layers:
      # (cos, sin, mask) and the cache write index broadcast; the layer number scanned (the cache is carried)
      stack = common.scan_blocks(block, cfg.num_hidden_layers,
                                 in_axes=(nn.broadcast,) * 4 + (0,))
      self.layers = stack(cfg, rt)
    else:
      self.layers = [block(cfg, rt) for _ in range(cfg.num_hidden_layers)]  # named layers_0, layers_1, ...
    self.norm = RMSNorm(cfg.rms_norm_eps, rt)
    if not cfg.tie_word_embeddings:
      self.lm_head = _dense(cfg.vocab_size, ("embed", "vocab"), rt, None, quantizable=False,
                            dot_general=functools.partial(jax.lax.dot_general,
                                                          preferred_element_type=jnp.float32))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """input_ids [B, T] int → [B, T, D] compute dtype. Ids outside [0, V) (e.g. -200) read row 0."""
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
    ids = jnp.where((input_ids >= 0) & (input_ids < self.config.vocab_size), input_ids, 0)
    return nn.with_logical_constraint(self.embed_tokens(ids), _EMBED_AXES)

  def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
               return_hidden: bool = False) -> jax.Array:
    """inputs_embeds [B, T, D], positions [B, T] int, segment_ids [B, T] int (0 = padding)
    → logits [B, T, V] float32, or the final-normed hidden states [B, T, D] when `return_hidden`."""
    cfg, rt = self.config, self.runtime
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
      raise ValueError(f"inputs_embeds must be [B, T, {cfg.hidden_size}], got {inputs_embeds.shape}")
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
      if arr.shape != inputs_embeds.shape[:2]:
        raise ValueError(f"{name} must be [B, T] = {inputs_embeds.shape[:2]}, got {arr.shape}")
    if self.is_initializing() and not cfg.tie_word_embeddings:
      self.embed_tokens(jnp.zeros((1, 1), jnp.int32))  # create the table even when only __call__ runs

    x = nn.with_logical_constraint(inputs_embeds.astype(rt.jnp_dtype), _EMBED_AXES)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling))
    # 'splash' masks by segment ids inside the kernel: no [B, 1, T, T] mask is built
    mask = segment_ids if rt.attention_impl == "splash" else segment_causal_mask(segment_ids)
    if rt.scan_layers:
      x, _ = self.layers(x, cos, sin, mask, None, None)  # layer None: no cache
    else:
      for layer in self.layers:
        x, _ = layer(x, cos, sin, mask)
    x = self.norm(x)
    return x if return_hidden else self.logits(x)

  def extend(self, inputs_embeds: jax.Array, positions: jax.Array, cache: KVCache, index: jax.Array,
             token_mask: Optional[jax.Array] = None, *, return_hidden: bool = False,
             last_only: bool = False) -> Tuple[jax.Array, KVCache]:
    """Run T new tokens against a KV cache (prefill: the whole prompt; decode: T = 1).

    inputs_embeds [B, T, D]; positions [B, T] int (RoPE positions, per row); cache: `KVCache` with S slots;
    index: int scalar, the slot of the first new token (the same for every row; tokens go to slots
    [index, index + T), which must fit in S); token_mask [B, T] (1 = real token, 0 = padding; default all 1)
    becomes `cache.valid` for those slots. Returns (logits [B, T, V] float32 — [B, V] with `last_only` —
    or final-normed hidden states when `return_hidden`, updated cache).
    Equal to `__call__` over the valid tokens up to each slot (same positions): the cache only skips work.
    """
    cfg, rt = self.config, self.runtime
    b, t = inputs_embeds.shape[:2]
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
      raise ValueError(f"inputs_embeds must be [B, T, {cfg.hidden_size}], got {inputs_embeds.shape}")
    if positions.shape != (b, t):
      raise ValueError(f"positions must be [B, T] = {(b, t)}, got {positions.shape}")
    if cache.k.shape[:2] != (cfg.num_hidden_layers, b) or cache.valid.shape[0] != b:
      raise ValueError(f"cache is for [L, B] = {cache.k.shape[:2]}, inputs need {(cfg.num_hidden_layers, b)}")
    if t > cache.max_length:
      raise ValueError(f"{t} new tokens do not fit a cache of {cache.max_length} slots")
    token_mask = jnp.ones((b, t), bool) if token_mask is None else token_mask.astype(bool)
    index = jnp.asarray(index, jnp.int32)
    valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, index))
    mask = cache_attention_mask(valid, index, t)
    cache = constrain_kv_cache(cache)

    x = nn.with_logical_constraint(inputs_embeds.astype(rt.jnp_dtype), _EMBED_AXES)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling))
    carry = (x, (cache.k, cache.v))
    if rt.scan_layers:
      carry, _ = self.layers(carry, cos, sin, mask, index, jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32))
    else:
      for i, layer in enumerate(self.layers):
        carry, _ = layer(carry, cos, sin, mask, index, i)
    x, (k, v) = carry
    new_cache = constrain_kv_cache(KVCache(k=k, v=v, valid=valid))
    if last_only:
      x = x[:, -1:]
    x = self.norm(x)
    out = x if return_hidden else self.logits(x)
    return (out[:, 0] if last_only else out), new_cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [B, T, D] → logits [B, T, V] float32 (lm_head, or the embedding table when tied)."""
    dtype = self.runtime.jnp_dtype
    hidden = hidden.astype(dtype)
    if self.config.tie_word_embeddings:
      table = self.embed_tokens.embedding.astype(dtype)
      out = jnp.einsum("btd,vd->btv", hidden, table, preferred_element_type=jnp.float32)
    else:
      out = self.lm_head(hidden)
    return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "act_vocab"))
