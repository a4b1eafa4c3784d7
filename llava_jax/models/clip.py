"""CLIP vision transformer (HF `CLIPVisionModel`), Flax linen, returning the hidden states LLaVA selects from.

Pre-LN ViT: patch conv (no bias) + class token + learned positions → `pre_layrnorm` → L blocks of
`x + attn(ln1(x))`, `x + mlp(ln2(x))` with quick_gelu. `post_layernorm` exists for checkpoint fidelity and
`pooled_output`, but `__call__` never applies it (LLaVA reads hidden_states[-2] without it).

Param names follow HF (and docs/architecture.md) so checkpoints convert by key table
(`checkpoints/clip_keys.py`). Norms run in float32; everything else in `runtime.dtype`.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from llava_jax.config import RuntimeOptions, VisionConfig
from llava_jax.models import common

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}

_ACT_AXES = ("batch", "length", "act_embed")


def activation(name: str):
  """HF `hidden_act` name → function (quick_gelu = x·sigmoid(1.702x))."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"vision hidden_act={name!r} is not supported; choose one of {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def resolve_layers(layers: Optional[Sequence[int]], num_layers: int) -> Tuple[int, ...]:
  """Hidden-state indices (Python-style over the L+1 entries, -2 = output of block L-1) → indices in [0, L].

  None → all of 0..L. Raises ValueError for an empty selection or an index out of range.
  """
  n = num_layers + 1
  if layers is None:
    return tuple(range(n))
  if isinstance(layers, (int, np.integer)):
    layers = (int(layers),)
  layers = tuple(int(i) for i in layers)
  if not layers:
    raise ValueError("layers=() selects no hidden state; pass None for all or e.g. (-2,)")
  bad = [i for i in layers if not -n <= i < n]
  if bad:
    raise ValueError(f"hidden-state indices {bad} out of range: the tower has {n} hidden states "
                     f"(0 = embeddings, {num_layers} = last block), valid indices are {-n}..{n - 1}")
  return tuple(i % n for i in layers)


def _dense(features: int, axes: Tuple[str, str], bias_axes: Tuple[str], runtime: RuntimeOptions, name: str):
  return nn.Dense(
      features, dtype=runtime.jnp_dtype, param_dtype=runtime.jnp_param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), bias_axes))


