"""`generate`'s inputs normalised and checked on the host: prompts (id sequences, a padded [B, T] array, or
strings tokenized as LLaVA does), images, and per-row sampling settings. Every problem is a ValueError that
names the prompt and the fix."""
from __future__ import annotations

from typing import List, Optional

import jax
import numpy as np

from llava_jax.config import LlavaConfig
from llava_jax.data import conversation as conv_lib
from llava_jax.data.tokenize import encode_segments
from llava_jax.models.llava import check_image_placeholders


def encode_prompt(text: str, tokenizer, config: LlavaConfig) -> np.ndarray:
  """A prompt string (with literal `<image>`s) → ids with image placeholder runs, as LLaVA tokenizes."""
  parts = text.split(conv_lib.IMAGE_TOKEN)
  segments = []
  for j, part in enumerate(parts):
    if j:
      segments.append(conv_lib.Segment(conv_lib.IMAGE_TOKEN, "user", False, "image"))
    segments.append(conv_lib.Segment(part, "user", False, "text"))
  return encode_segments(segments, tokenizer, num_image_tokens=config.num_image_tokens,
                         image_token_index=config.image_token_index)[0]


def prompt_rows(input_ids, attention_mask, prompts, tokenizer, config) -> List[np.ndarray]:
  if (input_ids is None) == (prompts is None):
    raise ValueError("pass exactly one of input_ids (token ids) and prompts (strings, with a tokenizer)")
  if prompts is not None:
    if tokenizer is None:
      raise ValueError("prompts given as strings need a tokenizer")
    if isinstance(prompts, str):
      prompts = [prompts]
    return [encode_prompt(p, tokenizer, config) for p in prompts]
  if isinstance(input_ids, np.ndarray) or isinstance(input_ids, jax.Array):
    arr = np.asarray(input_ids)
    if arr.ndim == 1:
      arr = arr[None]
    if arr.ndim != 2:
      raise ValueError(f"input_ids must be [B, T] or a list of 1-D sequences, got shape {arr.shape}")
    if attention_mask is not None:
      m = np.asarray(attention_mask).astype(bool).reshape(arr.shape)
      return [arr[r][m[r]] for r in range(arr.shape[0])]
    return list(arr)
  if attention_mask is not None:
    raise ValueError("attention_mask only goes with a [B, T] input_ids array")
  rows = list(input_ids)
  if rows and np.ndim(rows[0]) == 0:  # a single flat list of ids
    rows = [rows]
  return [np.asarray(r) for r in rows]


def image_array(pixel_values, config: LlavaConfig) -> Optional[np.ndarray]:
  """pixel_values: None, [N, S, S, 3], or a per-row list of None / [S, S, 3] / [n, S, S, 3] → [N, S, S, 3]."""
  if pixel_values is None:
    return None
  if isinstance(pixel_values, (list, tuple)):
    parts = []
    for p in pixel_values:
      if p is None:
        continue
      p = np.asarray(p, np.float32)
      parts.append(p[None] if p.ndim == 3 else p)
    if not parts:
      return None
    pixel_values = np.concatenate(parts)
  arr = np.asarray(pixel_values, np.float32)
  s = config.vision.image_size
  if arr.ndim != 4 or arr.shape[1:] != (s, s, config.vision.num_channels):
    raise ValueError(f"pixel_values must be [N, {s}, {s}, {config.vision.num_channels}] CLIP-normalized NHWC "
                     f"(see data/image.preprocess), got {arr.shape}")
  return arr if arr.shape[0] else None


def check_rows(rows: List[np.ndarray], num_images: int, config: LlavaConfig, max_new_tokens: int) -> None:
  k, img, vocab = config.num_image_tokens, config.image_token_index, config.text.vocab_size
  for r, ids in enumerate(rows):
    if ids.ndim != 1 or ids.size == 0:
      raise ValueError(f"prompt {r} must be a non-empty 1-D id sequence, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"prompt {r} holds {ids.dtype} values; token ids must be integers")
    is_img = ids == img
    bad = ~is_img & ((ids < 0) | (ids >= vocab))
    if bad.any():
      raise ValueError(f"prompt {r} has token id {int(ids[bad][0])} outside the vocabulary [0, {vocab})")
    runs = np.diff(np.concatenate([[0], is_img.astype(np.int8), [0]]))
    lengths = np.flatnonzero(runs == -1) - np.flatnonzero(runs == 1)
    if np.any(lengths % k):
      raise ValueError(f"prompt {r} has an image placeholder run of {int(lengths[lengths % k != 0][0])} tokens; "
                       f"each image needs exactly {k} copies of id {img}")
    limit = config.text.max_position_embeddings
    if ids.size + max_new_tokens > limit:
      raise ValueError(f"prompt {r}: {ids.size} tokens + max_new_tokens {max_new_tokens} exceed the model's "
                       f"max_position_embeddings {limit}")
  check_image_placeholders(np.concatenate(rows), num_images, k, img)


def per_row(name, value, b, dtype, lo, hi) -> np.ndarray:
  arr = np.broadcast_to(np.asarray(value, dtype), (b,)) if np.ndim(value) == 0 else np.asarray(value, dtype)
  if arr.shape != (b,):
    raise ValueError(f"{name} must be a scalar or one value per prompt ({b}), got shape {arr.shape}")
  if not np.all(np.isfinite(arr)) or np.any(arr < lo) or np.any(arr > hi):
    raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}")
  return arr
