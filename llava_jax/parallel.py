"""Device mesh and the one table that maps logical axis names to mesh axes.

Modules annotate parameters with logical names (`nn.with_logical_partitioning`) and activations with
`nn.with_logical_constraint`; this file alone decides what those names mean on a mesh. Data parallel,
FSDP and tensor parallel are different mesh shapes over the same rules.

Mesh axes: 'data' (pure data parallel: params replicated), 'fsdp' (batch split AND params/optimizer state
sharded), 'tensor' (heads / mlp / vocab split inside a layer).
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import flax.linen as nn

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis → mesh axis (or axes). The first rule naming a logical axis wins.
# Parameters: 'embed' (model width) is FSDP-sharded, the wide dims are tensor-sharded.
LOGICAL_AXIS_RULES: tuple = (
    # activations
    ("batch", ("data", "fsdp")),
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
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def axis_rules():
  """Context manager installing the rules for `nn.with_logical_constraint` inside jit."""
  return nn.logical_axis_rules(list(LOGICAL_AXIS_RULES))
