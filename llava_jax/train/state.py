"""Train state and the trainable / frozen split of the parameter tree.

Which parameters train is chosen by regular expressions over '/'-joined param paths (the names in
docs/architecture.md), e.g. stage 1 `multi_modal_projector/.*`, stage 2 `multi_modal_projector/.*|language_model/.*`.
A path trains iff some pattern `re.fullmatch`es it and no `freeze` pattern does; `freeze` defaults to the vision
tower, which LLaVA never trains (pass `freeze=None` to allow it).

LoRA (models/lora.py): train `multi_modal_projector/.*|.*/lora_(a|b)` (recipes.LORA_TRAINABLE): only the adapters
and the projector get gradients and optimizer state; base weights given without adapters get fresh ones
(`add_missing_adapters`).

QLoRA (`runtime.quantize`, models/quant.py): the quantized kernels (`kernel_q` int8 / packed 4-bit, and their
`kernel_scale`) and every integer leaf are frozen whatever the patterns say (`is_quantized_leaf`): integers
cannot be differentiated, and the quantized base is not trained. A float base given to `create_train_state`
for a quantized config is quantized on the host before it is placed (train/qlora.py).

Frozen parameters live in their own subtree: the step differentiates with respect to the trainable subtree
only and the optimizer state mirrors only that subtree, so frozen weights cost neither gradient memory nor
optimizer memory.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import struct, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llava_jax import parallel
from llava_jax.config import LlavaConfig
from llava_jax.models import lora, quant
from llava_jax.models.llava import init_params
from llava_jax.train import qlora, sharding as shd

logger = logging.getLogger(__name__)

Patterns = Union[str, Iterable[str]]

VISION_TOWER = r"vision_tower/.*"
QUANTIZED_LEAVES = (quant.KERNEL_Q, quant.KERNEL_SCALE)  # a quantized Dense's leaves (models/quant.py): frozen


@struct.dataclass
class TrainState:
  """Everything a training step reads and writes (a pytree; checkpointed as is).

  step: int32 scalar, number of optimizer updates done (the learning rate of the next update is
    `schedule(step)`).
  params: the trainable subtree (nested dict, the same paths as the full tree restricted to trainable leaves).
  frozen: the frozen subtree (never updated, no gradient, no optimizer state).
  opt_state: optax state of `params` only.
  rng: uint32 raw key data [2] (`jax.random.PRNGKey` layout, checkpoint-friendly); per-step randomness, if
    any, is `fold_in(rng, step)` so a resumed run draws the same numbers.
  """
  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array

  def full_params(self):
    """The whole parameter tree (trainable ∪ frozen), as the model expects it."""
    return merge_params(self.params, self.frozen)


def _compile(patterns: Optional[Patterns]) -> Optional[re.Pattern]:
  if patterns is None:
    return None
  if isinstance(patterns, str):
    patterns = [patterns]
  patterns = [p for p in patterns if p]
  if not patterns:
    return None
  return re.compile("|".join(f"(?:{p})" for p in patterns))


def path_str(path: Tuple[str, ...]) -> str:
  return "/".join(str(k) for k in path)


def is_quantized_leaf(path: Tuple[str, ...], leaf: Any = None) -> bool:
  """A quantized base weight (`kernel_q` / `kernel_scale`) or any leaf with an integer dtype (`leaf` may be an
  array, a ShapeDtypeStruct or anything without a dtype, e.g. a sharding): never trainable."""
  if str(path[-1]) in QUANTIZED_LEAVES:
    return True
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and not jnp.issubdtype(dtype, jnp.inexact)


def trainable_paths(params, trainable_patterns: Patterns, freeze: Optional[Patterns] = VISION_TOWER):
  """Sorted list of the '/'-joined paths that train: full-matched by a trainable pattern, by no freeze pattern,
  and not a quantized / integer leaf (`is_quantized_leaf`). Raises ValueError when no leaf is left."""
  train_re, freeze_re = _compile(trainable_patterns), _compile(freeze)
  if train_re is None:
    raise ValueError("trainable_patterns is empty: give at least one regex over param paths, e.g. "
                     "'multi_modal_projector/.*' (stage 1)")
  flat = traverse_util.flatten_dict(params)
  quantized = {path_str(p) for p, x in flat.items() if is_quantized_leaf(p, x)}
  names = sorted(path_str(p) for p in flat)
  out = [n for n in names if train_re.fullmatch(n) and not (freeze_re is not None and freeze_re.fullmatch(n))
         and n not in quantized]
  matched_quantized = [n for n in quantized if train_re.fullmatch(n)]
  if matched_quantized:
    logger.warning("trainable patterns %r match %d quantized base leaves (e.g. %s): they stay frozen (QLoRA trains "
                   "adapters on a quantized base, never the base)", trainable_patterns, len(matched_quantized),
                   sorted(matched_quantized)[0])
  if not out:
    tops = sorted({n.split("/")[0] + "/..." for n in names})
    matched_frozen = [n for n in names if train_re.fullmatch(n)]
    hint = (f"; they only match frozen params ({len(matched_frozen)} under freeze={freeze!r}, pass freeze=None "
            "to train them; quantized base weights never train)" if matched_frozen else "")
    raise ValueError(f"trainable patterns {trainable_patterns!r} match no parameter{hint}. Patterns are full "
                     f"regex matches over '/'-joined paths such as {names[0]!r}; top-level subtrees: {tops}")
  return out


def split_params(params, trainable_patterns: Patterns, freeze: Optional[Patterns] = VISION_TOWER):
  """Split a nested param dict into (trainable, frozen) nested dicts by path patterns.

  Works on any tree with the param tree's structure (params, shardings, ShapeDtypeStructs, logical specs).
  """
  keep = set(trainable_paths(params, trainable_patterns, freeze))
  flat = traverse_util.flatten_dict(params)
  trainable = {p: v for p, v in flat.items() if path_str(p) in keep}
  frozen = {p: v for p, v in flat.items() if path_str(p) not in keep}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable, frozen):
  """Inverse of `split_params`: one nested dict. Raises on a path present in both."""
  a, b = traverse_util.flatten_dict(trainable), traverse_util.flatten_dict(frozen)
  both = a.keys() & b.keys()
  if both:
    raise ValueError(f"paths both trainable and frozen: {sorted(path_str(p) for p in both)[:5]}")
  return traverse_util.unflatten_dict({**b, **a})


def has_trainable_under(trainable, prefix: str) -> bool:
  """True when some trainable leaf lives under the top-level subtree `prefix` (e.g. 'vision_tower')."""
  return bool(trainable.get(prefix)) if isinstance(trainable, dict) else False


# ---------------------------------------------------------------------------------------------------------
# Creating the state directly on its shardings


def _raw_key(rng) -> jax.Array:
  """int seed, typed key or raw uint32 key → raw uint32 key data [2]."""
  if isinstance(rng, (int, np.integer)):
    return jax.random.PRNGKey(int(rng))
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return rng


def abstract_train_state(config: LlavaConfig, optimizer, mesh: Mesh, *, trainable_patterns: Patterns,
                         freeze: Optional[Patterns] = VISION_TOWER) -> TrainState:
  """TrainState of `jax.ShapeDtypeStruct`s carrying their target NamedShardings (no allocation).

  This is the restore target for orbax (onto any mesh) and the source of the step's in/out shardings.
  """
  boxed = jax.eval_shape(lambda r: init_params(config, r, boxed=True), jax.random.PRNGKey(0))
  shapes = nn.unbox(boxed)
  shardings = shd.param_shardings(nn.get_partition_spec(boxed), mesh)
  with_sh = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  trainable, frozen = split_params(with_sh, trainable_patterns, freeze)
  opt_shapes = jax.eval_shape(optimizer.init, trainable)
  opt_sh = shd.mirror_param_shardings(opt_shapes, trainable, jax.tree.map(lambda x: x.sharding, trainable), mesh)
  opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_shapes, opt_sh)
  rep = NamedSharding(mesh, P())
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=trainable, frozen=frozen,
                    opt_state=opt_state, rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))


def add_missing_adapters(config: LlavaConfig, params, shardings, rng):
  """Base weights (a pretrained model, a stage-1 run) for a LoRA config: the `lora_a` / `lora_b` leaves the
  config adds and `params` lacks are freshly initialized (PEFT init: A kaiming-uniform, B = 0, so the model still
  computes the base weights' function). Anything else missing is left for the caller's shape check to report.
  Call under the mesh and axis rules; `shardings` is the full param sharding tree."""
  if config.runtime.lora is None:
    return params
  have = traverse_util.flatten_dict(params)
  want = traverse_util.flatten_dict(shardings)
  missing = [p for p in want if p not in have and p[-1] in (lora.LORA_A, lora.LORA_B)]
  if not missing:
    return params
  sub = traverse_util.unflatten_dict({p: want[p] for p in missing})
  fresh = jax.jit(lambda r: _pick(init_params(config, r), missing), out_shardings=sub)(rng)
  return traverse_util.unflatten_dict({**have, **traverse_util.flatten_dict(fresh)})


def _pick(tree, paths):
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict({p: flat[p] for p in paths})


def state_shardings(abstract_state: TrainState) -> TrainState:
  """The NamedSharding of every leaf of an abstract (or concrete) TrainState."""
  return jax.tree.map(lambda x: x.sharding, abstract_state)


def create_train_state(config: LlavaConfig, optimizer, mesh: Mesh, rng, *, trainable_patterns: Patterns,
                       freeze: Optional[Patterns] = VISION_TOWER, params=None) -> TrainState:
  """A fresh TrainState whose arrays are created on their shardings.

  params None: random init inside a jit with out_shardings (each device materializes only its shard).
  params given (numpy or jax arrays, e.g. converted or restored weights): placed with `jax.device_put` onto the
  same shardings (no gather to one host); for a quantized config (`runtime.quantize`) float kernels are quantized
  on the host first (train/qlora.py). The optimizer state is initialized inside a jit with out_shardings.
  rng: int seed or PRNG key; split into the init key and the state's key.
  """
  abstract = abstract_train_state(config, optimizer, mesh, trainable_patterns=trainable_patterns, freeze=freeze)
  sh = state_shardings(abstract)
  full_sh = merge_params(sh.params, sh.frozen)
  init_key, state_key = jax.random.split(_raw_key(rng))
  if params is not None:  # a float base for a quantized config: quantized on the host as it is placed
    params = qlora.quantize_float_base(config, params, mesh)
  with jax.set_mesh(mesh), parallel.axis_rules():
    if params is None:
      params = jax.jit(lambda r: init_params(config, r), out_shardings=full_sh)(init_key)
    else:
      params = add_missing_adapters(config, params, full_sh, init_key)
      expected = {path_str(p): x.shape for p, x in traverse_util.flatten_dict(merge_params(abstract.params,
                                                                                           abstract.frozen)).items()}
      given = {path_str(p): tuple(x.shape) for p, x in traverse_util.flatten_dict(params).items()}
      if expected != given:
        missing = sorted(set(expected) - set(given))[:5]
        extra = sorted(set(given) - set(expected))[:5]
        wrong = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])[:5]
        raise ValueError(f"params do not fit the model config: missing {missing}, unexpected {extra}, "
                         f"wrong shape {[(k, given[k], expected[k]) for k in wrong]}")
      params = jax.device_put(params, full_sh)
      dtypes = jax.tree.map(lambda x: x.dtype, merge_params(abstract.params, abstract.frozen))
      if jax.tree.leaves(jax.tree.map(lambda x, d: x.dtype != d, params, dtypes)).count(True):
        params = jax.jit(lambda p: jax.tree.map(lambda x, d: x.astype(d), p, dtypes), out_shardings=full_sh)(params)
    trainable, frozen = split_params(params, trainable_patterns, freeze)
    opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(trainable)
  rep = NamedSharding(mesh, P())
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=trainable, frozen=frozen,
                    opt_state=opt_state, rng=jax.device_put(state_key, rep))
