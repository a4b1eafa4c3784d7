"""Key tables: one row per checkpoint tensor, saying where it lives in our param tree and how to convert it.

A model family (CLIP, LLaMA, projector) provides a function returning its `KeySpec` rows; the loader streams
tensors through them and the exporter runs them backwards. Layer leaves carry `layer=i`: with scanned layers
they are stacked along a new leading axis at the `layers` component of the path, unscanned they go to
`layers_{i}`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np


def identity(x: np.ndarray) -> np.ndarray:
  return x


def transpose(x: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] ⇄ Flax kernel [in, out]."""
  return np.ascontiguousarray(x.T)


def conv_to_flax(x: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] → Flax kernel [kh, kw, in, out]."""
  return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def conv_to_torch(x: np.ndarray) -> np.ndarray:
  """Flax kernel [kh, kw, in, out] → torch Conv2d weight [out, in, kh, kw]."""
  return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


@dataclasses.dataclass(frozen=True)
class KeySpec:
  """One checkpoint tensor ⇄ one param leaf (or one layer slice of a stacked leaf).

  hf_key: the tensor's name in the checkpoint (in our canonical layout; loaders rename other layouts first).
  path: param path; for layer leaves it contains the component 'layers' (stacked) — e.g.
    ('language_model', 'layers', 'self_attn', 'q_proj', 'kernel').
  layer: layer index for per-layer tensors, None otherwise.
  to_flax / to_hf: array conversions (transpose for Linear, conv layout for Conv2d).
  """
  hf_key: str
  path: Tuple[str, ...]
  layer: Optional[int] = None
  to_flax: Callable[[np.ndarray], np.ndarray] = identity
  to_hf: Callable[[np.ndarray], np.ndarray] = identity


def unscanned_path(path: Tuple[str, ...], layer: int) -> Tuple[str, ...]:
  """('x', 'layers', 'y') → ('x', 'layers_3', 'y') for layer 3."""
  i = path.index("layers")
  return path[:i] + (f"layers_{layer}",) + path[i + 1:]


def leaf_path(spec: KeySpec, scan_layers: bool) -> Tuple[str, ...]:
  if spec.layer is None or scan_layers:
    return spec.path
  return unscanned_path(spec.path, spec.layer)


def group_by_leaf(specs: Iterable[KeySpec], scan_layers: bool) -> Dict[Tuple[str, ...], List[KeySpec]]:
  """Param leaf path → the rows that fill it (several, in layer order, for a stacked leaf)."""
  groups: Dict[Tuple[str, ...], List[KeySpec]] = {}
  for s in specs:
    groups.setdefault(leaf_path(s, scan_layers), []).append(s)
  for rows in groups.values():
    rows.sort(key=lambda s: -1 if s.layer is None else s.layer)
  return groups


def set_in(tree: dict, path: Tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def get_in(tree, path: Tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def export_tensors(specs: Iterable[KeySpec], params: dict, scan_layers: bool) -> Iterator[Tuple[str, np.ndarray]]:
  """Yield (hf_key, array in checkpoint layout) for every row, reading one leaf at a time from `params`."""
  for path, rows in group_by_leaf(specs, scan_layers).items():
    leaf = np.asarray(get_in(params, path))
    for s in rows:
      value = leaf[s.layer] if (s.layer is not None and scan_layers) else leaf
      yield s.hf_key, s.to_hf(value)


def params_from_tensors(specs: Iterable[KeySpec], get_tensor: Callable[[str], np.ndarray], scan_layers: bool,
                        dtype=None) -> dict:
  """Build a nested dict of numpy params from checkpoint tensors (the simple, all-in-memory path).

  get_tensor(hf_key) returns the array in checkpoint layout (KeyError if absent). Layer rows of one leaf are
  stacked on a new leading axis when `scan_layers` (they must cover layers 0..L-1 exactly once).
  dtype: target dtype (name or numpy/jax dtype, e.g. 'bfloat16'); None keeps the checkpoint's.
  """
  dtype = None if dtype is None else np.dtype(_np_dtype(dtype))
  params: dict = {}
  for path, rows in group_by_leaf(specs, scan_layers).items():

    def read(s):
      try:
        x = get_tensor(s.hf_key)
      except KeyError:
        raise KeyError(f"checkpoint has no tensor {s.hf_key!r} (needed for param {'/'.join(path)})") from None
      return s.to_flax(np.asarray(x))

    if scan_layers and rows[0].layer is not None:
      got = [s.layer for s in rows]
      if got != list(range(len(rows))):
        raise ValueError(f"param {'/'.join(path)}: layer rows {got} do not cover 0..{len(rows) - 1} once each")
      value = None
      for i, s in enumerate(rows):  # each slice cast straight into the stacked array: no list of slices
        x = read(s)
        if value is None:
          value = aligned_empty((len(rows),) + x.shape, x.dtype if dtype is None else dtype)
        elif x.shape != value.shape[1:]:
          raise ValueError(f"param {'/'.join(path)}: layers have different shapes {sorted({value.shape[1:], x.shape})}")
        value[i] = x
        del x
    else:
      if len(rows) > 1:
        raise ValueError(f"param {'/'.join(path)} is filled by several rows: {[s.hf_key for s in rows]}")
      value = read(rows[0])
      value = value if dtype is None else value.astype(dtype)
    set_in(params, path, value)
  return params


def aligned_empty(shape, dtype, alignment: int = 64) -> np.ndarray:
  """np.empty whose data starts on an `alignment`-byte boundary: `jax.device_put` on the CPU backend then
  adopts the buffer instead of copying it (a stacked [L, ...] leaf is held once, not twice, while loading)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + alignment, np.uint8)
  start = (-raw.ctypes.data) % alignment
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def _np_dtype(dtype):
  if isinstance(dtype, str):
    import ml_dtypes  # bfloat16 & co. as numpy dtypes (a jax dependency)
    return getattr(ml_dtypes, dtype) if hasattr(ml_dtypes, dtype) else np.dtype(dtype)
  return dtype
