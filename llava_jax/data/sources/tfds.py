"""TFDS data sets (prepared in array_record format) as records, through `tfds.data_source`-style random access.

Optional extra: needs `tensorflow-datasets` and `array_record` to read (no TensorFlow: examples are parsed
with TFDS' numpy parser). Preparing a data set (`tfds build --file_format=array_record` or
`builder.download_and_prepare(file_format='array_record')`) needs `tensorflow-cpu`.

Image features are not decoded by TFDS (SkipDecoding): records carry the encoded bytes in "images", and the
pipeline decodes them with data/image.load_image (PIL, with the pixel limit and the RGB rules), in its worker
processes, where a bad image is counted like any other.

An adapter maps one TFDS example (a dict of numpy values / bytes) to a record; adapters are registered by
data set name (`register_tfds_adapter`) or passed directly. Built in: 'coco_captions' (stage-1 caption
samples from TFDS' coco_captions), and the generic `ImageCaptionAdapter` / `ImageQAAdapter` for data sets
with an image and a text field.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

from llava_jax.data.sources.base import check_index
from llava_jax.errors import MissingFileError

Adapter = Callable[[Dict[str, Any], int], dict]
TFDS_ADAPTERS: Dict[str, Adapter] = {}

INSTALL_HINT = ("TfdsSource needs the optional extra: pip install tensorflow-datasets array_record "
                "(and tensorflow-cpu only to prepare a data set)")


def register_tfds_adapter(name: str, adapter: Optional[Adapter] = None):
  """Register `adapter(example, index) -> record` for the TFDS data set `name`; usable as a decorator."""
  def register(fn):
    TFDS_ADAPTERS[name] = fn
    return fn
  return register if adapter is None else register(adapter)


def as_text(value) -> str:
  """A TFDS Text value (bytes, numpy bytes/str scalar or 0-d array) as str."""
  if isinstance(value, np.ndarray):
    value = value.item() if value.ndim == 0 else value.tolist()
  if isinstance(value, (bytes, bytearray, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, str):
    return value
  raise TypeError(f"expected a text value, got {type(value).__name__}")


def _texts(value) -> list:
  if isinstance(value, (bytes, str, np.bytes_)) or (isinstance(value, np.ndarray) and value.ndim == 0):
    return [as_text(value)]
  return [as_text(v) for v in value]


class ImageCaptionAdapter:
  """Stage-1 sample from an image and a caption field: human "<image>\\n{prompt}", gpt = the caption
  (the `plain` template keeps only the image and the caption). A caption field holding several captions
  uses caption_index (clipped to the last)."""

  def __init__(self, image_key: str = "image", caption_key: str = "caption",
               prompt: str = "Describe the image briefly.", caption_index: int = 0, id_key: Optional[str] = None):
    self.image_key, self.caption_key, self.prompt = image_key, caption_key, prompt
    self.caption_index, self.id_key = caption_index, id_key

  def __call__(self, example: Dict[str, Any], index: int) -> dict:
    captions = _texts(_get(example, self.caption_key))
    record = {"conversations": [{"from": "human", "value": "<image>\n" + self.prompt},
                                {"from": "gpt", "value": captions[min(self.caption_index, len(captions) - 1)]
                                 if captions else ""}],
              "images": [_get(example, self.image_key)]}
    if self.id_key is not None:
      record["id"] = str(_scalar(_get(example, self.id_key)))
    return record


class ImageQAAdapter:
  """One-turn visual QA from image / question / answer fields: human "<image>\\n{question}", gpt = answer."""

  def __init__(self, image_key: str = "image", question_key: str = "question", answer_key: str = "answer",
               id_key: Optional[str] = None):
    self.image_key, self.question_key, self.answer_key, self.id_key = image_key, question_key, answer_key, id_key

  def __call__(self, example: Dict[str, Any], index: int) -> dict:
    answer = as_text(_get(example, self.answer_key))
    record = {"conversations": [{"from": "human", "value": "<image>\n" + as_text(_get(example, self.question_key))},
                                {"from": "gpt", "value": answer}],
              "images": [_get(example, self.image_key)], "meta": {"answers": [answer]}}
    if self.id_key is not None:
      record["id"] = str(_scalar(_get(example, self.id_key)))
    return record


def _get(example: Dict[str, Any], key: str):
  """example[key]; 'a/b' also looks into nested dicts."""
  if key in example:
    return example[key]
  node = example
  for part in key.split("/"):
    if not isinstance(node, dict) or part not in node:
      raise KeyError(f"TFDS example has no field {key!r}; fields: {sorted(example)}")
    node = node[part]
  return node


def _scalar(value):
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  return value.item() if isinstance(value, np.generic) else value


# TFDS coco_captions: image, image/id, captions: Sequence({id, text}) -> the first caption.
register_tfds_adapter("coco_captions", ImageCaptionAdapter(image_key="image", caption_key="captions/text",
                                                           id_key="image/id"))


def _skip_image_decoders(features):
  """{name: SkipDecoding()} for every (possibly nested) uint8 Image feature, so TFDS hands over bytes."""
  import tensorflow_datasets as tfds
  decoders = {}
  for name, feature in features.items():
    if isinstance(feature, tfds.features.FeaturesDict):
      nested = _skip_image_decoders(feature)
      if nested:
        decoders[name] = nested
    elif isinstance(feature, tfds.features.Image) and np.dtype(feature.np_dtype) == np.uint8:
      decoders[name] = tfds.decode.SkipDecoding()
  return decoders


class TfdsSource:
  """Records from a prepared TFDS data set (array_record), mapped by an adapter.

  name: TFDS name, optionally 'name/config:version'. split: any TFDS split spec ('train', 'train[:10%]').
  data_dir: where the data set was prepared (None: TFDS' default, ~/tensorflow_datasets).
  adapter: a registered adapter name, a callable `(example, index) -> record`, or None for the adapter
    registered under the data set's base name.
  Never downloads or prepares anything. Records get id f"{name}/{split}/{index}" unless the adapter sets
  one; image bytes stay undecoded (see the module docstring). Pickles without its reader (reopened lazily
  in each worker process).
  """

  def __init__(self, name: str, split: str, data_dir: Optional[Union[str, os.PathLike]] = None,
               adapter: Optional[Union[str, Adapter]] = None):
    try:
      import tensorflow_datasets  # noqa: F401
    except ImportError as e:
      raise ImportError(f"{INSTALL_HINT} ({e})") from e
    self.name, self.split = name, split
    self.data_dir = None if data_dir is None else os.fspath(data_dir)
    self.image_root = None
    base = name.split("/")[0].split(":")[0]
    if adapter is None:
      adapter = base
    if isinstance(adapter, str):
      if adapter not in TFDS_ADAPTERS:
        raise ValueError(f"no TFDS adapter registered for {adapter!r}; registered: {sorted(TFDS_ADAPTERS)}. "
                         "Pass adapter=callable(example, index) -> record or register one with "
                         "register_tfds_adapter")
      adapter = TFDS_ADAPTERS[adapter]
    self.adapter = adapter
    self._reader = None
    self._length = len(self._open())

  def _open(self):
    if self._reader is None:
      import tensorflow_datasets as tfds
      hint = "prepare it with `tfds build --file_format=array_record` (needs tensorflow-cpu)"
      try:
        builder = tfds.builder(self.name, data_dir=self.data_dir)
      except tfds.core.DatasetNotFoundError:
        raise MissingFileError(f"TFDS data set {self.name!r} is not prepared under data_dir={self.data_dir!r} "
                                f"and has no registered builder; {hint}") from None
      if not builder.is_prepared():
        raise MissingFileError(f"TFDS data set {self.name!r} is not prepared under {builder.data_dir}; {hint}")
      self._reader = builder.as_data_source(split=self.split,
                                            decoders=_skip_image_decoders(builder.info.features) or None)
    return self._reader

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index) -> dict:
    i = check_index(index, self._length)
    record = dict(self.adapter(self._open()[i], i))
    record.setdefault("id", f"{self.name}/{self.split}/{i}")
    if "images" in record:
      record["images"] = [bytes(im) if isinstance(im, (bytes, np.bytes_)) else im for im in record["images"]]
    return record

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_reader"] = None
    return state

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, {self.split!r}, data_dir={self.data_dir!r}, records={len(self)})"
