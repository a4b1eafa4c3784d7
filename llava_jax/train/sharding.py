"""Shardings for training: params (from the logical-axis table), optimizer state, and global batches.

Params get their NamedShardings from the modules' logical axis names through `parallel.LOGICAL_AXIS_RULES`.
Optimizer-state leaves that mirror a parameter (AdamW's mu / nu) take that parameter's sharding; scalars
(step counts) are replicated. Batches are split over the ('data', 'fsdp') mesh axes; each process passes
only its own rows and `jax.make_array_from_process_local_data` assembles the global array.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llava_jax import parallel

BATCH_AXES = ("data", "fsdp")


def batch_shards(mesh: Mesh) -> int:
  """Number of ways a batch is split: data × fsdp."""
  return int(mesh.shape["data"] * mesh.shape["fsdp"])


def param_shardings(logical_specs, mesh: Mesh):
  """Pytree of logical PartitionSpecs (`llava.logical_partition_specs`) → NamedShardings on `mesh`."""
  return parallel.logical_to_sharding(logical_specs, mesh)


def _trailing_dict_keys(path) -> tuple:
  keys = []
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    keys.append(k.key)
  return tuple(reversed(keys))


def mirror_param_shardings(abstract_tree, abstract_params, shardings, mesh: Mesh):
  """Shardings for a tree (e.g. an optax state) whose leaves may mirror parameters.

  A leaf whose path ends in a parameter's path, with the parameter's shape, gets that parameter's sharding;
  every other leaf (counts, scalars, factored statistics) is replicated.
  """
  shapes = {p: tuple(x.shape) for p, x in traverse_util.flatten_dict(abstract_params).items()}
  sh = traverse_util.flatten_dict(shardings)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = _trailing_dict_keys(path)
    if keys in sh and shapes.get(keys) == tuple(np.shape(leaf)):
      return sh[keys]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def check_batch_rows(global_rows: int, mesh: Mesh, micro_batches: int = 1, what: str = "batch") -> None:
  """Raise ValueError naming the fix unless the global batch splits evenly over devices and micro-batches."""
  n = batch_shards(mesh)
  if micro_batches < 1:
    raise ValueError(f"micro_batches={micro_batches} must be ≥ 1")
  if global_rows % (n * micro_batches):
    raise ValueError(
        f"{what} of {global_rows} rows cannot be split into {micro_batches} micro-batch(es) over data×fsdp = "
        f"{mesh.shape['data']}×{mesh.shape['fsdp']} = {n} devices: make train.global_batch_size a multiple of "
        f"{n * micro_batches} (= data·fsdp·micro_batches), or change train.micro_batches / config.mesh")


def check_image_slots(batch: Mapping[str, np.ndarray], num_image_tokens: int, image_token_index: int) -> None:
  """Per-host check: placeholders in input_ids == valid images × tokens per image (else ValueError)."""
  ids = np.asarray(batch["input_ids"])
  found = int(np.sum(ids == image_token_index))
  px = batch.get("pixel_values")
  n_img = 0 if px is None else int(np.shape(px)[0])
  valid = batch.get("image_valid")
  n_valid = n_img if valid is None else int(np.sum(np.asarray(valid)))
  if found != n_valid * num_image_tokens:
    raise ValueError(f"batch holds {found} image placeholders (id {image_token_index}) but {n_valid} valid image(s) "
                     f"× {num_image_tokens} tokens = {n_valid * num_image_tokens}: each image needs exactly one "
                     f"run of {num_image_tokens} placeholders")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, *, micro_batches: int = 1) -> Dict[str, jax.Array]:
  """This process's rows (numpy dict) → global jax.Arrays sharded over ('data', 'fsdp') on the leading axis.

  Every array is split on axis 0: token arrays `[b, T]` by rows, `pixel_values [n_img, S, S, 3]` and
  `image_valid [n_img]` by image slots (so n_img × processes must be a multiple of data × fsdp too).
  Arrays that are already global jax.Arrays are passed through (resharded when their sharding differs).
  """
  pc = jax.process_count()
  out = {}
  for name, x in batch.items():
    is_global = isinstance(x, jax.Array)
    if not is_global:
      x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError(f"batch[{name!r}] is a scalar; every batch entry must have a leading batch axis")
    rows = x.shape[0] if is_global else x.shape[0] * pc
    if name in ("pixel_values", "image_valid"):
      if rows % batch_shards(mesh):
        raise ValueError(f"batch[{name!r}] has {rows} image slots in total, not a multiple of data×fsdp = "
                         f"{batch_shards(mesh)}: pad the image slots to a multiple of {batch_shards(mesh)} "
                         "over all hosts (padding slots have image_valid False)")
    else:
      check_batch_rows(rows, mesh, micro_batches, what=f"batch[{name!r}]")
    sharding = NamedSharding(mesh, P(BATCH_AXES, *([None] * (x.ndim - 1))))
    if is_global:  # already a global array (e.g. from a previous shard_batch): reshard if needed
      out[name] = x if x.sharding == sharding else jax.device_put(x, sharding)
    else:
      out[name] = jax.make_array_from_process_local_data(sharding, x)
  return out
