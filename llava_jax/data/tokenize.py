"""Rendered conversation → `input_ids` with image placeholder runs and a loss mask from segment spans.

Token ids are exactly the reference's (LLaVA `tokenizer_image_token`): the prompt is split at each `<image>`,
every chunk is tokenized on its own as LLaMA's SentencePiece tokenizer encodes it, with its BOS (see
`llava_jax.data.tokenizer.encode_with_offsets` for why not by transformers 5's LlamaTokenizer alone), the BOS is
kept once at the front and stripped from the other chunks, and each `<image>` becomes a run of `num_image_tokens`
copies of `image_token_index` (the reference inserts one -200 that the model later widens to 256 / 576 features).

The loss mask comes from character spans: each chunk is tokenized with an offset mapping, and a token is
supervised iff its characters overlap a supervised segment (a zero-width token takes the flag of the
character it sits on). So a user message that contains "ASSISTANT:" or "###", or a tokenizer that merges
across a segment boundary, cannot shift the mask, unlike the reference's re-tokenize-and-count rule.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from llava_jax.data import conversation as conv_lib
from llava_jax.data.errors import SampleError
from llava_jax.data.tokenizer import encode_with_offsets


@dataclasses.dataclass(frozen=True)
class EncodedSample:
  """One encoded training sample.

  input_ids: int32 [T]; image placeholder runs hold `image_token_index`.
  loss_mask: bool [T]; True where token t is a target of the loss (predicted from position t-1), i.e. where
    the reference's labels are not -100.
  image_mask: bool [T]; True on image placeholder positions (never in loss_mask).
  num_images: number of placeholder runs (each `num_image_tokens` long), in order of appearance.
  prompt: the rendered prompt string (with literal `<image>`s).
  truncated: whether the sequence was cut to max_length.
  """
  input_ids: np.ndarray
  loss_mask: np.ndarray
  image_mask: np.ndarray
  num_images: int
  prompt: str
  truncated: bool = False
  sample_id: Any = None

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])


def _chunks(segments: Sequence[conv_lib.Segment]) -> List[Tuple[str, np.ndarray]]:
  """Split segments at image segments → [(chunk text, per-character supervised flags bool [len])]."""
  chunks, texts, flags = [], [], []
  for seg in segments:
    if seg.kind == "image":
      chunks.append(("".join(texts), np.concatenate(flags) if flags else np.zeros(0, bool)))
      texts, flags = [], []
    else:
      texts.append(seg.text)
      flags.append(np.full(len(seg.text), bool(seg.supervised)))
  chunks.append(("".join(texts), np.concatenate(flags) if flags else np.zeros(0, bool)))
  return chunks


def _tokenize_chunk(tokenizer, text: str):
  """One chunk → (ids list, offsets int [n, 2]) with the tokenizer's own special tokens, as SentencePiece encodes
  it (`tokenizer.encode_with_offsets`: transformers 5 alone drops the dummy-prefix `▁` before a leading space)."""
  return encode_with_offsets(tokenizer, text)


def _token_flags(offsets: np.ndarray, char_flags: np.ndarray) -> np.ndarray:
  """bool [n]: token i is flagged iff its span [s, e) overlaps a flagged character; zero-width tokens take
  the flag of the character at s (none at the end of the chunk)."""
  n_chars = char_flags.shape[0]
  if offsets.shape[0] == 0:
    return np.zeros(0, bool)
  s = np.clip(offsets[:, 0], 0, n_chars)
  e = np.clip(offsets[:, 1], 0, n_chars)
  csum = np.concatenate([[0], np.cumsum(char_flags, dtype=np.int64)])
  overlap = (csum[e] - csum[s]) > 0
  at = np.zeros(offsets.shape[0], bool)
  inside = s < n_chars
  at[inside] = char_flags[s[inside]]
  return np.where(e > s, overlap, at)


def encode_segments(segments: Sequence[conv_lib.Segment], tokenizer, *, num_image_tokens: int,
                    image_token_index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Segments → (input_ids int32 [T], loss_mask bool [T], image_mask bool [T]), no truncation.

  Reproduces `tokenizer_image_token(prompt_text(segments))` with each image id widened to a run of
  `num_image_tokens`.
  """
  if num_image_tokens < 1:
    raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
  bos = tokenizer.bos_token_id
  ids_parts, mask_parts, image_parts = [], [], []
  has_bos = False
  for j, (text, char_flags) in enumerate(_chunks(segments)):
    if j:
      ids_parts.append(np.full(num_image_tokens, image_token_index, np.int64))
      mask_parts.append(np.zeros(num_image_tokens, bool))
      image_parts.append(np.ones(num_image_tokens, bool))
    ids, offsets = _tokenize_chunk(tokenizer, text)
    flags = _token_flags(offsets, char_flags)
    if j == 0:
      has_bos = bos is not None and len(ids) > 0 and ids[0] == bos
      if has_bos:  # BOS stays once, at the front, never a target
        flags[0] = False
    elif has_bos and ids and ids[0] == bos:  # the reference strips every later chunk's BOS
      ids, flags = ids[1:], flags[1:]
    ids_parts.append(np.asarray(ids, np.int64))
    mask_parts.append(flags)
    image_parts.append(np.zeros(len(ids), bool))
  input_ids = np.concatenate(ids_parts)
  if input_ids.size and (input_ids.max() > np.iinfo(np.int32).max or input_ids.min() < np.iinfo(np.int32).min):
    raise ValueError("token ids do not fit int32")
  return input_ids.astype(np.int32), np.concatenate(mask_parts), np.concatenate(image_parts)


