"""bfloat16 weights of scanned layer stacks as uint16 bit patterns, for generation on XLA:CPU.

XLA:CPU's `float-normalization-bf16` pass does not accept bfloat16 for the `dynamic-slice` a scan over layers
does on its stacked `[L, ...]` weights: it converts the whole stack to float32 before slicing, the convert is
loop-invariant and is hoisted, and the compiled call holds a float32 copy of every layer (2× the bf16 params on
top of them: a 7B prefill asked for 27.8 GB more). Integers are sliced as they are, so `bit_views` hands the
stacks to the jitted function as uint16 *views* of the same buffers (no copy) and the scan body bitcasts each
layer's slice back to bfloat16 (`models.common.scan_blocks`). Other backends have bf16 dots: nothing changes there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from llava_jax.models.common import SCANNED_STACK


def _view(x: jax.Array) -> jax.Array:
  """The same buffers as uint16 (each shard viewed on its own device; no copy on CPU)."""
  shards = [jax.device_put(np.asarray(s.data).view(np.uint16), s.device) for s in x.addressable_shards]
  return jax.make_array_from_single_device_arrays(x.shape, x.sharding, shards)


def bit_views(params):
  """`params` with every bfloat16 leaf of a scanned stack (a 'layers' level in its path) replaced by its uint16
  view, when all of them live on CPU devices and are fully addressable; else `params` unchanged."""
  flat = traverse_util.flatten_dict(params)
  stacked = {p: x for p, x in flat.items()
             if SCANNED_STACK in p and isinstance(x, jax.Array) and x.dtype == jnp.bfloat16}
  if not stacked or any(not x.is_fully_addressable or any(d.platform != "cpu" for d in x.sharding.device_set)
                        for x in stacked.values()):
    return params
  return traverse_util.unflatten_dict({**flat, **{p: _view(x) for p, x in stacked.items()}})
