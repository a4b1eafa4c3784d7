"""Device mesh and the one table that maps logical axis names to mesh axes.

Modules annotate parameters with logical names (`nn.with_logical_partitioning`) and activations with
`nn.with_logical_constraint`; this file alone decides what those names mean on a mesh. Data parallel,
FSDP and tensor parallel are different mesh shapes over the same rules.

Mesh axes: 'data' (pure data parallel: params replicated), 'fsdp' (batch split AND params/optimizer state
sharded), 'tensor' (heads / mlp / vocab split inside a layer). Batches are split over ('data', 'fsdp'); each
process passes only its own rows and `jax.make_array_from_process_local_data` assembles the global array.
Optimizer-state leaves that mirror a parameter (AdamW's mu / nu) take that parameter's sharding.

Everything about shardings lives here: the mesh, the logical-axis table, the mesh context, batch and
optimizer-state shardings. The params' own shardings come from the modules' logical axes
(`models.llava.param_shardings`, which calls `logical_to_sharding`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import flax.linen as nn

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch's rows (and image slots) are split over

# Logical axis → mesh axis (or axes). The first rule naming a logical axis wins.
# Parameters: 'embed' (model width) is FSDP-sharded, the wide dims are tensor-sharded.
LOGICAL_AXIS_RULES: tuple = (
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("image_tokens", None),
    # parameters
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("patch", None),
    ("channels", None),
    ("positions", None),
    ("projector_in", None),
    ("norm", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """Mesh over (data, fsdp, tensor). One entry may be -1: it takes the remaining devices.

  Raises ValueError with the fix when the product does not equal the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one entry may be -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if known <= 0 or n % known:
      raise ValueError(f"mesh shape {tuple(shape)} cannot fill {n} devices: the fixed entries multiply to "
                       f"{known}, which does not divide {n}")
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, shape))} has {int(np.prod(shape))} devices but "
                     f"{n} are present; set config.mesh so data*fsdp*tensor == {n} (use -1 for one axis "
                     f"to take the rest)")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Pytree of logical PartitionSpecs (from `nn.get_partition_spec`) → pytree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a batch array [B, ...]: batch over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def axis_rules():
  """Context manager installing the rules for `nn.with_logical_constraint` inside jit."""
  return nn.logical_axis_rules(list(LOGICAL_AXIS_RULES))


@contextlib.contextmanager
def mesh_context(mesh: Optional[Mesh]):
  """`jax.set_mesh(mesh)` + the logical axis rules (what jit needs to lower sharded modules); nothing for None."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh), axis_rules():
    yield


def batch_shards(mesh: Mesh) -> int:
  """Number of ways a batch is split: data × fsdp."""
  return int(mesh.shape["data"] * mesh.shape["fsdp"])


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
  rep = replicated(mesh)

  def pick(path, leaf):
    keys = _trailing_dict_keys(path)
    if keys in sh and shapes.get(keys) == tuple(np.shape(leaf)):
      return sh[keys]
    return rep

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
    sharding = batch_sharding(mesh, x.ndim)
    if is_global:  # already a global array (e.g. from a previous shard_batch): reshard if needed
      out[name] = x if x.sharding == sharding else jax.device_put(x, sharding)
    else:
      out[name] = jax.make_array_from_process_local_data(sharding, x)
  return out
