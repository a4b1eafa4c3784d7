"""Data sources: random-access collections (len + __getitem__) of training records, ready for grain's
`MapDataset.source`.

Every source yields records of one form:
  {"id": str,
   "conversations": [{"from": "human" | "gpt", "value": str}, ...],   "<image>" marks where an image goes
   "image": str | [str]        optional: paths relative to the source's `image_root` (absolute ones as is)
   "images": [PIL.Image | uint8 array [H, W, 3] | encoded bytes]      optional: in-memory images
   "meta": {...}}              optional: what evaluation needs (ScienceQA answer and categories, synthetic
                               ground-truth answers, ...)
A record carries either "image" paths or in-memory "images" (in-memory ones win if both are present); each
image must match one "<image>" placeholder. Every source has an `image_root` attribute (None when paths are
absolute or images are in memory) to hand to the pipeline. File-based sources never open images: the pipeline
decodes them (data/image.load_image) in its workers, so a missing or broken file is a counted per-sample skip.
Structurally bad records (an empty, non-string or NUL-bearing "image" path included) are kept and yielded as
found; the encoder rejects them with SampleError('malformed_conversation'). A source may have `origins(i)`
saying where record i is in its files ("data.jsonl line 13"); the pipeline names it in skip logs and strict
errors (else "index i").

Sources: LlavaJsonSource (LLaVA .json / .jsonl), ScienceQASource (raw ScienceQA release, QCM-LEA),
SyntheticShapesSource (seeded coloured-shape visual QA and captions), TfdsSource (prepared TFDS data sets;
optional extra `tensorflow-datasets`, `array_record`). `make_source(kind, **kwargs)` builds one by name.
"""
from llava_jax.data.sources.base import PackedJson, record_problem
from llava_jax.data.sources.llava_json import LlavaJsonSource
from llava_jax.data.sources.scienceqa import ScienceQASource, render_problem
from llava_jax.data.sources.synthetic import SyntheticShapesSource
from llava_jax.data.sources.tfds import (ImageCaptionAdapter, ImageQAAdapter, TfdsSource, TFDS_ADAPTERS,
                                         register_tfds_adapter)

SOURCE_TYPES = {
    "llava_json": LlavaJsonSource,
    "scienceqa": ScienceQASource,
    "synthetic_shapes": SyntheticShapesSource,
    "tfds": TfdsSource,
}


def make_source(kind: str, **kwargs):
  """A source by type name (SOURCE_TYPES) and its constructor's keyword arguments."""
  if kind not in SOURCE_TYPES:
    raise ValueError(f"unknown source type {kind!r}; choose one of {sorted(SOURCE_TYPES)}")
  return SOURCE_TYPES[kind](**kwargs)


__all__ = ["LlavaJsonSource", "ScienceQASource", "SyntheticShapesSource", "TfdsSource", "ImageCaptionAdapter",
           "ImageQAAdapter", "TFDS_ADAPTERS", "register_tfds_adapter", "render_problem", "record_problem",
           "PackedJson", "SOURCE_TYPES", "make_source"]
