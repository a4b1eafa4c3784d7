"""Model + tokenizer + conversation template for inference, from the command line's --config / --workdir /
--checkpoint (one place for chat, serve and eval).

What `--checkpoint` may name:
  - a llava-hf / original LLaVA / exported directory (it has a config.json): read by
    `checkpoints.hf.load_pretrained`; the checkpoint's architecture wins over the config's model section and
    its tokenizer files, when present, win over the config's data.tokenizer;
  - an orbax params directory (`<run>[/<stage>]/params`, written at the end of training);
  - a training workdir: its last stage's params (as without --checkpoint).
Without --checkpoint, `<workdir>[/<last stage>]/params` of a finished run is used.

The template is the last stage's `data.template` unless overridden (the reference CLI's --conv-mode);
stops are the template's stop strings and the tokenizer's EOS (+ special stop tokens).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from llava_jax import parallel, recipes
from llava_jax.config import LlavaConfig
from llava_jax.limits import MAX_IMAGE_PIXELS
from llava_jax.data import conversation as conv_lib
from llava_jax.data import from_config as data_config
from llava_jax.data.image import load_image, preprocess
from llava_jax.data.tokenize import encode_generation_prompt, stop_token_ids
from llava_jax.data.tokenizer import load_tokenizer
from llava_jax.checkpoints.load import is_orbax_dir, is_pretrained_dir, load_params
from llava_jax.checkpoints.orbax_params import PARAMS_DIR
from llava_jax.errors import ConfigError, MissingFileError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclasses.dataclass
class InferenceModel:
  """Everything generation needs, loaded once.

  config / params: the model (params placed on `mesh`, or on the default device when mesh is None).
  template: the conversation template prompts are rendered with; stop_token_ids / stop_strings end answers.
  aspect_ratio / max_pixels: image preprocessing ('square' | 'pad') and the default decoded-pixel limit.
  name: the id the server reports; source: the path the weights came from.
  """
  config: LlavaConfig
  params: Any
  tokenizer: Any
  template: conv_lib.Template
  stop_token_ids: Tuple[int, ...]
  stop_strings: Tuple[str, ...]
  aspect_ratio: str = "square"
  max_pixels: int = MAX_IMAGE_PIXELS
  mesh: Any = None
  name: str = "llava_jax"
  source: str = ""

  @property
  def image_size(self) -> int:
    return self.config.vision.image_size

  @property
  def max_positions(self) -> int:
    """Longest sequence (prompt + answer) the model takes."""
    return self.config.text.max_position_embeddings

  def image_pixels(self, source, *, max_pixels: Optional[int] = None) -> np.ndarray:
    """A path / encoded bytes → CLIP pixels float32 [S, S, 3]. Raises SampleError for unusable images."""
    image = load_image(source, max_pixels=self.max_pixels if max_pixels is None else max_pixels)
    return preprocess(image, image_size=self.image_size, aspect_ratio=self.aspect_ratio)

  def encode(self, conversations: Sequence[dict], num_images: int) -> np.ndarray:
    """LLaVA turns ending with a human turn (`<image>` where the images go) → prompt ids int32 [T], with
    each image as a run of placeholders. Raises SampleError('malformed_conversation' | 'image_mismatch')."""
    return encode_generation_prompt(conversations, self.template, self.tokenizer,
                                    num_image_tokens=self.config.num_image_tokens,
                                    image_token_index=self.config.image_token_index, num_images=num_images)


def _has_tokenizer(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)


def resolve_checkpoint(config, workdir: Optional[str], checkpoint: Optional[str]) -> Tuple[str, str, Optional[str]]:
  """→ (kind 'pretrained' | 'params', path, run directory holding a trained tokenizer or None)."""
  name, _ = recipes.last_stage(config)

  def run_params(run_dir):
    return os.path.join(run_dir if name is None else os.path.join(run_dir, name), PARAMS_DIR)

  if checkpoint:
    path = os.path.abspath(os.path.expanduser(checkpoint))
    if not os.path.exists(path):
      raise MissingFileError(f"--checkpoint={checkpoint}: no such file or directory")
    if is_pretrained_dir(path):
      return "pretrained", path, workdir
    if is_orbax_dir(path):
      run = workdir
      if run is None:  # <run>/params or <run>/<stage>/params: the run dir holds tokenizer/
        parent = os.path.dirname(path)
        run = next((d for d in (parent, os.path.dirname(parent)) if os.path.isdir(os.path.join(d, "tokenizer"))),
                   parent)
      return "params", path, run
    for candidate in (run_params(path), os.path.join(path, PARAMS_DIR)):
      if is_orbax_dir(candidate):
        return "params", candidate, workdir or path
    raise MissingFileError(
        f"--checkpoint={checkpoint} is neither a checkpoint directory with a config.json (llava-hf, original "
        f"LLaVA, exported), nor an orbax params directory, nor a finished training workdir "
        f"({run_params(path)} missing)")
  if not workdir:
    raise ConfigError("pass --checkpoint=<dir> or --workdir=<a finished training run>")
  if not os.path.isdir(workdir):
    raise MissingFileError(f"--workdir={workdir}: no such directory (pass a finished training run, or --checkpoint)")
  path = run_params(os.path.abspath(workdir))
  if not is_orbax_dir(path):
    raise MissingFileError(f"no finished run in --workdir={workdir} ({path} missing): train first with "
                           f"`python -m llava_jax.main --config=... --workdir={workdir}`, or pass --checkpoint")
  return "params", path, workdir


def default_mesh(config):
  """The config's mesh when several devices are present, else None (single device, no sharding)."""
  import jax
  if jax.device_count() == 1:
    return None
  return parallel.make_mesh(tuple(config.mesh))


