"""Per-sample grain transform: a source record → an encoded sample, or a skip marker for bad data.

Runs in grain's worker processes (or threads of the main process when worker_count = 0), so it must be
picklable and free of shared state: it holds the tokenizer, the template and the preprocessing options.

A record is `{"id", "conversations", "image": str | [str] (paths under image_root), "images": [PIL | uint8
array] (in memory), "meta"}`; in-memory `images` take precedence over `image` paths.

Output element (a dict), one of
  sample: {"id": str, "input_ids": int32 [t], "loss_mask": bool [t], "pixels": uint8 [k, S, S, 3]}
  skip:   {"id": str, "skip": reason, "message": str}      (reason ∈ errors.REASONS; message without the
                                                            "[reason] sample id:" prefix)
`pixels` are the images resized / cropped / padded (`image.preprocess_uint8`), NOT yet rescaled and
normalized: a quarter of the float32 bytes to ship from a worker, and the normalization runs once per batch,
vectorized, when the batch is assembled (data/batching.py), giving the same float32 `pixel_values` as
`image.preprocess` per image. The key is deliberately not `pixel_values`, which everywhere else means
CLIP-normalized float32, so nothing can take one for the other.
Bad samples are never dropped here: the marker travels to the main process, which counts, logs and (in strict
mode) raises, so the counts are exact whatever the number of workers and the element order does not depend
on it.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional

import numpy as np

import grain

from llava_jax.data.errors import SampleError


def is_skip(element: dict) -> bool:
  return "skip" in element


def skip_to_error(element: dict) -> SampleError:
  """Rebuild the SampleError a skip marker stands for (message as raised, naming the sample id)."""
  return SampleError(element["skip"], element["message"], sample_id=element["id"])


def _detail(e: SampleError) -> str:
  """The message of a SampleError without its "[reason] sample 'id':" prefix."""
  text = str(e)
  for prefix in (f"[{e.reason}] sample {e.sample_id!r}:", f"[{e.reason}]"):
    if text.startswith(prefix):
      return text[len(prefix):].lstrip()
  return text


def record_image_sources(record: dict) -> List[Any]:
  """The images a record carries, unloaded: in-memory ones (`images`) or paths (`image`: str or list)."""
  images = record.get("images")
  if images is not None and len(images):
    return list(images)
  paths = record.get("image")
  if paths is None or (isinstance(paths, (list, tuple)) and not paths):
    return []
  if isinstance(paths, (str, os.PathLike)):
    return [paths]
  if isinstance(paths, (list, tuple)):
    return list(paths)
  raise SampleError("malformed_conversation", f"'image' must be a path or a list of paths, got "
                    f"{type(paths).__name__}", record.get("id"))


def resolve_image(src, image_root: Optional[str]):
  """A relative path is taken under image_root; absolute paths and in-memory images pass through."""
  if isinstance(src, (str, os.PathLike)) and image_root is not None and not os.path.isabs(src):
    return os.path.join(image_root, src)
  return src


def load_image(src, *, image_root: Optional[str] = None, max_pixels: Optional[int] = None, sample_id=None):
  """data/image.load_image on a resolved source (max_pixels None = image.py's default limit)."""
  from llava_jax.data import image as image_lib
  kw = {} if max_pixels is None else {"max_pixels": max_pixels}
  return image_lib.load_image(resolve_image(src, image_root), sample_id=sample_id, **kw)


class EncodeSample(grain.transforms.Map):
  """record → encoded sample or skip marker (see module doc).

  template: a Template or a registered template name.
  max_images: samples with more images are skipped ('too_long': they cannot fit a batch's image slots).
  """

  def __init__(self, *, tokenizer, template, image_size: int, aspect_ratio: str, num_image_tokens: int,
               image_token_index: int, max_length: int, image_root: Optional[str] = None,
               max_pixels: Optional[int] = None, max_images: Optional[int] = None):
    from llava_jax.data import conversation as conv_lib
    self.tokenizer = tokenizer
    self.template = conv_lib.get_template(template)
    self.image_size = int(image_size)
    self.aspect_ratio = aspect_ratio
    self.num_image_tokens = int(num_image_tokens)
    self.image_token_index = int(image_token_index)
    self.max_length = int(max_length)
    self.image_root = image_root
    self.max_pixels = max_pixels
    self.max_images = max_images

  def encode(self, record: dict) -> dict:
    """record → sample dict; raises SampleError for bad data (the conversation is checked before any image
    is decoded, so a sample with both faults counts under the conversation's reason)."""
    from llava_jax.data import image as image_lib
    from llava_jax.data.tokenize import encode_conversation
    sid = record.get("id")
    sources = record_image_sources(record)
    if self.max_images is not None and len(sources) > self.max_images:
      raise SampleError("too_long", f"{len(sources)} images > {self.max_images} allowed per sample", sid)
    enc = encode_conversation(record.get("conversations"), self.template, self.tokenizer,
                              num_image_tokens=self.num_image_tokens, image_token_index=self.image_token_index,
                              max_length=self.max_length, num_images=len(sources), sample_id=sid)
    pixels = np.zeros((len(sources), self.image_size, self.image_size, 3), np.uint8)
    for i, src in enumerate(sources):
      img = load_image(src, image_root=self.image_root, max_pixels=self.max_pixels, sample_id=sid)
      pixels[i] = image_lib.preprocess_uint8(img, image_size=self.image_size, aspect_ratio=self.aspect_ratio)
    return {"id": str(sid), "input_ids": np.asarray(enc.input_ids, np.int32),
            "loss_mask": np.asarray(enc.loss_mask, np.bool_), "pixels": pixels}

  def map(self, record: dict) -> dict:
    try:
      return self.encode(record)
    except SampleError as e:
      sid = record.get("id")
      return {"id": str(sid if sid is not None else e.sample_id), "skip": e.reason, "message": _detail(e)}
