"""LLaVA: CLIP vision tower → projector → features written over the image placeholders → LLaMA decoder.

Split as big_vision's PaliGemma is: `embed_image`, `embed_text`, `embed_image_and_text`, then the decoder,
so training, prefill and evaluation reuse the same pieces.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from llava_jax import parallel
from llava_jax.config import LlavaConfig
from llava_jax.models.clip import CLIPVisionTransformer
from llava_jax.models.llama import KVCache, LlamaForCausalLM
from llava_jax.models.projector import Projector


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_image_placeholders(input_ids, num_images: int, num_image_tokens: int, image_token_index: int) -> None:
  """Raise ValueError when the placeholder count is not num_images × num_image_tokens (concrete inputs only)."""
  if not _is_concrete(input_ids):
    return
  found = int(np.sum(np.asarray(input_ids) == image_token_index))
  expected = num_images * num_image_tokens
  if found != expected:
    raise ValueError(
        f"input_ids hold {found} image placeholders (id {image_token_index}) but {num_images} image(s) give "
        f"{expected} features ({num_image_tokens} per image); expand each <image> to {num_image_tokens} "
        f"placeholders and pass one image per placeholder run")


def splice_image_features(token_embeds: jax.Array, is_image: jax.Array, image_features: jax.Array) -> jax.Array:
  """Write image features over placeholder positions, in row-major order.

  token_embeds [B, T, D]; is_image [B, T] bool; image_features [M, D] with M ≥ number of placeholders
  (features beyond the last placeholder, e.g. padding image slots, are ignored). Returns [B, T, D].
  """
  b, t, d = token_embeds.shape
  flat = is_image.reshape(-1)
  index = jnp.clip(jnp.cumsum(flat) - 1, 0, image_features.shape[0] - 1)
  gathered = jnp.take(image_features, index, axis=0).reshape(b, t, d).astype(token_embeds.dtype)
  return jnp.where(is_image[..., None], gathered, token_embeds)


class LlavaModel(nn.Module):
  """The whole LLaVA model; see docs/architecture.md for the parameter tree.

  Call: `apply({'params': params}, input_ids [B, T] int32, pixel_values [N, H, W, 3] float32 | None,
  attention_mask [B, T] | None)` → logits [B, T, V] float32.

  pixel_values are CLIP-normalized images in NHWC, one per placeholder run, in the row-major order of
  the runs (row 0's images first). Several images per row and text-only rows work; N = 0 / None means no
  images. `image_valid [N]` marks padding image slots (fixed-shape batches); padding slots must come last.
  attention_mask [B, T] (1 = token, 0 = padding) is one segment per row; `segment_ids` [B, T] (0 = pad)
  packs several samples per row and then needs `positions` [B, T] restarting per sample.
  """
  config: LlavaConfig

  def setup(self):
    cfg = self.config
    self.vision_tower = CLIPVisionTransformer(cfg.vision, cfg.runtime)
    self.multi_modal_projector = Projector(cfg)
    self.language_model = LlamaForCausalLM(cfg.text, cfg.runtime)

  def embed_image(self, pixel_values: jax.Array) -> jax.Array:
    """[N, H, W, 3] → projected image features [N, K, Dt] (K = config.num_image_tokens)."""
    cfg = self.config
    hidden = self.vision_tower(pixel_values, layers=cfg.vision_feature_layers)  # [S, N, P+1, Dv]
    if cfg.vision_feature_select_strategy == "default":
      hidden = hidden[:, :, 1:]
    features = jnp.concatenate(list(hidden), axis=-1)  # [N, K, Dv * S]
    return self.multi_modal_projector(features)

  def embed_text(self, input_ids: jax.Array) -> jax.Array:
    """[B, T] → [B, T, Dt]; placeholder ids (even out-of-vocab ones like -200) read a dummy row."""
    return self.language_model.embed(input_ids)

  def embed_image_and_text(self, input_ids: jax.Array, pixel_values: Optional[jax.Array],
                           image_valid: Optional[jax.Array] = None) -> jax.Array:
    """Token embeddings with image features spliced in: [B, T, Dt]."""
    cfg = self.config
    embeds = self.embed_text(input_ids)
    if pixel_values is None or pixel_values.shape[0] == 0:
      check_image_placeholders(input_ids, 0, cfg.num_image_tokens, cfg.image_token_index)
      return embeds
    num_images = pixel_values.shape[0]
    if image_valid is not None:
      if not _is_concrete(image_valid):
        num_images = None
      else:
        num_images = int(np.sum(np.asarray(image_valid)))
    if num_images is not None:
      check_image_placeholders(input_ids, num_images, cfg.num_image_tokens, cfg.image_token_index)
    features = self.embed_image(pixel_values)
    features = features.reshape(-1, features.shape[-1])
    return splice_image_features(embeds, input_ids == cfg.image_token_index, features)

  def __call__(self, input_ids: jax.Array, pixel_values: Optional[jax.Array] = None,
               attention_mask: Optional[jax.Array] = None, *, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, image_valid: Optional[jax.Array] = None,
               return_hidden: bool = False) -> jax.Array:
    embeds = self.embed_image_and_text(input_ids, pixel_values, image_valid)
    segment_ids, positions = default_segments_and_positions(input_ids, attention_mask, segment_ids, positions)
    return self.language_model(embeds, positions, segment_ids, return_hidden=return_hidden)

  def decode(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array,
             return_hidden: bool = False) -> jax.Array:
    """Run the decoder on ready embeddings [B, T, D] → logits [B, T, V] (or hidden)."""
    return self.language_model(inputs_embeds, positions, segment_ids, return_hidden=return_hidden)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final hidden [B, T, D] → logits [B, T, V] float32 (for chunked losses)."""
    return self.language_model.logits(hidden)

  def extend(self, input_ids: jax.Array, pixel_values: Optional[jax.Array], cache: KVCache, *,
             index: jax.Array, positions: jax.Array, token_mask: Optional[jax.Array] = None,
             image_valid: Optional[jax.Array] = None, last_only: bool = False):
    """Prefill / decode step against a KV cache (see `LlamaForCausalLM.extend`).

    input_ids [B, T] (image placeholder runs allowed; their features come from pixel_values [N, H, W, 3]);
    positions [B, T]; index: slot of the first new token; token_mask [B, T] (0 = padding).
    Returns (logits [B, T, V] float32, or [B, V] with `last_only`; updated KVCache).
    """
    embeds = self.embed_image_and_text(input_ids, pixel_values, image_valid)
    return self.language_model.extend(embeds, positions, cache, index, token_mask, last_only=last_only)


def default_segments_and_positions(input_ids, attention_mask=None, segment_ids=None, positions=None):
  """Fill in segment ids [B, T] (from the attention mask, else all 1) and positions [B, T] (arange per row).

  A plain arange per row is what the reference uses with right padding; packed rows must pass positions.
  """
  b, t = input_ids.shape
  if segment_ids is None:
    segment_ids = (jnp.ones((b, t), jnp.int32) if attention_mask is None
                   else jnp.asarray(attention_mask).astype(jnp.int32))
  elif positions is None and attention_mask is None:
    raise ValueError("segment_ids given without positions: packed rows need per-sample positions")
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return segment_ids.astype(jnp.int32), positions.astype(jnp.int32)


def dummy_inputs(config: LlavaConfig, batch: int = 1, length: int = 8, num_images: int = 1):
  """Shapes for `init` / `eval_shape`: input_ids [batch, length], pixel_values [num_images, S, S, 3]."""
  s = config.vision.image_size
  return (jnp.zeros((batch, length), jnp.int32), jnp.zeros((num_images, s, s, 3), jnp.float32))


def init_params(config: LlavaConfig, rng: jax.Array, *, boxed: bool = False):
  """Random parameters (the stage-1 starting point for the projector). Unboxed unless `boxed`."""
  ids, pixels = dummy_inputs(config)
  variables = LlavaModel(config).init(rng, ids, pixels, image_valid=jnp.zeros((1,), bool))
  params = variables["params"]
  return params if boxed else nn.unbox(params)


def abstract_params(config: LlavaConfig):
  """(ShapeDtypeStruct tree, logical PartitionSpec tree) of the model's params, without allocating them."""
  # an abstract key: counting parameters must not start a backend (the plan's parent process only counts)
  boxed = jax.eval_shape(lambda r: init_params(config, r, boxed=True), jax.ShapeDtypeStruct((2,), jnp.uint32))
  return nn.unbox(boxed), nn.get_partition_spec(boxed)


def logical_partition_specs(config: LlavaConfig):
  """Pytree of logical PartitionSpecs for the params (no allocation: eval_shape)."""
  return abstract_params(config)[1]


def param_shardings(config: LlavaConfig, mesh):
  """Pytree of NamedShardings for the params on `mesh` (the modules' logical axes through the rule table)."""
  return parallel.logical_to_sharding(logical_partition_specs(config), mesh)


def sharded_abstract_params(config: LlavaConfig, mesh):
  """The params as ShapeDtypeStructs carrying their NamedShardings on `mesh` (restore / AOT-compile targets)."""
  shapes, logical = abstract_params(config)
  shardings = parallel.logical_to_sharding(logical, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