def load_for_inference(config, *, workdir: Optional[str] = None, checkpoint: Optional[str] = None,
                       template: Optional[str] = None, mesh="auto", name: Optional[str] = None) -> InferenceModel:
  """Load what chat / serve / eval need (see the module docstring for what --checkpoint may name).

  config: the recipe ConfigDict (its last stage gives the model section, tokenizer, template, image rules).
  template: a registered template name overriding the config's data.template.
  mesh: 'auto' (`default_mesh`), None (default device) or a Mesh to place the params on.
  name: the model id to report (default: the checkpoint directory's name, or 'llava_jax').
  """
  stage_name, stage = recipes.last_stage(config)
  model_config = recipes.llava_config(stage.model)
  if mesh == "auto":
    mesh = default_mesh(stage)
  kind, path, run_dir = resolve_checkpoint(config, workdir, checkpoint)
  if kind == "pretrained":
    model_config, params = load_params(path, model_config, mesh, allow_pickle=bool(stage.init.allow_pickle))
    tokenizer = _load_tokenizer(stage, model_config, kind, path, run_dir)
  else:
    tokenizer = _load_tokenizer(stage, model_config, kind, path, run_dir)  # before the weights: fail fast
    model_config, params = load_params(path, model_config, mesh)
  tpl = conv_lib.get_template(template or stage.data.template)
  if tpl.captions_only:
    logger.warning("template %r is the stage-1 captioning format: questions are dropped; pass --template "
                   "(e.g. vicuna_v1) to chat", tpl.name)
  if name is None:
    name = os.path.basename(path.rstrip(os.sep)) if kind == "pretrained" else (
        os.path.basename(os.path.abspath(run_dir or path)) or "llava_jax")
  return InferenceModel(
      config=model_config, params=params, tokenizer=tokenizer, template=tpl,
      stop_token_ids=stop_token_ids(tpl, tokenizer), stop_strings=conv_lib.stop_strings(tpl),
      aspect_ratio=stage.data.image_aspect_ratio, max_pixels=int(stage.data.max_pixels), mesh=mesh, name=name,
      source=path)


def _load_tokenizer(stage, model_config, kind: str, path: str, run_dir: Optional[str]):
  if kind == "pretrained" and _has_tokenizer(path):
    return load_tokenizer(path)
  if stage.data.tokenizer == data_config.SYNTHETIC_TOKENIZER:
    tok_dir = os.path.join(run_dir or "", "tokenizer")
    if not run_dir or not _has_tokenizer(tok_dir):
      raise MissingFileError(f"the config trains its tokenizer into the run directory, but {tok_dir} holds none; "
                             "pass --workdir=<the training run>")
    return load_tokenizer(tok_dir)
  return data_config.build_tokenizer(stage, model_config, run_dir)