def _layer_norm(eps: float, runtime: RuntimeOptions, name: str):
  """LayerNorm computed in float32 (callers cast the input up and the output back to the compute dtype)."""
  return nn.LayerNorm(
      epsilon=eps, dtype=jnp.float32, param_dtype=runtime.jnp_param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


def _norm(ln: nn.Module, x: jax.Array, dtype) -> jax.Array:
  return ln(x.astype(jnp.float32)).astype(dtype)


class CLIPVisionEmbeddings(nn.Module):
  """pixels [N, H, W, C] → class token + patch tokens + positions [N, P+1, D] (compute dtype)."""
  config: VisionConfig
  runtime: RuntimeOptions

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    cfg, rt = self.config, self.runtime
    d, p, dtype = cfg.hidden_size, cfg.patch_size, rt.jnp_dtype
    class_embedding = self.param(
        "class_embedding", nn.with_logical_partitioning(nn.initializers.normal(d ** -0.5), ("vision_embed",)),
        (d,), rt.jnp_param_dtype)
    patches = nn.Conv(
        d, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=dtype,
        param_dtype=rt.jnp_param_dtype, name="patch_embedding",
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                 ("patch", None, "channels", "vision_embed")),  # flax forbids a repeated name
    )(pixel_values.astype(dtype))
    n, gh, gw, _ = patches.shape
    patches = patches.reshape(n, gh * gw, d)  # row-major over the grid, as torch's flatten(2)
    cls = jnp.broadcast_to(class_embedding.astype(dtype), (n, 1, d))
    positions = nn.Embed(
        cfg.num_positions, d, dtype=dtype, param_dtype=rt.jnp_param_dtype, name="position_embedding",
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("positions", "vision_embed")),
    )(jnp.arange(cfg.num_positions))
    return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPAttention(nn.Module):
  """Multi-head self-attention without mask: [N, T, D] → [N, T, D]."""
  config: VisionConfig
  runtime: RuntimeOptions

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, rt = self.config, self.runtime
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if d % h:
      raise ValueError(f"hidden_size {d} is not divisible by num_attention_heads {h}")
    n, t, _ = x.shape

    def heads(name):
      y = _dense(d, ("vision_embed", "vision_heads"), ("vision_heads",), rt, name)(x)
      return nn.with_logical_constraint(y.reshape(n, t, h, d // h), ("batch", "length", "act_heads", None))

    q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
    out = common.attention(q, k, v, None, impl=rt.attention_impl).reshape(n, t, d)
    return _dense(d, ("vision_heads", "vision_embed"), ("norm",), rt, "out_proj")(out)


class CLIPMLP(nn.Module):
  """fc1 → activation → fc2: [N, T, D] → [N, T, D]."""
  config: VisionConfig
  runtime: RuntimeOptions

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, rt = self.config, self.runtime
    act = activation(cfg.hidden_act)
    y = _dense(cfg.intermediate_size, ("vision_embed", "vision_mlp"), ("vision_mlp",), rt, "fc1")(x)
    y = nn.with_logical_constraint(act(y), ("batch", "length", "act_mlp"))
    return _dense(cfg.hidden_size, ("vision_mlp", "vision_embed"), ("vision_embed",), rt, "fc2")(y)


class CLIPEncoderLayer(nn.Module):
  """One pre-LN block: [N, T, D] → [N, T, D] in the compute dtype."""
  config: VisionConfig
  runtime: RuntimeOptions

  def setup(self):
    cfg, rt = self.config, self.runtime
    self.layer_norm1 = _layer_norm(cfg.layer_norm_eps, rt, "layer_norm1")
    self.self_attn = CLIPAttention(cfg, rt)
    self.layer_norm2 = _layer_norm(cfg.layer_norm_eps, rt, "layer_norm2")
    self.mlp = CLIPMLP(cfg, rt)

  def block(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x + self.self_attn(_norm(self.layer_norm1, x, dtype)).astype(dtype)
    x = x + self.mlp(_norm(self.layer_norm2, x, dtype)).astype(dtype)
    return nn.with_logical_constraint(x, _ACT_AXES)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.block(x)


class _ScannedEncoderLayer(CLIPEncoderLayer):
  """Scan body: carry (h [N,T,D], buf [S,N,T,D]); writes this block's output into buf[slot].

  `slot` (int32 scalar, scanned over) says where the output of this layer is kept; unrequested layers
  write a scratch slot, so only the requested hidden states are ever stored (not all L).
  """

  def __call__(self, carry, slot):
    h, buf = carry
    h = self.block(h)
    buf = jax.lax.dynamic_update_index_in_dim(buf, h, slot, 0)
    return (h, buf), None


class CLIPEncoder(nn.Module):
  """The L blocks: params under `layers` (scanned, leading [L]) or `layers_{i}`. Either way only the blocks up to
  the deepest requested hidden state run (LLaVA's -2 skips the last block)."""
  config: VisionConfig
  runtime: RuntimeOptions

  @nn.compact
  def __call__(self, h: jax.Array, layers: Tuple[int, ...]) -> jax.Array:
    """h [N, T, D] (embeddings after pre_layrnorm), layers: indices in [0, L] → [len(layers), N, T, D]."""
    cfg, rt = self.config, self.runtime
    num = cfg.num_hidden_layers
    if not rt.scan_layers:
      # Stop after the deepest requested block (all blocks at init so every param exists).
      depth = num if self.is_initializing() else max(layers)
      block = common.wrap_block(CLIPEncoderLayer, rt)
      states = [h]
      for i in range(depth):
        states.append(block(cfg, rt, name=f"layers_{i}")(states[-1]))
      return jnp.stack([states[j] for j in layers])

    # Scanned: only the first `depth` blocks run (a scan over that slice of the stacked [L, ...] params; the
    # param tree keeps all L), and only the requested states are stored.
    depth = num if self.is_initializing() else max(layers)
    if depth == 0:
      return jnp.stack([h] * len(layers))
    wanted = sorted(set(layers))
    slot_of = {j: s for s, j in enumerate(wanted)}
    scratch = len(wanted)
    num_slots = len(wanted) + (1 if len(wanted) < depth + 1 else 0)
    table = np.array([slot_of.get(j, scratch) for j in range(depth + 1)], np.int32)
    buf = jnp.zeros((num_slots,) + h.shape, h.dtype)
    buf = jax.lax.dynamic_update_index_in_dim(buf, h, int(table[0]), 0)
    stack = common.scan_blocks(common.wrap_block(_ScannedEncoderLayer, rt), depth, in_axes=(0,))
    if depth < num:
      stack = nn.map_variables(stack, "params", trans_in_fn=lambda v: jax.tree.map(lambda x: x[:depth], v))
    (_, buf), _ = stack(cfg, rt, name="layers")((h, buf), jnp.asarray(table[1:]))
    order = [slot_of[j] for j in layers]
    if order == list(range(len(order))):
      return buf[:len(order)]
    return buf[np.array(order)]


class CLIPVisionTransformer(nn.Module):
  """CLIP ViT vision tower (HF `CLIPVisionModel.vision_model`)."""
  config: VisionConfig
  runtime: RuntimeOptions = RuntimeOptions()

  def setup(self):
    cfg, rt = self.config, self.runtime
    self.embeddings = CLIPVisionEmbeddings(cfg, rt)
    self.pre_layrnorm = _layer_norm(cfg.layer_norm_eps, rt, "pre_layrnorm")
    self.encoder = CLIPEncoder(cfg, rt)
    self.post_layernorm = _layer_norm(cfg.layer_norm_eps, rt, "post_layernorm")

  def _check_pixels(self, pixel_values: jax.Array) -> None:
    cfg = self.config
    shape = tuple(pixel_values.shape)
    if len(shape) != 4:
      raise ValueError(f"pixel_values must be [N, H, W, {cfg.num_channels}] (NHWC), got shape {shape}")
    _, hgt, wid, ch = shape
    if ch != cfg.num_channels:
      hint = " (looks like NCHW: transpose to NHWC)" if shape[1] == cfg.num_channels else ""
      raise ValueError(f"pixel_values has {ch} channels in the last axis, expected {cfg.num_channels}{hint}; "
                       f"shape {shape}")
    if hgt != cfg.image_size or wid != cfg.image_size:
      raise ValueError(f"image size {hgt}x{wid} does not match the vision config's {cfg.image_size}x"
                       f"{cfg.image_size}: position embeddings are learned for {cfg.num_positions} positions; "
                       f"resize/crop images to {cfg.image_size} px")

  def __call__(self, pixel_values: jax.Array, *, layers: Optional[Sequence[int]] = None) -> jax.Array:
    """pixel_values [N, H, W, 3] float32 (CLIP-normalized, H = W = image_size) →
    hidden states [len(layers), N, P+1, D] in the compute dtype.

    Entry 0 is the embedding output after pre_layrnorm, entry i the output of block i; negative indices
    count over the L+1 entries as in Python (-2 = output of block L-1, LLaVA's choice). layers=None → all
    L+1. post_layernorm is not applied.
    """
    self._check_pixels(pixel_values)
    sel = resolve_layers(layers, self.config.num_hidden_layers)
    dtype = self.runtime.jnp_dtype
    h = _norm(self.pre_layrnorm, self.embeddings(pixel_values), dtype)
    h = nn.with_logical_constraint(h, _ACT_AXES)
    if self.is_initializing():
      self.post_layernorm(h[:, :1].astype(jnp.float32))  # create its params (kept for checkpoint round trips)
    return self.encoder(h, sel)

  def pooled_output(self, pixel_values: jax.Array) -> jax.Array:
    """HF `pooler_output`: post_layernorm of the last block's class token, [N, D] float32."""
    last = self(pixel_values, layers=(-1,))[0]
    return self.post_layernorm(last[:, 0].astype(jnp.float32))