def encode_conversation(conversations, template, tokenizer, *, num_image_tokens: int, image_token_index: int,
                        max_length: int, num_images: Optional[int] = None, sample_id=None,
                        images_to_front: bool = True) -> EncodedSample:
  """A training conversation → EncodedSample (see module doc).

  conversations: LLaVA turns `[{"from": "human"|"gpt", "value": str}, ...]` (see `conversation.normalize_turns`).
  template: a registered template name or a `Template`.
  num_image_tokens: placeholders per image (`LlavaConfig.num_image_tokens`: 256 / 576).
  image_token_index: the placeholder id (`LlavaConfig.image_token_index`: 32000 for llava-hf, -200 original).
  max_length: longest sequence kept, image placeholders included. A longer sample is cut at max_length unless
    the cut would remove (part of) an image run → SampleError('too_long').
  num_images: number of images the sample carries; when given it must equal the number of `<image>`s
    → else SampleError('image_mismatch').
  Raises SampleError('malformed_conversation') for bad turns and ('no_supervised_tokens') when no loss
  token remains after truncation.
  """
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  segments = conv_lib.render(conversations, template, sample_id=sample_id, images_to_front=images_to_front)
  n_placeholders = sum(s.kind == "image" for s in segments)
  if num_images is not None and num_images != n_placeholders:
    raise SampleError("image_mismatch",
                      f"{num_images} image(s) but {n_placeholders} {conv_lib.IMAGE_TOKEN} placeholder(s)", sample_id)
  input_ids, loss_mask, image_mask = encode_segments(
      segments, tokenizer, num_image_tokens=num_image_tokens, image_token_index=image_token_index)
  total = input_ids.shape[0]
  truncated = total > max_length
  if truncated:
    if image_mask[max_length:].any():
      raise SampleError("too_long", f"{total} tokens > max_length={max_length} and the cut would drop "
                        "(part of) an image's placeholder run", sample_id)
    input_ids, loss_mask, image_mask = input_ids[:max_length], loss_mask[:max_length], image_mask[:max_length]
  if not loss_mask.any():
    raise SampleError("no_supervised_tokens", f"no supervised token left (length {total}, "
                      f"max_length {max_length})", sample_id)
  return EncodedSample(input_ids=input_ids, loss_mask=loss_mask, image_mask=image_mask,
                       num_images=n_placeholders, prompt=conv_lib.prompt_text(segments), truncated=truncated,
                       sample_id=sample_id)


def encode_generation_prompt(conversations, template, tokenizer, *, num_image_tokens: int,
                             image_token_index: int, num_images: Optional[int] = None,
                             images_to_front: bool = True) -> np.ndarray:
  """A conversation ending with a human turn → prompt ids int32 [T] ending with the generation prefix."""
  segments = conv_lib.render_generation(conversations, template, images_to_front=images_to_front)
  n_placeholders = sum(s.kind == "image" for s in segments)
  if num_images is not None and num_images != n_placeholders:
    raise SampleError("image_mismatch", f"{num_images} image(s) but {n_placeholders} "
                      f"{conv_lib.IMAGE_TOKEN} placeholder(s)")
  return encode_segments(segments, tokenizer, num_image_tokens=num_image_tokens,
                         image_token_index=image_token_index)[0]


def stop_token_ids(template, tokenizer) -> Tuple[int, ...]:
  """Token ids that end generation for `template`: EOS plus any stop string that is a special / added token
  of the tokenizer (e.g. '<|im_end|>' in a ChatML tokenizer). Multi-token stops ('###') are matched on the
  decoded text with `conversation.stop_strings(template)`."""
  out = []
  if tokenizer.eos_token_id is not None:
    out.append(int(tokenizer.eos_token_id))
  added = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
  for s in conv_lib.stop_strings(template):
    s = s.strip()
    if s in added:
      tid = int(tokenizer.convert_tokens_to_ids(s))
      if tid not in out:
        out.append(tid)
  return tuple(out)
