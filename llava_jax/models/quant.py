"""Weight-only quantization of the decoder's linear layers: int8, int4 and NF4 kernels dequantized in the matmul.

`runtime.quantize` ('int8' | 'int4' | 'nf4') replaces the `kernel` [in, out] of every decoder Dense built by
`llama._dense` (q/k/v/o/gate/up/down_proj) with two leaves:

  'int8'  kernel_q int8 [in, out], kernel_scale float32 [out]: symmetric per output channel,
          scale = absmax over `in` / 127, q = round(w / scale) in [-127, 127] (torch's `quantize_per_channel`
          with these scales gives the same integers). 1 byte + 4 / in per parameter.
  'int4'  kernel_q uint8 [in / 2, out], kernel_scale float32 [in / 64, out]: symmetric in groups of 64 along
          `in`, scale = absmax / 7, q = round(w / scale) in [-8, 7] stored as the nibble q + 8, two per byte
          (row 2i in the high nibble, row 2i + 1 in the low one). 0.5 + 4 / 64 bytes per parameter.
  'nf4'   kernel_q uint8 [in / 2, out], kernel_scale float32 [in / 64, out]: bitsandbytes' NF4 (the reference
          LLaVA's `--load-4bit` / `--bits 4` default `bnb_4bit_quant_type`): blocks of 64 consecutive weights of
          torch's [out, in] weight (= 64 rows of `in` for one output column here) scaled by their absmax, each
          mapped to the nearest of the 16 NF4 code values (`NF4_CODE`, bnb's rule: bucketize against the
          midpoints), packed two per byte in bnb's order. No double quantization (bnb's
          `bnb_4bit_use_double_quant`): absmax stays float32. 0.5 + 4 / 64 bytes per parameter.

Embeddings, lm_head, norms, the vision tower and the projector keep `runtime.param_dtype` (bitsandbytes also
keeps lm_head in full precision). The reference's `--load-8bit` / `--load-4bit` (bnb via transformers) also
converts the projector's Linear layers; we do not: the projector is ~0.3 % of a 7B model.

`QuantDense` computes y = x · deq(W) with deq(W) built per layer in the compute dtype inside the jitted function
(the fusion of dequantization into the dot is left to XLA); a 4-bit kernel is dequantized as its even rows (high
nibbles) and odd rows (low nibbles) and multiplied as x[..., 0::2] · even + x[..., 1::2] · odd with float32 sums
(the same products, without building the interleaved weight), plus the LoRA delta exactly as `lora.LoraDense`
when `runtime.lora` also targets the layer (QLoRA: the quantized base is frozen, it holds no float leaf).
Logical axes of kernel_q / kernel_scale are the kernel's ([out] only for int8's scale), so FSDP / tensor
sharding and `nn.scan`'s leading [L] axis apply as to the float kernel. Group sizes: `in` must be a multiple
of 64 for int4 / nf4 (every LLaMA width is), and a sharded group axis (in / 64) must divide its mesh axis.

Host side: `quantize_kernel` (numpy, [..., in, out], layer by layer) and `quantize_params` (a float param tree,
leaf by leaf, in place) turn float checkpoints into quantized trees before they reach a device.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import traverse_util

from llava_jax.config import QUANTIZE_MODES, LoraConfig
from llava_jax.models import lora as lora_lib

GROUP = 64  # int4 / nf4 group (bnb blocksize) along the in axis
KERNEL_Q, KERNEL_SCALE = "kernel_q", "kernel_scale"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DECODER = "language_model"

# bitsandbytes' NF4 code (`bitsandbytes.functional.get_4bit_type('nf4')`), float32, sorted ascending
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
    1.0], np.float32)
_NF4_BOUNDS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)  # bnb's midpoints


def check_mode(mode: str) -> str:
  if mode not in QUANTIZE_MODES:
    raise ValueError(f"quantize={mode!r}; choose one of {QUANTIZE_MODES}")
  return mode


def quantized_shapes(in_features: int, out_features: int, mode: str) -> Tuple[Tuple[tuple, Any], Tuple[tuple, Any]]:
  """((kernel_q shape, dtype), (kernel_scale shape, dtype)) of a quantized [in, out] kernel."""
  check_mode(mode)
  if mode == "int8":
    return ((in_features, out_features), jnp.int8), ((out_features,), jnp.float32)
  if in_features % GROUP:
    raise ValueError(f"quantize={mode!r} groups {GROUP} weights along the in axis: in_features={in_features} is "
                     f"not a multiple of {GROUP}")
  return ((in_features // 2, out_features), jnp.uint8), ((in_features // GROUP, out_features), jnp.float32)


# ---------------------------------------------------------------------------------------------------------
# Host-side quantization (numpy)


def _pack_nibbles(n: np.ndarray) -> np.ndarray:
  """uint8 nibbles [in, out] (values 0..15) → bytes [in / 2, out]: row 2i high, row 2i + 1 low (bnb's order)."""
  return ((n[0::2] << 4) | n[1::2]).astype(np.uint8)


def _quantize_2d(w: np.ndarray, mode: str) -> Tuple[np.ndarray, np.ndarray]:
  """One float32 kernel [in, out] → (q, scale) as described in the module docstring."""
  if mode == "int8":
    scale = (np.max(np.abs(w), axis=0) / np.float32(127)).astype(np.float32)  # [out]
    q = np.clip(np.round(w / np.where(scale == 0, np.float32(1), scale)), -127, 127).astype(np.int8)
    return q, scale
  groups = w.reshape(w.shape[0] // GROUP, GROUP, w.shape[1])  # [G, 64, out]
  absmax = np.max(np.abs(groups), axis=1)  # [G, out]
  if mode == "int4":
    scale = (absmax / np.float32(7)).astype(np.float32)
    q = np.clip(np.round(groups / np.where(scale == 0, np.float32(1), scale)[:, None]), -8, 7)
    nibbles = (q + 8).astype(np.uint8)
  else:  # nf4, bnb's rule: clamp(x * (1 / absmax), -1, 1), bucketize against the code midpoints
    inv = (np.float32(1) / np.maximum(absmax, np.float32(1e-38))).astype(np.float32)
    normed = np.clip(groups * inv[:, None], np.float32(-1), np.float32(1))
    nibbles = np.searchsorted(_NF4_BOUNDS, normed, side="left").astype(np.uint8)
    scale = absmax.astype(np.float32)
  return _pack_nibbles(nibbles.reshape(w.shape)), scale


def quantize_kernel(w, mode: str) -> Dict[str, np.ndarray]:
  """Float kernel [..., in, out] (numpy / jax, any float dtype) → {'kernel_q', 'kernel_scale'} numpy arrays
  with the same leading dims (a scanned [L, in, out] leaf is quantized one layer at a time: float32
  temporaries of one [in, out] slice)."""
  check_mode(mode)
  w = np.asarray(w)
  if w.ndim < 2:
    raise ValueError(f"quantize_kernel needs a kernel [..., in, out], got shape {w.shape}")
  lead, (d_in, d_out) = w.shape[:-2], w.shape[-2:]
  (q_shape, q_dtype), (s_shape, s_dtype) = quantized_shapes(d_in, d_out, mode)
  q = np.empty(lead + q_shape, q_dtype)
  scale = np.empty(lead + s_shape, s_dtype)
  for idx in np.ndindex(*lead):
    q[idx], scale[idx] = _quantize_2d(np.asarray(w[idx], np.float32), mode)
  return {KERNEL_Q: q, KERNEL_SCALE: scale}


def is_quantized_path(path: Tuple[str, ...]) -> bool:
  """Whether a param path (tuple of names, ending in 'kernel') is a kernel `runtime.quantize` replaces."""
  return len(path) >= 3 and path[0] == DECODER and path[-1] == "kernel" and path[-2] in TARGET_MODULES


def float_kernels(tree) -> list:
  """Sorted paths (tuples) of the float decoder kernels `runtime.quantize` replaces, in any tree with the param
  paths (params, orbax metadata, shapes)."""
  return sorted(p for p in traverse_util.flatten_dict(tree) if is_quantized_path(p))


def quantize_params(params: dict, mode: str) -> dict:
  """Quantize every decoder q/k/v/o/gate/up/down `kernel` leaf of a float param tree (scanned [L, in, out] or
  unscanned), IN PLACE: each float leaf is replaced by its kernel_q / kernel_scale as soon as it is converted,
  so host memory peaks at the params plus one leaf's temporaries (when the caller holds no other reference to
  the leaves). Returns `params` (the same dict), leaves as numpy arrays. Other leaves are untouched."""
  check_mode(mode)
  paths = [p for p in traverse_util.flatten_dict(params) if is_quantized_path(p)]
  if not paths:
    raise ValueError("quantize_params: the tree has no decoder q/k/v/o/gate/up/down_proj kernel (already "
                     "quantized, or not a LLaVA param tree)")
  for path in paths:
    parent = params
    for name in path[:-1]:
      parent = parent[name]
    parent.update(quantize_kernel(parent.pop("kernel"), mode))
  return params


def dequantize_params(params: dict, mode: str, dtype=np.float32) -> dict:
  """The float tree a quantized one stands for: every kernel_q / kernel_scale pair → `kernel` in `dtype` as host
  numpy, dequantized one layer at a time (a scanned [L, ...] leaf is never dequantized whole on a device); other
  leaves as they are. For export (QLoRA's merged weights are W = deq(Q) + (alpha / r)·A·B)."""
  check_mode(mode)
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, value in flat.items():
    if path[-1] == KERNEL_Q:
      q, scale = np.asarray(value), np.asarray(flat[path[:-1] + (KERNEL_SCALE,)])
      lead = q.shape[:-2]
      layers = [np.asarray(dequantize_kernel(q[i], scale[i], mode, np.float32)) for i in np.ndindex(*lead)]
      kernel = np.stack(layers).reshape(lead + layers[0].shape) if lead else layers[0]
      out[path[:-1] + ("kernel",)] = kernel.astype(dtype)
    elif path[-1] != KERNEL_SCALE:
      out[path] = value
  return traverse_util.unflatten_dict(out)


# ---------------------------------------------------------------------------------------------------------
# Device-side dequantization (jnp)


def dequantize_halves(q: jax.Array, scale: jax.Array, mode: str, dtype=jnp.float32) -> Tuple[jax.Array, jax.Array]:
  """A 4-bit (kernel_q [..., in / 2, out], kernel_scale [..., in / 64, out]) → the float rows it packs, without
  interleaving them: (even rows [..., in / 2, out] from the high nibbles, odd rows from the low ones), so
  x · W = x[..., 0::2] · even + x[..., 1::2] · odd (what `QuantDense` computes: XLA:CPU materializes an
  interleaved [in, out] weight slowly)."""
  p = q.astype(jnp.int32)
  half = GROUP // 2  # packed rows per group
  s = scale.astype(jnp.float32)[..., :, None, :]  # [..., G, 1, out]

  def rows(n):
    values = (n - 8).astype(jnp.float32) if mode == "int4" else jnp.asarray(NF4_CODE)[n]
    grouped = values.reshape(n.shape[:-2] + (n.shape[-2] // half, half, n.shape[-1]))
    return (grouped * s).reshape(n.shape).astype(dtype)

  return rows(p >> 4), rows(p & 0xF)


def dequantize_kernel(q: jax.Array, scale: jax.Array, mode: str, dtype=jnp.float32) -> jax.Array:
  """(kernel_q, kernel_scale) with any leading dims → the float kernel [..., in, out] in `dtype` (the products
  are float32, as bnb's dequantization; then cast)."""
  check_mode(mode)
  if mode == "int8":
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None, :]).astype(dtype)
  even, odd = dequantize_halves(q, scale, mode, jnp.float32)  # inverse of `_pack_nibbles`: row 2i high, 2i + 1 low
  w = jnp.stack([even, odd], axis=-2)  # [..., in / 2, 2, out]
  return w.reshape(q.shape[:-2] + (2 * q.shape[-2], q.shape[-1])).astype(dtype)


def _init_quantized(kernel_init: Callable, rng: jax.Array, shape: tuple, mode: str) -> Dict[str, jax.Array]:
  """{'kernel_q', 'kernel_scale'} of `kernel_init` on the float [in, out] kernel, quantized by `quantize_kernel`
  on the host (one callback, so q and scale come from the same float kernel)."""
  (qs, qd), (ss, sd) = quantized_shapes(shape[0], shape[1], mode)
  w = kernel_init(rng, shape, jnp.float32)
  q, scale = jax.pure_callback(lambda a: tuple(quantize_kernel(a, mode).values()),
                               (jax.ShapeDtypeStruct(qs, qd), jax.ShapeDtypeStruct(ss, sd)), w)
  return {KERNEL_Q: q, KERNEL_SCALE: scale}


class QuantDense(nn.Module):
  """Bias-free Dense over a quantized kernel: x [..., in] → [..., out] = x · deq(W) (+ LoRA delta).

  mode: 'int8' | 'int4' | 'nf4'; axes: the float kernel's logical (in, out) axes; kernel_init: the float
  kernel's (unboxed) init, used only by `init`; lora: `runtime.lora` (adapters when it targets this path).
  """
  features: int
  mode: str
  axes: Tuple[Optional[str], Optional[str]]
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  dot_general: Optional[Callable] = None
  lora: Optional[LoraConfig] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dot = self.dot_general or jax.lax.dot_general
    shape = (x.shape[-1], self.features)
    (q_shape, q_dtype), (s_shape, s_dtype) = quantized_shapes(*shape, self.mode)
    scale_axes = (self.axes[1],) if len(s_shape) == 1 else self.axes
    # At init: `kernel_init`'s float kernel (drawn with the rng `nn.Dense` would use), quantized. Otherwise flax
    # only traces the init fns (eval_shape) to check the given params' shapes: zeros are never materialized.
    fresh = {KERNEL_Q: lambda: jnp.zeros(q_shape, q_dtype), KERNEL_SCALE: lambda: jnp.zeros(s_shape, s_dtype)}
    if self.is_initializing() and not self.has_variable("params", KERNEL_Q):
      drawn = _init_quantized(self.kernel_init, self.make_rng("params"), shape, self.mode)
      fresh = {k: (lambda v=v: v) for k, v in drawn.items()}
    q = self.param(KERNEL_Q, nn.with_logical_partitioning(lambda *_: fresh[KERNEL_Q](), self.axes))
    scale = self.param(KERNEL_SCALE, nn.with_logical_partitioning(lambda *_: fresh[KERNEL_SCALE](), scale_axes))
    dtype = self.dtype or x.dtype
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    if self.mode == "int8":
      y = dot(x.astype(dtype), dequantize_kernel(q, scale, self.mode, dtype), dims)
    else:  # the even and odd input rows as two dots, float32 sums (one rounding to `dtype`, as a single dot)
      even, odd = dequantize_halves(q, scale, self.mode, dtype)
      xd = x.astype(dtype)
      y = (dot(xd[..., 0::2], even, dims, preferred_element_type=jnp.float32)
           + dot(xd[..., 1::2], odd, dims, preferred_element_type=jnp.float32)).astype(dtype)
    if self.lora is None or not lora_lib.is_target(self.lora, self.path):
      return y
    return lora_lib.add_adapter(self, x, y, self.lora, self.axes, self.features, self.param_dtype, self.dtype, dot)
