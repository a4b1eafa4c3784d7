"""attention_impl='splash': jax's Pallas TPU splash-attention kernel for the decoder's causal, segment-masked
self-attention (training and prefill without a KV cache).

`splash_attention(q, k, v, segment_ids)` computes exactly what the 'xla' kernel computes on
`segment_causal_mask(segment_ids)`: token i attends to j iff j ≤ i and seg[i] == seg[j] != 0, scale hd^-0.5,
softmax in float32 — for every query with seg != 0. The kernel (`jax.experimental.pallas.ops.tpu.
splash_attention`) takes the causal part as a static `CausalMask` (blocks above the diagonal are skipped, the
diagonal blocks masked in-kernel) and the rest as `SegmentIds`; it never materializes a [T, S] mask or scores.

Differences from 'xla', none visible at valid positions:
- Padding queries (seg 0) attend to the earlier padding keys of their row (the kernel's segment test is
  seg[i] == seg[j], which holds for 0 == 0), where 'xla' gives them a uniform softmax over the whole row. Each
  such row still sees itself, so nothing is NaN; valid queries never see a padding key either way.
- The kernel takes no scale: q is multiplied by hd^-0.5 (in float32, then cast back) before it.

Layout, padding, blocks: the kernel is per example, head-major (q [H, T, hd], k/v [Hkv, T, hd]; GQA is native:
q head h reads kv head h // (H / Hkv), HF's repeat_kv order) and vmapped over the batch. T is padded with
segment id 0 to a multiple of 128 (the TPU lane width, which the segment-id blocks need) and the output sliced
back. Every block size (forward q/kv, backward dq and dkv) is the largest of 512, 256, 128 dividing the padded
length: 512 is MaxText's default for splash, large enough to amortize the per-block softmax bookkeeping, and
choosing a divisor wastes at most 127 padded positions. head_dim is unconstrained (blocks span the whole head
dimension; 64 and 128 compile for TPU, see tests/models/test_splash_attention.py).

Sharding: Mosaic kernels are not partitioned by XLA, so under a mesh (`jax.set_mesh`) the kernel runs in
`jax.shard_map`: batch over the mesh axes the logical axis rules give 'batch' (parallel.LOGICAL_AXIS_RULES:
data, fsdp), heads over those of 'act_heads' (tensor), the sequence whole. An axis that does not divide the
batch (or the heads) is left out, i.e. that dimension is replicated over it; when the q heads divide over
'tensor' but the kv heads do not, k/v are repeated to one head per q head first (exact, MHA form).

Backend: on TPU targets the compiled Mosaic kernel; on any other platform the same kernel in Pallas interpret
mode (exact, slow), logged once. The platform is that of the devices the computation is compiled for — the
mesh's (`jax.sharding.get_abstract_mesh().abstract_device`), else the default device — not the host's
default backend, so a TPU program can be compiled ahead of time on a CPU host.

Remat: the kernel's residuals (its output and log-sum-exp) are named 'attn_out', so the 'save_attn_out' policy
keeps them and the backward pass does not recompute the attention forward.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib
from jax.sharding import AxisType, PartitionSpec as P

logger = logging.getLogger(__name__)

LANES = 128                      # TPU lane width: the padded sequence length is a multiple of it
BLOCK_SIZES = (512, 256, 128)    # candidates, largest first; see the module docstring
RESIDUAL_NAME = "attn_out"       # checkpoint name of the kernel's residuals (the remat policy 'save_attn_out')


def padded_length(t: int) -> int:
  """Sequence length the kernel runs at: t rounded up to a multiple of 128."""
  return -(-t // LANES) * LANES


def block_size(length: int) -> int:
  """Largest of 512, 256, 128 dividing `length` (a multiple of 128)."""
  return next(b for b in BLOCK_SIZES if length % b == 0)


def target_platform() -> str:
  """Platform of the devices being compiled for: the active mesh's, else the default device's."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  if device is not None:
    return device.platform
  default = jax.config.jax_default_device
  if default is None:
    return jax.devices()[0].platform
  return default if isinstance(default, str) else default.platform


@functools.lru_cache(maxsize=None)
def _log_interpret_once(platform: str) -> None:
  logger.warning("attention_impl='splash' on %s: running the Pallas TPU kernel in interpret mode (exact, slow); "
                 "use it for tests, not for speed", platform)


