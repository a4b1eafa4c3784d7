"""Checkpoint import (`load_pretrained`) and export (`export_hf`) for LLaVA.

Loading is a stream: for each parameter leaf, read its checkpoint tensor(s) (all layer slices of a stacked
leaf, nothing more), convert with the key table's transform, cast to the parameter dtype and place it on its
target device / sharding before reading the next leaf. Host memory holds at most a few copies of one leaf,
never the model twice. Readers: `reader.py`; layouts and configs: `layouts.py`; export: `export.py`;
orbax save/restore: `orbax_params.py`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import traverse_util
from jax.sharding import Mesh

from llava_jax import parallel
from llava_jax.checkpoints.export import export_hf  # noqa: F401  (public)
from llava_jax.checkpoints.layouts import (CheckpointKeyError, LoadPlan, check_keys, make_plan,  # noqa: F401
                                           original_llava_options)
from llava_jax.checkpoints.orbax_params import restore_params, save_params  # noqa: F401  (public)
from llava_jax.checkpoints.reader import CheckpointFormatError  # noqa: F401
from llava_jax.checkpoints.table import get_in, group_by_leaf, params_from_tensors, set_in
from llava_jax.config import LlavaConfig, RuntimeOptions, dtype_name
from llava_jax.models import quant
from llava_jax.models.llava import init_params
from llava_jax.models.projector import Projector

__all__ = ["load_pretrained", "export_hf", "save_params", "restore_params", "original_llava_options",
           "CheckpointKeyError", "CheckpointFormatError", "CheckpointShapeError"]


class CheckpointShapeError(ValueError):
  """A checkpoint tensor whose shape does not fit the model the config describes."""


def load_pretrained(path: str, *, vision_tower: Optional[str] = None, projector: Optional[str] = None,
                    projector_type: Optional[str] = None, dtype: Any = None,
                    runtime: Optional[RuntimeOptions] = None, mesh: Optional[Mesh] = None,
                    allow_pickle: bool = False, seed: int = 0,
                    config_overrides: Optional[Dict[str, Any]] = None) -> Tuple[LlavaConfig, dict]:
  """Read a LLaVA model (config and weights) from local directories → (LlavaConfig, params).

  path: one of
    - a llava-hf (`LlavaForConditionalGeneration`) directory, in hub, transformers-5-saved or in-memory
      key layout;
    - an original LLaVA directory (liuhaotian/llava-*, `LlavaLlamaForCausalLM`): image_token_index is -200
      (the original IMAGE_TOKEN_INDEX); the vision tower comes from `vision_tower=` or, when absent, from
      the checkpoint's `model.vision_tower.vision_tower.vision_model.*` (`vision_tower=` wins when both);
    - a plain LLaMA / Vicuna directory, with `vision_tower=` and either `projector=` (a stage-1
      `mm_projector.bin` / `.safetensors`) or `projector_type=` for a freshly initialized projector
      (seeded by `seed`): the stage-1 starting point.
  vision_tower: a local CLIPVisionModel or CLIPModel directory (the text tower is ignored). A directory
    holding only a config.json states the tower's config while the weights come from the checkpoint.
  dtype: parameter dtype ('float32', 'bfloat16', ...); also the compute dtype unless `runtime` is given.
    None keeps `runtime.param_dtype` (float32 by default).
  runtime: RuntimeOptions of the returned config (scan_layers decides the param tree layout), minus `lora`: a
    checkpoint holds plain weights (a LoRA run re-attaches its `lora` and the train state adds fresh adapters;
    checkpoints/peft.py imports PEFT ones). With `runtime.quantize` the decoder's linear kernels are quantized
    on the host as they are read (models/quant.py), so devices never hold the float decoder.
  mesh: place each leaf on its NamedSharding from the model's logical axes and `parallel.LOGICAL_AXIS_RULES`;
    None puts leaves on the default device.
  allow_pickle: read legacy pickle `.bin` weights (with `torch.load(weights_only=True)`); off by default.
  config_overrides: LlavaConfig fields to replace (e.g. vision_feature_layer for a LLaMA + CLIP start).

  A llava-hf projector with `projector_hidden_act='linear'` and linear_2 exactly the identity with zero bias
  (how `export_hf` writes the paper's 'linear' projector) loads as projector_type 'linear'.
  Vocabulary size follows the checkpoint's embedding table. Unknown or missing tensors raise
  CheckpointKeyError naming them; `rotary_emb.inv_freq`, `position_ids` and a CLIPModel's text tower are
  skipped. Returns params as a nested dict of jax arrays in the layout of docs/architecture.md.
  """
  plan = make_plan(path, vision_tower=vision_tower, projector=projector, projector_type=projector_type,
                   allow_pickle=allow_pickle)
  config = plan.config
  if config_overrides:
    config = config.replace(**config_overrides)
  rt = runtime or RuntimeOptions()
  if dtype is not None:
    name = dtype_name(dtype)
    rt = dataclasses.replace(rt, param_dtype=name, **({} if runtime is not None else {"dtype": name}))
  config = config.replace(runtime=dataclasses.replace(rt, lora=None))  # checkpoints hold full weights, no adapters
  check_keys(plan.sources)
  params = stream_params(config, plan, mesh=mesh, seed=seed)
  return config, params


def abstract_params(config: LlavaConfig):
  """(shape/dtype tree, logical PartitionSpec tree) of the model's params, without allocating them."""
  boxed = jax.eval_shape(lambda r: init_params(config, r, boxed=True), jax.random.key(0))
  return nn.unbox(boxed), nn.get_partition_spec(boxed)


def param_shardings(config: LlavaConfig, mesh: Mesh):
  """Pytree of NamedShardings for the params on `mesh` (from the modules' logical axes)."""
  _, logical = abstract_params(config)
  return parallel.logical_to_sharding(logical, mesh)


def stream_params(config: LlavaConfig, plan: LoadPlan, *, mesh: Optional[Mesh] = None, seed: int = 0) -> dict:
  """Fill every param leaf from the plan's sources, one leaf at a time, each placed (quantized first when
  `config.runtime.quantize` is set) as soon as it is built."""
  shapes, logical = abstract_params(config)
  shardings = parallel.logical_to_sharding(logical, mesh) if mesh is not None else None
  mode = config.runtime.quantize
  float_shapes = shapes if mode is None else abstract_params(config.with_runtime(quantize=None))[0]
  scan = config.runtime.scan_layers
  params: dict = {}
  for src in plan.sources:
    groups = group_by_leaf(src.specs, scan)
    order = sorted(groups, key=lambda p: min(src.reader.file_index(s.hf_key) for s in groups[p]))
    for path in order:
      rows = groups[path]
      try:
        target = get_in(float_shapes, path)
      except (KeyError, TypeError):
        raise CheckpointKeyError(f"{src.name}: tensors {[s.hf_key for s in rows][:3]} map to param "
                                 f"{'/'.join(path)}, which this model does not have") from None
      leaf = get_in(params_from_tensors(rows, src.reader.get, scan, dtype=target.dtype), path)
      if leaf.shape != target.shape:
        keys = rows[0].hf_key + (f" (+{len(rows) - 1} layer slices)" if len(rows) > 1 else "")
        raise CheckpointShapeError(
            f"{src.name}: tensor {keys} gives param {'/'.join(path)} shape {leaf.shape}, but the config "
            f"describes {target.shape}")
      place_leaf(params, path, leaf, shardings, mode)
      del leaf
    src.reader.close()
  if plan.init_projector:
    init_projector(config, params, shardings, seed)
  _check_complete(shapes, params)
  return params


def init_projector(config: LlavaConfig, params: dict, shardings, seed: int) -> None:
  """Fresh projector params (the stage-1 starting point) written into `params['multi_modal_projector']`."""
  features = jnp.zeros((1, 1, config.projector_in_features), config.runtime.jnp_dtype)
  fresh = nn.unbox(jax.jit(Projector(config).init)(jax.random.key(seed), features)["params"])
  for path, value in traverse_util.flatten_dict(fresh).items():
    full = ("multi_modal_projector",) + path
    set_in(params, full, _place(np.asarray(value), shardings, full))


def place_leaf(params: dict, path: Tuple[str, ...], leaf: np.ndarray, shardings, mode: Optional[str]) -> None:
  """Put one float host leaf into `params` on its device / sharding. With quantize `mode` set, a decoder
  q/k/v/o/gate/up/down kernel is quantized on the host first and placed as kernel_q / kernel_scale."""
  if mode is not None and quant.is_quantized_path(path):
    for name, value in quant.quantize_kernel(leaf, mode).items():
      full = path[:-1] + (name,)
      set_in(params, full, _place(value, shardings, full))
  else:
    set_in(params, path, _place(leaf, shardings, path))


def place_host_params(host: dict, config: LlavaConfig, mesh: Optional[Mesh] = None) -> dict:
  """A float param tree of host (numpy) leaves → the params of `config` on `mesh` (default device when None),
  quantized on the host leaf by leaf when `config.runtime.quantize` is set. Consumes `host` (each leaf is
  dropped from it once placed, so host memory shrinks as devices fill)."""
  shapes, logical = abstract_params(config)
  shardings = parallel.logical_to_sharding(logical, mesh) if mesh is not None else None
  mode = config.runtime.quantize
  float_shapes = traverse_util.flatten_dict(
      shapes if mode is None else abstract_params(config.with_runtime(quantize=None))[0])
  flat = traverse_util.flatten_dict(host)
  host.clear()
  params: dict = {}
  for path in list(flat):
    want = float_shapes.get(path)
    if want is None or tuple(want.shape) != tuple(flat[path].shape):
      raise CheckpointShapeError(f"param {'/'.join(path)} {flat[path].shape} is not in the config's model "
                                 f"({'absent' if want is None else want.shape})")
    place_leaf(params, path, flat.pop(path), shardings, mode)
  _check_complete(shapes, params)
  return params


def _place(leaf: np.ndarray, shardings, path) -> jax.Array:
  if shardings is None:
    return jax.device_put(leaf)
  return jax.device_put(leaf, get_in(shardings, path))


def _check_complete(shapes, params) -> None:
  want = set(traverse_util.flatten_dict(shapes))
  have = set(traverse_util.flatten_dict(params))
  missing = sorted("/".join(p) for p in want - have)
  if missing:
    raise CheckpointKeyError(f"no checkpoint tensor filled {len(missing)} param(s): {missing[:12]}")
