"""Per-sample grain transform: a source record → an encoded sample, or a skip marker for bad data.

Runs in grain's worker processes (or threads of the main process when worker_count = 0), so it must be
picklable and free of shared state: it holds the tokenizer, the template and the preprocessing options.

A record is `{"id", "conversations", "image": str | [str] (paths under image_root), "images": [PIL | uint8
array] (in memory), "meta"}`; in-memory `images` take precedence over `image` paths.

What makes a record usable is decided in one place, `SampleRules.check` (image count, conversation, images
decoded); the training transform (`EncodeSample`) and `--mode=inspect` (data/inspect.py) both call it, so they
agree on every skip.

Output element (a dict), one of
  sample: {"id": str, "input_ids": int32 [t], "loss_mask": bool [t], "pixels": uint8 [k, S, S, 3]}
  skip:   {"id": str, "skip": reason, "message": str, "origin": str | None}
                                                           (reason ∈ errors.REASONS; message without the
                                                            "[reason] sample id:" prefix; origin: where the record
                                                            sits in its source: the record's "_origin", see
                                                            `AddOrigin`)
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

import dataclasses
import os
from typing import Any, List, Optional, Tuple

import numpy as np

import grain

from llava_jax.data.errors import SampleError
from llava_jax.data.sources.base import image_path_problem

ORIGIN_KEY = "_origin"  # record key: where the record sits in its source ("data.jsonl line 13", "index 7")
_IN_MEMORY_TYPES = (bytes, bytearray, memoryview, np.ndarray)


def is_skip(element: dict) -> bool:
  return "skip" in element


def skip_to_error(element: dict) -> SampleError:
  """Rebuild the SampleError a skip marker stands for (message as raised, naming the sample id and origin)."""
  return SampleError(element["skip"], element["message"], sample_id=element["id"], origin=element.get("origin"))


class AddOrigin(grain.transforms.MapWithIndex):
  """(source index, record) → the record with `"_origin"`: where it sits in its source, `origins(index)` when the
  source has `origins` (e.g. LlavaJsonSource: "data.jsonl line 13"), else "index {index}". Runs on the source,
  before shuffling, so the index is the source's."""

  def __init__(self, origins=None):
    self.origins = origins

  def map_with_index(self, index: int, record):
    if isinstance(record, dict):
      record = {**record, ORIGIN_KEY: self.origins(index) if self.origins is not None else f"index {index}"}
    return record


def record_origin(record) -> Optional[str]:
  origin = record.get(ORIGIN_KEY) if isinstance(record, dict) else None
  return None if origin is None else str(origin)


def record_image_sources(record: dict) -> List[Any]:
  """The images a record carries, unloaded: in-memory ones (`images`) or paths (`image`: str or list).

  A present but unusable value (an "image" that is not a path string or a list of them, an empty or NUL-bearing
  path, an "images" that is not a list of PIL images / arrays / encoded bytes) raises
  SampleError('malformed_conversation'). `"image": []` (or null) means no image.
  """
  from PIL import Image
  sid = record.get("id")
  images = record.get("images")
  if images is not None:
    if not isinstance(images, (list, tuple)):
      raise SampleError("malformed_conversation", f"'images' must be a list of images, got {type(images).__name__}",
                        sid)
    if images:
      bad = [type(x).__name__ for x in images if not isinstance(x, _IN_MEMORY_TYPES + (Image.Image,))]
      if bad:
        raise SampleError("malformed_conversation", f"'images' holds unsupported value(s) of type {bad[0]}", sid)
      return list(images)
  paths = record.get("image")
  if paths is None:
    return []
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  elif not isinstance(paths, (list, tuple)):
    raise SampleError("malformed_conversation", f"'image' must be a path or a list of paths, got "
                      f"{type(paths).__name__}", sid)
  for p in paths:
    problem = image_path_problem(p)
    if problem:
      raise SampleError("malformed_conversation", f"'image': {problem}", sid)
  return list(paths)


def resolve_image(src, image_root: Optional[str]):
  """A relative path is taken under image_root; absolute paths and in-memory images pass through."""
  if isinstance(src, (str, os.PathLike)) and image_root is not None and not os.path.isabs(src):
    return os.path.join(image_root, src)
  return src


