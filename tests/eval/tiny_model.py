"""A tiny LLaVA for the eval tests: configs/tiny.py's sizes with the tiny tokenizer fixture's vocabulary (512
pieces + the image placeholder 512), and random params written without compiling `init` (eval_shape for the
tree, numpy for the values), which keeps the tests fast on a busy 2-core machine."""
import importlib.util
import os

import jax
import numpy as np

from llava_jax import recipes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE_TOKEN = 512


def tiny_config(tokenizer_dir: str):
  """configs/tiny.py's ConfigDict with the tiny tokenizer (vocab 513, image placeholder 512)."""
  spec = importlib.util.spec_from_file_location("configs_tiny", os.path.join(REPO, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.text.vocab_size = IMAGE_TOKEN + 1
  c.model.image_token_index = IMAGE_TOKEN
  c.data.tokenizer = tokenizer_dir
  return c


def save_random_params(config, path: str, seed: int = 0) -> str:
  """Random params of config.model saved with orbax at `path` (norm scales near 1, other leaves N(0, 0.05))."""
  from llava_jax.checkpoints.hf import abstract_params
  from llava_jax.checkpoints.orbax_params import save_params
  shapes, _ = abstract_params(recipes.llava_config(config.model))
  rng = np.random.default_rng(seed)

  def fill(path_keys, leaf):
    name = jax.tree_util.keystr(path_keys)
    base = 1.0 if "norm" in name and "scale" in name else 0.0
    return np.asarray(base + 0.05 * rng.standard_normal(leaf.shape), leaf.dtype)

  params = jax.tree_util.tree_map_with_path(fill, shapes)
  return save_params(path, params)
