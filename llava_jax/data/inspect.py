"""Inspect mode: see exactly what the model will be trained on before paying for a run.

`inspect_samples` encodes the first `limit` samples of a source as the training pipeline does, prints each with
its supervised spans marked (`[[...]]`, or green with color=True) and image placeholder runs shown compactly
(`<image×576>`), and writes one JSON line per sample:

  {"id", "input_ids": [int], "loss_mask": [0|1], "text": str, "supervised_text": [str]}

`text` is the decoded sequence; `supervised_text` the decoded contiguous supervised runs. A bad sample gets
`{"id", "origin", "skip": reason, "error": message}` instead. Decoding is incremental within each text chunk (a
run's text is decode(chunk[:end]) minus decode(chunk[:start])), so the spaces SentencePiece folds into tokens
stay with the token that holds them.

What is used and what is skipped is decided by the training pipeline's own function (`transforms.SampleRules.
check`); `inspect_from_config` passes it the pipeline's options, so inspect and training agree sample by sample.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from llava_jax.data import transforms as transforms_lib
from llava_jax.data.errors import REASONS, SampleError

ANSI_ON, ANSI_OFF = "\x1b[1;32m", "\x1b[0m"
MARK_ON, MARK_OFF = "[[", "]]"


def _decode(tokenizer, ids) -> str:
  return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def decoded_runs(input_ids: np.ndarray, loss_mask: np.ndarray, tokenizer, *, image_token_index: int,
                 num_image_tokens: int) -> List[Tuple[str, bool, str]]:
  """Split a sequence into maximal runs → [(kind 'image' | 'text', supervised, text)].

  Image runs read `<image×N>` per image (a run of 2 × N placeholders is two images); text runs are decoded
  incrementally inside the text chunk between images.
  """
  ids = np.asarray(input_ids)
  mask = np.asarray(loss_mask, bool)
  is_img = ids == image_token_index
  out: List[Tuple[str, bool, str]] = []
  t, n = 0, ids.shape[0]
  while t < n:
    if is_img[t]:
      e = t
      while e < n and is_img[e]:
        e += 1
      length = e - t
      full, rest = divmod(length, num_image_tokens)
      text = f"<image×{num_image_tokens}>" * full + (f"<image×{rest}>" if rest else "")
      out.append(("image", bool(mask[t:e].any()), text))
      t = e
      continue
    c_end = t
    while c_end < n and not is_img[c_end]:
      c_end += 1
    chunk = ids[t:c_end]
    chunk_mask = mask[t:c_end]
    prev_text = ""
    s = 0
    while s < chunk.shape[0]:
      e = s
      while e < chunk.shape[0] and chunk_mask[e] == chunk_mask[s]:
        e += 1
      text = _decode(tokenizer, chunk[:e])
      out.append(("text", bool(chunk_mask[s]), text[len(prev_text):] if text.startswith(prev_text) else
                  _decode(tokenizer, chunk[s:e])))
      prev_text = text
      s = e
    t = c_end
  return out


def describe(input_ids, loss_mask, tokenizer, *, image_token_index: int, num_image_tokens: int,
             color: bool = False) -> Dict[str, object]:
  """→ {"text": decoded sequence, "supervised_text": [runs], "marked": text with supervised spans marked}."""
  runs = decoded_runs(input_ids, loss_mask, tokenizer, image_token_index=image_token_index,
                      num_image_tokens=num_image_tokens)
  on, off = (ANSI_ON, ANSI_OFF) if color else (MARK_ON, MARK_OFF)
  text = "".join(r[2] for r in runs)
  supervised, marked, current = [], [], None
  for kind, sup, piece in runs:
    if sup:
      current = (current or "") + piece
    else:
      if current is not None:
        supervised.append(current)
        marked.append(on + current + off)
        current = None
      marked.append(piece)
  if current is not None:
    supervised.append(current)
    marked.append(on + current + off)
  return {"text": text, "supervised_text": supervised, "marked": "".join(marked)}


def inspect_samples(source: Sequence[dict], tokenizer, template, *, num_image_tokens: int, image_token_index: int,
                    max_length: int, out_path: Optional[str] = None, limit: Optional[int] = 10,
                    image_root: Optional[str] = None, max_pixels: Optional[int] = None,
                    max_image_bytes: Optional[int] = None, max_images_per_sample: Optional[int] = 1,
                    check_images: bool = True, color: bool = False,
                    print_fn: Optional[Callable[[str], None]] = print) -> Dict[str, int]:
  """Encode, print and (if out_path) write the first `limit` samples of `source` (None = all).

  The decision is the training pipeline's own (`transforms.SampleRules.check`), so with the pipeline's options
  (max_length, max_images_per_sample, max_pixels, max_image_bytes, image_root) a sample is shown as used iff
  training uses it.
  image_root: folder of relative image paths (default: `source.image_root`).
  max_images_per_sample: as the pipeline's (samples with more images are 'too_long'); None: no limit.
  check_images: also open each image (reports missing / unreadable files as the pipeline would).
  Returns {"samples": encoded, reason: skipped count for each reason}.
  """
  if image_root is None:
    image_root = getattr(source, "image_root", None)
  rules = transforms_lib.SampleRules(tokenizer=tokenizer, template=template, num_image_tokens=num_image_tokens,
                                     image_token_index=image_token_index, max_length=max_length,
                                     max_images=max_images_per_sample, image_root=image_root,
                                     max_pixels=max_pixels, max_image_bytes=max_image_bytes)
  add_origin = transforms_lib.AddOrigin(getattr(source, "origins", None))
  counts = {"samples": 0, **{r: 0 for r in REASONS}}
  n = len(source) if limit is None else min(limit, len(source))
  out = None
  if out_path:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    out = open(out_path, "w", encoding="utf-8")
  try:
    for i in range(n):
      record = add_origin.map_with_index(i, source[i])
      sid = record.get("id", i) if isinstance(record, dict) else i
      try:
        enc, _ = rules.check(record, load_images=check_images)
      except SampleError as e:
        counts[e.reason] += 1
        line = {"id": sid, "origin": e.origin, "skip": e.reason, "error": str(e)}
        if print_fn is not None:
          print_fn(f"--- sample {sid!r}: SKIPPED [{e.reason}] {e}")
      else:
        counts["samples"] += 1
        d = describe(enc.input_ids, enc.loss_mask, tokenizer, image_token_index=image_token_index,
                     num_image_tokens=num_image_tokens, color=color)
        line = {"id": sid, "input_ids": [int(x) for x in enc.input_ids],
                "loss_mask": [int(x) for x in enc.loss_mask], "text": d["text"],
                "supervised_text": d["supervised_text"]}
        if print_fn is not None:
          print_fn(f"--- sample {sid!r}: {len(enc.input_ids)} tokens, {int(enc.loss_mask.sum())} supervised"
                   f"{', truncated' if enc.truncated else ''}\n{d['marked']}")
      if out is not None:
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
  finally:
    if out is not None:
      out.close()
  return counts
