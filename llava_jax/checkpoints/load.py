"""One loader of weights for every caller: training init (`init.from_workdir` / `init.pretrained` /
`init.language_model`), `--mode=eval`, chat and serve (`infer.loading.load_for_inference`).

`load_params(path, model_config, mesh)` reads either
  - a directory with a config.json (llava-hf, original LLaVA, an export, or a plain LLaMA / Vicuna with a vision
    tower and a projector): `checkpoints.hf.load_pretrained`; the checkpoint's architecture wins;
  - an orbax params directory written by training (`<run>[/<stage>]/params`): `restore_orbax_params`, placed on
    `model_config`'s shardings; the config must describe the saved model.
Whatever the source, `model_config.runtime` decides the placed tree: with `runtime.quantize` set, float decoder
kernels are quantized on the host leaf by leaf before placement (the float decoder never exists on device);
with `runtime.lora` set and no adapters in the saved tree, the base is returned without adapters (the train state
adds fresh ones).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from etils import epath
from jax.sharding import Mesh

from llava_jax.checkpoints.hf import load_pretrained, place_host_params
from llava_jax.checkpoints.orbax_params import restore_params, saved_tree
from llava_jax.config import LlavaConfig
from llava_jax.errors import ConfigError, MissingFileError
from llava_jax.models.llava import param_shardings
from llava_jax.models.lora import adapter_paths
from llava_jax.models.quant import float_kernels

ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")


def is_orbax_dir(path) -> bool:
  """Whether `path` (local or an epath URL) is a params directory written by orbax."""
  p = epath.Path(path)
  return p.is_dir() and any((p / m).exists() for m in ORBAX_MARKERS)


def is_pretrained_dir(path) -> bool:
  """Whether `path` holds a config.json (a transformers-style checkpoint directory)."""
  return (epath.Path(path) / "config.json").exists()


def load_params(path: str, model_config: LlavaConfig, mesh: Optional[Mesh], *, vision_tower: Optional[str] = None,
                projector: Optional[str] = None, projector_type: Optional[str] = None, allow_pickle: bool = False,
                seed: int = 0, config_overrides: Optional[Dict[str, Any]] = None) -> Tuple[LlavaConfig, dict]:
  """Weights at `path` → (the model's LlavaConfig, params on `mesh`; the default device when mesh is None).

  model_config: the caller's model; its `runtime` (dtypes, scan, LoRA, quantization) applies to what is loaded.
    For an orbax directory it is also the architecture; a pretrained directory's config.json wins.
  vision_tower / projector / projector_type / seed / config_overrides: a plain LLaMA directory's missing parts
    (see `load_pretrained`); allow_pickle: read `.bin` (pickle) weights.
  """
  if is_pretrained_dir(path):
    return load_pretrained(path, vision_tower=vision_tower, projector=projector, projector_type=projector_type,
                           runtime=model_config.runtime, mesh=mesh, allow_pickle=allow_pickle, seed=seed,
                           config_overrides=config_overrides)
  if not is_orbax_dir(path):
    raise MissingFileError(f"{path} is neither a checkpoint directory with a config.json nor an orbax params "
                           "directory written by training")
  return model_config, restore_orbax_params(path, model_config, mesh)


def restore_orbax_params(path: str, model_config: LlavaConfig, mesh: Optional[Mesh]) -> dict:
  """Params saved by training (`orbax_params.save_params`) → device params of `model_config`.

  Saved float decoder kernels under `runtime.quantize`: read to host memory and quantized leaf by leaf as they
  are placed (`hf.place_host_params`); a quantized tree (a QLoRA run's) is read as it is. Under `runtime.lora`
  a tree without adapters (a base-model run) is returned without them.
  """
  saved = saved_tree(path)
  config = model_config
  if config.runtime.lora is not None and not adapter_paths(saved):
    config = config.with_runtime(lora=None)
  try:
    if config.runtime.quantize is not None and float_kernels(saved):
      return place_host_params(restore_params(path, host=True), config, mesh)
    return restore_params(path, None if mesh is None else param_shardings(config, mesh))
  except (ValueError, KeyError) as e:
    raise ConfigError(f"{path} does not hold params of the config's model ({e}); pass the --config the run "
                      f"was trained with") from None
