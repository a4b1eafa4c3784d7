"""Data pipeline throughput: our grain pipeline vs a PyTorch DataLoader doing the same per-sample work.

Both read the same `SyntheticShapesSource` (PIL-drawn scenes at the model's image size), run the same per-sample
transform (`EncodeSample`: vicuna_v1 template, tokenization with loss masks from spans, CLIP preprocessing) in
`workers` worker processes, and batch `data_batch` samples. The transform's images are uint8 (resized and
cropped); both sides CLIP-normalize once per batch with the same `image.normalize_batch`, so both produce
float32 pixel values. The DataLoader's collate pads to the longest row and runs in its workers; ours builds
fixed-shape bucketed batches (data/batching.py) in the main process and keeps skip accounting and resumable
state.
Timed: samples per second after the first batch (worker start-up reported separately).
"""
from __future__ import annotations

import time

import numpy as np

from bench import common

TEMPLATE = "vicuna_v1"


def make_tokenizer(p: common.Preset, out_dir: str) -> str:
  """A small LLaMA-style SentencePiece tokenizer trained on the synthetic questions and answers."""
  from llava_jax.data.conversation import get_template
  from llava_jax.data.sources.synthetic import SyntheticShapesSource
  from llava_jax.data.tokenizer import train_tokenizer
  src = SyntheticShapesSource(200, seed=1, image_size=32)
  texts = [get_template(TEMPLATE).system] if hasattr(get_template(TEMPLATE), "system") else []
  for i in range(len(src)):
    texts += [t["value"].replace("<image>\n", "") for t in src[i]["conversations"]]
  train_tokenizer(texts * 5, out_dir, vocab_size=300)
  return out_dir


def _source(p: common.Preset):
  from llava_jax.data.sources.synthetic import SyntheticShapesSource
  return SyntheticShapesSource(p.data_samples + 8 * p.data_batch, seed=0, image_size=p.image_size,
                               multi_turn=True)


def _encode(p: common.Preset, tokenizer):
  from llava_jax.data.transforms import EncodeSample
  return EncodeSample(tokenizer=tokenizer, template=TEMPLATE, image_size=p.image_size, aspect_ratio="square",
                      num_image_tokens=p.num_patches, image_token_index=p.image_token, max_length=512)


def _time_batches(it, p: common.Preset, count) -> dict:
  t0 = time.perf_counter()
  first = next(it)
  startup = time.perf_counter() - t0
  need = p.data_samples
  got = 0
  t1 = time.perf_counter()
  while got < need:
    got += count(next(it))
  dt = time.perf_counter() - t1
  return dict(samples=got, seconds=dt, samples_per_s=got / dt, startup_s=startup, first_batch_rows=count(first))


def run_ours(p: common.Preset, tokenizer_dir: str, workers: int) -> dict:
  from llava_jax.data.pipeline import make_pipeline
  from llava_jax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(tokenizer_dir)
  it = make_pipeline(_source(p), tokenizer=tok, template=TEMPLATE, image_size=p.image_size,
                     num_image_tokens=p.num_patches, image_token_index=p.image_token, max_length=512,
                     global_batch_size=p.data_batch, seed=0, shuffle=True, num_epochs=None, worker_count=workers,
                     process_index=0, process_count=1)
  try:
    r = _time_batches(it, p, lambda b: int(np.sum(np.any(b["segment_ids"] > 0, axis=1))))
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()
  return dict(workers=workers, **r)


class _TorchDataset:
  """map-style dataset: source record → EncodeSample output (the same transform our pipeline runs)."""

  def __init__(self, source, encode):
    self.source, self.encode = source, encode

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return self.encode.map(self.source[i])


def _collate(samples):
  import torch
  samples = [s for s in samples if "skip" not in s]
  t = max(len(s["input_ids"]) for s in samples)
  ids = np.zeros((len(samples), t), np.int64)
  mask = np.zeros((len(samples), t), bool)
  att = np.zeros((len(samples), t), np.int64)
  for r, s in enumerate(samples):
    n = len(s["input_ids"])
    ids[r, :n], mask[r, :n], att[r, :n] = s["input_ids"], s["loss_mask"], 1
  from llava_jax.data.image import normalize_batch
  px = normalize_batch(np.concatenate([s["pixels"] for s in samples])).transpose(0, 3, 1, 2)
  labels = np.where(mask, ids, -100)
  return dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(att),
              labels=torch.from_numpy(labels), pixel_values=torch.from_numpy(np.ascontiguousarray(px)))


def run_torch(p: common.Preset, tokenizer_dir: str, workers: int) -> dict:
  import torch
  from llava_jax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(tokenizer_dir)
  ds = _TorchDataset(_source(p), _encode(p, tok))
  loader = torch.utils.data.DataLoader(ds, batch_size=p.data_batch, shuffle=True, num_workers=workers,
                                       collate_fn=_collate, persistent_workers=False,
                                       generator=torch.Generator().manual_seed(0))
  it = iter(loader)
  r = _time_batches(it, p, lambda b: int(b["input_ids"].shape[0]))
  del it
  return dict(workers=workers, **r)
