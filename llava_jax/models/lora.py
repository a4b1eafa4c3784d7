"""LoRA (low-rank adaptation) for the decoder's linear layers, as PEFT's `lora.Linear`.

A targeted Dense computes `y = x·W + dropout(x)·A·B · (alpha / r)`: `kernel` W [in, out] is the base weight (same
name, init and numbers as `nn.Dense`, so a LoRA model's tree is the base tree plus two leaves per target),
`lora_a` A [in, r] is kaiming-uniform as PEFT (torch `kaiming_uniform_(a=√5)` on A's [r, in] weight: U(±1/√in)),
`lora_b` B [r, out] starts at zero, so a fresh adapter computes the base model. Dropout acts on the adapter's
input only (PEFT's `lora_dropout`), and only when the caller passes a 'dropout' rng (the training step); without
one the layer is deterministic. Logical axes: A (the kernel's in axis, None), B (None, the kernel's out axis), so
FSDP / tensor sharding splits the adapters like their kernel; under `nn.scan` both gain the leading [L] axis.

Which Dense layers get adapters: `LoraConfig.target`, a regex full-matched against the module path
('language_model/layers/self_attn/q_proj', ...). Built by `llama._dense` when `runtime.lora` is set; with
`runtime.lora` None the decoder uses plain `nn.Dense` and nothing here runs.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import traverse_util

from llava_jax.config import LoraConfig

LORA_A, LORA_B = "lora_a", "lora_b"
LORA_PARAMS = r".*/lora_(a|b)"  # trainable pattern (train/state.py) for every adapter leaf

# torch.nn.init.kaiming_uniform_(w, a=√5) on lora_A.weight [r, in]: gain² = 2 / (1 + 5), bound = √(3 gain² / in)
kaiming_uniform_peft = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def is_target(lora: LoraConfig, path: Tuple[str, ...]) -> bool:
  """Whether the Dense at module `path` (tuple of names) gets an adapter."""
  return re.fullmatch(lora.target, "/".join(str(p) for p in path)) is not None


class LoraDense(nn.Module):
  """`nn.Dense(use_bias=False)` plus a LoRA adapter when `is_target(lora, self.path)`: [..., in] → [..., out].

  `kernel_init` is the (logically partitioned) base kernel init; `axes` its logical (in, out) axes.
  """
  features: int
  lora: LoraConfig
  axes: Tuple[Optional[str], Optional[str]]
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  dot_general: Optional[Callable] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dot = self.dot_general or jax.lax.dot_general
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    xc, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = dot(xc, kernel, dims)  # exactly nn.Dense's computation
    if not is_target(self.lora, self.path):
      return y
    return add_adapter(self, x, y, self.lora, self.axes, self.features, self.param_dtype, self.dtype, dot)


def add_adapter(module: nn.Module, x: jax.Array, y: jax.Array, lora: LoraConfig, axes, features: int, param_dtype,
                dtype, dot: Callable) -> jax.Array:
  """y + dropout(x)·A·B · (alpha / r), creating `lora_a` / `lora_b` on `module` (called from its compact
  `__call__`; `LoraDense` and the quantized base `quant.QuantDense` share it). x [..., in], y [..., out]."""
  r = int(lora.rank)
  a = module.param(LORA_A, nn.with_logical_partitioning(kaiming_uniform_peft, (axes[0], None)),
                   (x.shape[-1], r), param_dtype)
  b = module.param(LORA_B, nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, axes[1])),
                   (r, features), param_dtype)
  h = x
  p = float(lora.dropout)
  if p > 0.0 and module.has_rng("dropout"):  # torch Dropout: zero with probability p, scale the rest by 1/(1-p)
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - p, h.shape)
    h = jnp.where(keep, h / jnp.asarray(1.0 - p, h.dtype), jnp.zeros((), h.dtype))
  h, a, b = nn.dtypes.promote_dtype(h, a, b, dtype=dtype)
  low = dot(h, a, (((h.ndim - 1,), (0,)), ((), ())))  # [..., r]
  delta = dot(low, b, (((low.ndim - 1,), (0,)), ((), ())))
  return y + (delta * jnp.asarray(lora.scale, delta.dtype)).astype(y.dtype)


# ---------------------------------------------------------------------------------------------------------
# Param-tree helpers


def adapter_paths(params) -> list:
  """Sorted param paths (tuples) of the modules holding an adapter (the parent of `lora_a`)."""
  flat = traverse_util.flatten_dict(params)
  return sorted(p[:-1] for p in flat if p[-1] == LORA_A)


def strip_lora(params):
  """The base param tree: every `lora_a` / `lora_b` leaf removed (no merge)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-1] not in (LORA_A, LORA_B)})


def merge_lora(params, lora: LoraConfig):
  """Fold every adapter into its kernel: W' = W + (alpha / r) · A·B (float32 math, W's dtype), adapters removed.

  Works on scanned trees (A [L, in, r], B [L, r, out], W [L, in, out]) and unscanned ones; numpy or jax arrays.
  The result is a base-model tree computing what the LoRA model computes without dropout.
  """
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, value in flat.items():
    if path[-1] in (LORA_A, LORA_B):
      continue
    parent = path[:-1]
    if path[-1] == "kernel" and parent + (LORA_A,) in flat:
      a, b = flat[parent + (LORA_A,)], flat[parent + (LORA_B,)]
      xp = np if isinstance(value, np.ndarray) else jnp  # jax arrays stay on their devices (and shardings)
      delta = xp.matmul(xp.asarray(a, np.float32), xp.asarray(b, np.float32)) * np.float32(lora.scale)
      value = (xp.asarray(value, np.float32) + delta).astype(value.dtype)
    out[path] = value
  return traverse_util.unflatten_dict(out)
