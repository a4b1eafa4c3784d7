"""The real TPU compiler without TPUs: libtpu's compile-only devices, and the bytes of its tiled layouts.

`pip install "libtpu==<the version jax[tpu] pins>"` (the `dev` extra) makes `jax.experimental.topologies` hand
out the devices of any TPU slice ('v5e:2x2', 'v5p:2x4x4', ...) on a CPU-only machine: a Mesh over them and
`jax.jit(...).lower(<ShapeDtypeStructs>).compile()` run the TPU compiler, and `memory_analysis()` gives the
TPU's own per-device bytes. Nothing can be executed on them.

TPU buffers are stored in tiles ((8, 128) for float32 matrices, (128,) for small vectors, ...), so a buffer
takes its shape rounded up to the tile: `tiled_bytes` computes that from the layout the compiler chose, which
is how the compiler's argument bytes are checked against the shardings we compute (tests/scale).
"""
from __future__ import annotations

import importlib.util
import math
from typing import Optional, Sequence


def libtpu_available() -> bool:
  """True when libtpu can be imported (TPU compiles possible)."""
  return importlib.util.find_spec("libtpu") is not None


def libtpu_version() -> Optional[str]:
  """The installed libtpu's version, or None."""
  import importlib.metadata
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


def tpu_devices(topology: str):
  """Compile-only devices of a TPU topology ('v5e:2x2', 'v5p:2x4x4'): one per chip. Needs libtpu, no TPU.

  libtpu lets one process per machine load it (/tmp/libtpu_lockfile) unless ALLOW_MULTIPLE_LIBTPU_LOAD is set;
  compile-only use touches no TPU, so several planning processes (and test sessions) may compile at once.
  """
  import os
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
  if any(getattr(d, "core_on_chip", 0) for d in devices):
    # v4 is listed per TensorCore (two per chip, each seeing half the chip's HBM: 15.25 of 30.75 GiB); on a TPU VM
    # jax runs such a chip as one "megacore" device, which is what libtpu's megacore chip config describes.
    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                           chip_config_name="megacore").devices
  return list(devices)


def tiled_bytes(shape: Sequence[int], dtype, layout) -> int:
  """Bytes of one buffer of `shape` stored in `layout` (a `jax.experimental.layout.Layout` with
  `major_to_minor` and `tiling`; None for a pruned argument: 0 bytes): the dimensions, in physical
  (major → minor) order, rounded up to the first (outer) tile on the minor-most ones. Later tiles only
  subdivide that one (sub-word packing)."""
  import numpy as np
  if layout is None:  # an argument the compiled program does not use (pruned): no buffer
    return 0
  itemsize = np.dtype(dtype).itemsize
  shape = tuple(int(d) for d in shape)
  physical = [shape[d] for d in layout.major_to_minor] if shape else [1]  # a scalar fills a whole tile too
  tiles = getattr(layout, "tiling", None) or ()
  if tiles:
    tile = tiles[0]
    k = len(tile)
    for i, t in enumerate(tile):
      j = len(physical) - k + i
      if j >= 0:
        physical[j] = -(-physical[j] // t) * t
  return math.prod(physical) * itemsize


def tiled_bytes_per_device(abstract, formats) -> int:
  """Per-device bytes of a pytree of sharded ShapeDtypeStructs stored in the compiler's formats (a pytree of
  `Format`s of the same structure, e.g. `compiled.input_formats[0]`)."""
  import jax
  leaves = jax.tree.leaves(abstract)
  fmts = jax.tree.leaves(formats, is_leaf=lambda x: hasattr(x, "layout"))
  if len(leaves) != len(fmts):
    raise ValueError(f"{len(leaves)} arrays but {len(fmts)} formats")
  total = 0
  for x, f in zip(leaves, fmts):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += tiled_bytes(shape, x.dtype, f.layout)
  return total
