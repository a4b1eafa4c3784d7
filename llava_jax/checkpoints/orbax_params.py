"""Save and restore a params pytree with orbax (exact: same tree, shapes, dtypes and values).

The training loop's full state (optimizer, step, data iterator) is the train package's business; this is the
params-only format used to hand weights between runs and tools.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from llava_jax.paths import resolve_dir


def save_params(path, params: Any, *, force: bool = True) -> str:
  """Write `params` (a pytree of jax arrays, any sharding) to the directory `path` (local, or an etils.epath URL
  such as gs://bucket/run/params); returns its absolute path / URL.

  force: replace an existing checkpoint at `path`.
  """
  path = resolve_dir(path)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, params, force=force)
    ckpt.wait_until_finished()
  return os.fspath(path)


def restore_params(path, target_shardings: Optional[Any] = None, *, host: bool = False) -> Any:
  """Read params saved by `save_params`.

  target_shardings: a pytree of `jax.sharding.Sharding` matching the saved tree (e.g.
    `llava_jax.checkpoints.hf.param_shardings(config, mesh)`): each leaf is read straight onto its shards.
    None puts every leaf on the default device (whatever mesh it was saved from).
  host: read every leaf as a numpy array in host memory instead (no device); target_shardings is ignored.
  """
  path = resolve_dir(path)
  with ocp.StandardCheckpointer() as ckpt:
    meta = ckpt.metadata(path).item_metadata
    meta = getattr(meta, "tree", meta)  # TreeMetadata wraps the saved pytree
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if host:  # numpy targets make orbax restore numpy arrays
      target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), meta)
    elif target_shardings is None:
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=default), meta)
    else:
      target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), meta,
                            _as_tree_like(meta, target_shardings))
    return ckpt.restore(path, target)


def saved_tree(path) -> Any:
  """The saved params' tree with orbax array metadata (shape, dtype) as leaves; reads no array."""
  with ocp.StandardCheckpointer() as ckpt:
    meta = ckpt.metadata(resolve_dir(path)).item_metadata
  return getattr(meta, "tree", meta)


def _as_tree_like(meta, shardings):
  """Check that the sharding tree has the saved tree's structure; raise naming the difference."""
  want = jax.tree.structure(meta)
  got = jax.tree.structure(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  if want != got:
    raise ValueError(f"target_shardings has a different tree than the saved params:\n saved {want}\n given {got}")
  return shardings
