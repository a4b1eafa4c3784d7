"""Compile, before a server listens, every generation shape its limits allow, so that no request waits for a
compilation (one compile on the engine thread stalls every request queued behind it).

`generate` compiles `_prefill` once per (batch bucket, prompt bucket, image-count bucket, max_new_tokens bucket)
and `_decode` once per (batch, prompt, max_new_tokens) bucket (see the buckets in generate.py). `shapes` lists
the combinations a server can meet: batches of 1..max_batch_size requests, each with at most max_images images
(each image a run of num_image_tokens placeholders in its prompt), a prompt of at most max_prompt_tokens, and,
as the engine batches (engine.py), longest prompt + largest max_tokens within the context. `run` compiles each
by generating one token after a dummy prompt of that shape.

The count grows fast with the limits (LLaVA-1.5 with a 4k context, 8 rows, 4 images and 1024 output tokens: about
8,500), so `--precompile` is off by default: narrow --max_batch_size / --max_images / --max_prompt_tokens /
--max_output_tokens to what the deployment needs first. Without it the engine compiles each new shape on a
second thread (engine.py), so a new shape delays only its own requests.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from llava_jax.infer import generate as gen

logger = logging.getLogger(__name__)

Key = Tuple[int, int, int, int]  # (batch, prompt, images, new tokens) buckets: one compilation of _prefill


@dataclasses.dataclass(frozen=True)
class Shape:
  """One compilation: a dummy batch of `rows` prompts of `prompt_tokens` tokens holding `images` images in all,
  generating up to `new_tokens`; `key` its buckets."""
  rows: int
  prompt_tokens: int
  images: int
  new_tokens: int
  key: Key


def _batch_multiple(mesh) -> int:
  return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def _image_bucket(n: int) -> int:
  return 0 if n == 0 else gen._pow2(n)


def shape_key(model, prompt_lengths: Sequence[int], num_images: int, max_new_tokens: int) -> Key:
  """The buckets `generate` compiles a batch under (its longest prompt, all its images, its max_new_tokens)."""
  return (gen._batch_bucket(len(prompt_lengths), _batch_multiple(model.mesh)),
          gen.bucket_size(max(prompt_lengths), **gen.PROMPT_BUCKETS), _image_bucket(num_images),
          gen.bucket_size(max_new_tokens))


def _lowest(values: Sequence[int], bucket: Callable[[int], int]) -> Dict[int, Tuple[int, int]]:
  """bucket → (smallest, largest) of `values` falling in it."""
  out: Dict[int, Tuple[int, int]] = {}
  for v in values:
    b = bucket(v)
    lo, hi = out.get(b, (v, v))
    out[b] = (min(lo, v), max(hi, v))
  return out


def shapes(model, limits, max_batch_size: int) -> List[Shape]:
  """Every compilation a server with these limits (`openai_api.Limits`) and batch size can need."""
  context = model.max_positions
  max_prompt = min(limits.max_prompt_tokens or context - 1, context - 1)
  max_new = min(limits.max_output_tokens, context - 1)
  k = model.config.num_image_tokens
  multiple = _batch_multiple(model.mesh)
  rows_by_bucket = _lowest(range(1, max_batch_size + 1), lambda b: gen._batch_bucket(b, multiple))
  prompt_buckets = _lowest(range(1, max_prompt + 1), lambda n: gen.bucket_size(n, **gen.PROMPT_BUCKETS))
  new_buckets = _lowest(range(1, max_new + 1), gen.bucket_size)
  out = []
  for bb, (_, rows) in sorted(rows_by_bucket.items()):  # the most rows of the bucket spread images thinnest
    for ib, (images, _) in sorted(_lowest(range(rows * limits.max_images + 1), _image_bucket).items()):
      per_row = -(-images // rows)
      for tb, (prompt_lo, _) in sorted(prompt_buckets.items()):
        length = max(prompt_lo, per_row * k + 1)  # BOS + the placeholders at least
        if length > max_prompt or gen.bucket_size(length, **gen.PROMPT_BUCKETS) != tb:
          continue
        for nb, (new_lo, new_hi) in sorted(new_buckets.items()):
          new = min(new_hi, context - length)  # ≥ 2 where it can, so the decode loop compiles too
          if new >= new_lo:
            out.append(Shape(rows, length, images, new, (bb, tb, ib, nb)))
  return out


class _Compiled(Exception):
  """Ends a dummy generation once prefill and one decode step have run."""


def compile_shape(model, shape: Shape) -> None:
  """Run `generate` once on a dummy batch of `shape` (prefill, then one decode step when new_tokens ≥ 2)."""
  config = model.config
  k, image_id = config.num_image_tokens, config.image_token_index
  filler = 0 if image_id != 0 else 1
  s, c = config.vision.image_size, config.vision.num_channels
  counts = [shape.images // shape.rows + (r < shape.images % shape.rows) for r in range(shape.rows)]
  rows = [np.array([filler] + [image_id] * (n * k) + [filler] * (shape.prompt_tokens - 1 - n * k), np.int32)
          for n in counts]
  pixels = [np.zeros((n, s, s, c), np.float32) if n else None for n in counts]
  seen = [0] * shape.rows

  def stop_after_one_decode_step(event: gen.StreamEvent) -> None:
    seen[event.row] += len(event.token_ids)
    if seen[event.row] >= 2:
      raise _Compiled

  # stop ids that never match (same count as the model's, so the same bucket) keep every row generating
  never = (-1,) * max(1, len(model.stop_token_ids))
  try:
    gen.generate(config, model.params, rows, pixels if shape.images else None, max_new_tokens=shape.new_tokens,
                 temperature=[0.0] * shape.rows, top_p=[1.0] * shape.rows, top_k=[0] * shape.rows,
                 seed=[0] * shape.rows, stop_token_ids=never, stream_callback=stop_after_one_decode_step,
                 mesh=model.mesh, steps_per_chunk=1)
  except _Compiled:
    pass


def run(model, limits, max_batch_size: int, progress: Optional[Callable[[str], None]] = print) -> List[Shape]:
  """Compile every shape of `shapes(...)`, reporting each on `progress`; returns them."""
  todo = shapes(model, limits, max_batch_size)
  start = time.monotonic()
  for i, shape in enumerate(todo):
    if progress is not None:
      progress(f"precompiling {i + 1}/{len(todo)}: {shape.rows} request(s), {shape.prompt_tokens}-token prompt "
               f"bucket {shape.key[1]}, {shape.images} image(s), {shape.key[3]} new tokens "
               f"[{time.monotonic() - start:.0f} s]")
    compile_shape(model, shape)
  if progress is not None:
    progress(f"precompiled {len(todo)} shapes in {time.monotonic() - start:.0f} s")
  return todo