def load_sample_image(src, *, image_root: Optional[str] = None, max_pixels: Optional[int] = None,
                      max_bytes: Optional[int] = None, sample_id=None):
  """data/image.load_image on a resolved source (max_pixels / max_bytes None = image.py's default limits)."""
  from llava_jax.data import image as image_lib
  kw = {} if max_pixels is None else {"max_pixels": max_pixels}
  if max_bytes is not None:
    kw["max_bytes"] = max_bytes
  return image_lib.load_image(resolve_image(src, image_root), sample_id=sample_id, **kw)


@dataclasses.dataclass(frozen=True)
class SampleRules:
  """Everything that decides whether a record is used, and `check`, the one function that decides it.

  template: a Template or a registered template name.
  max_images: samples with more images are 'too_long' (they cannot fit a batch's image slots); None: no limit.
  image_root, max_pixels, max_image_bytes: image loading (see `load_sample_image`; None = image.py's defaults).
  """
  tokenizer: Any
  template: Any
  num_image_tokens: int
  image_token_index: int
  max_length: int
  max_images: Optional[int] = None
  image_root: Optional[str] = None
  max_pixels: Optional[int] = None
  max_image_bytes: Optional[int] = None

  def __post_init__(self):
    from llava_jax.data import conversation as conv_lib
    object.__setattr__(self, "template", conv_lib.get_template(self.template))

  def check(self, record: dict, *, load_images: bool = True) -> Tuple[Any, list]:
    """record → (EncodedSample, decoded RGB PIL images) or SampleError naming the sample and its origin.

    Order: image values, image count (max_images), conversation, then the images (decoded only if
    load_images), so a sample with several faults counts under the first.
    """
    from llava_jax.data.tokenize import encode_conversation
    sid = record.get("id") if isinstance(record, dict) else None
    try:
      if not isinstance(record, dict):
        raise SampleError("malformed_conversation", f"record is a {type(record).__name__}, expected a dict")
      sources = record_image_sources(record)
      if self.max_images is not None and len(sources) > self.max_images:
        raise SampleError("too_long", f"{len(sources)} images > {self.max_images} allowed per sample "
                          "(max_images_per_sample)", sid)
      enc = encode_conversation(record.get("conversations"), self.template, self.tokenizer,
                                num_image_tokens=self.num_image_tokens, image_token_index=self.image_token_index,
                                max_length=self.max_length, num_images=len(sources), sample_id=sid)
      images = [load_sample_image(src, image_root=self.image_root, max_pixels=self.max_pixels,
                                  max_bytes=self.max_image_bytes, sample_id=sid)
                for src in sources] if load_images else []
    except SampleError as e:
      raise SampleError(e.reason, e.detail, sample_id=sid if sid is not None else e.sample_id,
                        origin=record_origin(record)) from None
    return enc, images


class EncodeSample(grain.transforms.Map):
  """record → encoded sample or skip marker (see module doc); the decision is `SampleRules.check`.

  template: a Template or a registered template name.
  max_images: samples with more images are skipped ('too_long': they cannot fit a batch's image slots).
  """

  def __init__(self, *, tokenizer, template, image_size: int, aspect_ratio: str, num_image_tokens: int,
               image_token_index: int, max_length: int, image_root: Optional[str] = None,
               max_pixels: Optional[int] = None, max_images: Optional[int] = None,
               max_image_bytes: Optional[int] = None):
    self.rules = SampleRules(tokenizer=tokenizer, template=template, num_image_tokens=int(num_image_tokens),
                             image_token_index=int(image_token_index), max_length=int(max_length),
                             max_images=max_images, image_root=image_root, max_pixels=max_pixels,
                             max_image_bytes=max_image_bytes)
    self.image_size = int(image_size)
    self.aspect_ratio = aspect_ratio

  def encode(self, record: dict) -> dict:
    """record → sample dict; raises SampleError for bad data (see `SampleRules.check`)."""
    from llava_jax.data import image as image_lib
    enc, images = self.rules.check(record)
    pixels = np.zeros((len(images), self.image_size, self.image_size, 3), np.uint8)
    for i, img in enumerate(images):
      pixels[i] = image_lib.preprocess_uint8(img, image_size=self.image_size, aspect_ratio=self.aspect_ratio)
    return {"id": str(record.get("id")), "input_ids": np.asarray(enc.input_ids, np.int32),
            "loss_mask": np.asarray(enc.loss_mask, np.bool_), "pixels": pixels}

  def map(self, record: dict) -> dict:
    try:
      return self.encode(record)
    except SampleError as e:
      return {"id": str(e.sample_id), "skip": e.reason, "message": e.detail, "origin": e.origin}