def _kernel(heads: int, length: int, interpret: bool):
  """Splash MHA kernel for one example: q [heads, length, hd], k/v [Hkv, length, hd] + SegmentIds([length] x2).

  Built inside the trace from the local (per-shard) head count; the mask analysis is cached by jax
  (`splash_attention_mask_info._process_mask` is an lru_cache on the mask)."""
  b = block_size(length)
  sizes = splash_lib.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = splash_lib.MultiHeadMask([splash_lib.CausalMask((length, length))] * heads)
  return splash_lib.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    residual_checkpoint_name=RESIDUAL_NAME, interpret=interpret)


def _local_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     interpret: bool) -> jax.Array:
  """The kernel vmapped over a (local) batch: q [b, H, Tp, hd], k/v [b, Hkv, Tp, hd], segment_ids [b, Tp]
  → [b, H, Tp, hd]."""
  kernel = _kernel(q.shape[1], q.shape[2], interpret)
  return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash_lib.SegmentIds(q=s1, kv=s1)))(
      q, k, v, segment_ids)


def _mesh_axes(logical: str, sizes: dict) -> Tuple[str, ...]:
  """Axes of the mesh (`sizes`: name → size) the active logical axis rules assign to `logical` (() without
  rules)."""
  spec = nn.logical_to_mesh_axes((logical,))
  axes = None if spec is None else spec[0]
  if axes is None:
    return ()
  return tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in sizes)


def _dividing_axes(axes: Tuple[str, ...], sizes: dict, n: int) -> Tuple[str, ...]:
  """The longest prefix of `axes` whose mesh sizes multiply to a divisor of `n`."""
  while axes and n % int(np.prod([sizes[a] for a in axes])):
    axes = axes[:-1]
  return axes


def _spec_entry(axes: Tuple[str, ...]):
  return None if not axes else (axes[0] if len(axes) == 1 else axes)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     interpret: Optional[bool] = None) -> jax.Array:
  """Causal, segment-masked attention with the splash kernel.

  q [B, T, H, hd], k/v [B, T, Hkv, hd] (Hkv divides H), segment_ids [B, T] int (0 = padding)
  → [B, T, H, hd] in q's dtype. `interpret` None: interpret mode unless the target platform is TPU.
  """
  b, t, h, hd = q.shape
  hkv = k.shape[2]
  if k.shape != (b, t, hkv, hd) or v.shape != k.shape or h % hkv:
    raise ValueError(f"splash attention needs q [B, T, H, hd] and k, v [B, T, Hkv, hd] with Hkv dividing H "
                     f"(self-attention); got q {q.shape}, k {k.shape}, v {v.shape}")
  if segment_ids.shape != (b, t):
    raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
  if interpret is None:
    platform = target_platform()
    interpret = platform != "tpu"
    if interpret:
      _log_interpret_once(platform)

  tp = padded_length(t)
  scaled = (q.astype(jnp.float32) * (hd ** -0.5)).astype(q.dtype)
  heads_major = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
  qh, kh, vh = heads_major(scaled), heads_major(k), heads_major(v)  # [B, H|Hkv, Tp, hd]
  seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)))  # padding: segment 0
  local = functools.partial(_local_attention, interpret=interpret)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or all(ty == AxisType.Manual for ty in mesh.axis_types):  # no mesh, or inside a shard_map
    out = local(qh, kh, vh, seg)
  else:
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch_axes = _dividing_axes(_mesh_axes("batch", sizes), sizes, b)
    head_axes = _dividing_axes(_mesh_axes("act_heads", sizes), sizes, h)
    head_shards = int(np.prod([sizes[a] for a in head_axes]))
    if hkv % head_shards:  # q heads split over 'tensor', kv heads do not: one kv head per q head (exact)
      kh, vh = (jnp.repeat(x, h // hkv, axis=1) for x in (kh, vh))
    heads_spec = P(_spec_entry(batch_axes), _spec_entry(head_axes))
    out = jax.shard_map(local, mesh=mesh, in_specs=(heads_spec, heads_spec, heads_spec, P(_spec_entry(batch_axes))),
                        out_specs=heads_spec, check_vma=False)(qh, kh, vh, seg)
  return jnp.swapaxes(out[:, :, :t], 1, 2)
