"""Fixed-shape batches from encoded samples: padding to bucket lengths, or packing several samples per row.

A batch is a dict of numpy arrays whose shapes depend only on the options (and, in padding mode, on which
bucket the longest row needs), so a jitted train step compiles once per bucket:

  input_ids    int32   [b, T]   token ids; `pad_id` on padding
  loss_mask    bool    [b, T]   True where token t is a loss target (predicted from t-1); False on padding and
                                on the first token of every segment (so packing never supervises a token from
                                the previous sample)
  segment_ids  int32   [b, T]   0 = padding; 1, 2, ... = the samples of the row, left to right
  positions    int32   [b, T]   0, 1, ... restarting at every segment; 0 on padding
  pixel_values float32 [n_img, S, S, 3]  the CLIP-normalized images of the batch in the row-major order of their
                                placeholder runs (row 0's first), then zero padding slots
  image_valid  bool    [n_img]  True on real images (they come first)

Samples carry their images as uint8 `pixels [k, S, S, 3]` (resized / cropped / padded, see data/transforms.py);
`assemble` gathers them into one uint8 array and normalizes the real slots once per batch
(`image.normalize_batch`, bit-identical to `image.preprocess` per image); padding slots stay 0.0.

Padding mode: one sample per row, T = the smallest bucket length that holds the longest row.
Packing mode: T = max_length; a sample goes to the FIRST row of the open batch with room for it (first-fit);
the batch closes when a sample fits in no row (or would exceed the image slots), and that sample opens the
next batch. Rows never split a sample.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from llava_jax.data import image as image_lib


def default_buckets(max_length: int) -> Tuple[int, ...]:
  """Quarter, half and full max_length, rounded up to a multiple of 64 (capped at max_length)."""
  out = {max_length}
  for frac in (4, 2):
    n = -(-max_length // frac)
    n = min(max_length, -(-n // 64) * 64)
    out.add(n)
  return tuple(sorted(out))


def normalize_buckets(bucket_lengths: Optional[Sequence[int]], max_length: int) -> Tuple[int, ...]:
  """Sorted unique bucket lengths ≤ max_length, always ending with max_length (every sample fits one)."""
  if bucket_lengths is None:
    return default_buckets(max_length)
  buckets = sorted({int(n) for n in bucket_lengths if 0 < int(n) <= max_length})
  if not buckets or buckets[-1] != max_length:
    buckets.append(max_length)
  return tuple(buckets)


TOKEN_PAD = {"input_ids": None, "loss_mask": False, "segment_ids": 0, "positions": 0, "attention_mask": 0}


def pad_to_length(batch: Dict[str, np.ndarray], length: int, pad_id: int) -> Dict[str, np.ndarray]:
  """The batch with every token array ([b, T]: input_ids, loss_mask, segment_ids, positions, attention_mask)
  right-padded to [b, length] as `assemble` pads (pad_id / False / 0); images untouched. T > length raises."""
  t = int(batch["input_ids"].shape[1])
  if t > length:
    raise ValueError(f"cannot pad a batch of {t} tokens per row to {length}")
  if t == length:
    return batch
  out = dict(batch)
  for name, fill in TOKEN_PAD.items():
    if name in batch and batch[name] is not None:
      x = np.asarray(batch[name])
      out[name] = np.pad(x, ((0, 0), (0, length - t)), constant_values=pad_id if fill is None else fill)
  return out


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket ≥ length."""
  for n in buckets:
    if length <= n:
      return n
  raise ValueError(f"a row of {length} tokens exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Shapes of the batches one host produces.

  rows: b, rows per host batch (global_batch_size / process_count).
  image_slots: n_img, image slots per batch.
  image_size: S (pixels per side).
  max_length: longest row (T in packing mode, the last bucket in padding mode).
  buckets: padding-mode row lengths (ascending, last = max_length).
  packing: pack several samples per row.
  pad_id: the id written on padding tokens.
  image_mean, image_std: the normalization applied to the batch's uint8 pixels (CLIP's by default).
  """
  rows: int
  image_slots: int
  image_size: int
  max_length: int
  buckets: Tuple[int, ...]
  packing: bool = False
  pad_id: int = 0
  image_mean: Tuple[float, ...] = image_lib.CLIP_MEAN
  image_std: Tuple[float, ...] = image_lib.CLIP_STD

  def __post_init__(self):
    if self.rows < 1:
      raise ValueError(f"rows per batch must be >= 1, got {self.rows}")
    if self.image_slots < 0:
      raise ValueError(f"image_slots must be >= 0, got {self.image_slots}")
    if not self.buckets or self.buckets[-1] != self.max_length:
      raise ValueError(f"buckets {self.buckets} must end with max_length={self.max_length}")


class BatchBuilder:
  """An open batch: samples are offered one by one; `add` says whether the sample was taken.

  Samples are dicts with `input_ids` int32 [t], `loss_mask` bool [t], `pixels` uint8 [k, S, S, 3]
  (k = number of images, in placeholder order; not yet normalized).
  """

  def __init__(self, spec: BatchSpec):
    self.spec = spec
    self.rows: List[List[dict]] = []  # padding mode: one sample per row
    self.row_lengths: List[int] = []
    self.num_images = 0

  def __len__(self) -> int:
    """Number of samples held."""
    return sum(len(r) for r in self.rows)

  @property
  def full(self) -> bool:
    """No further sample can be taken (padding mode: all rows used; packing: all rows exactly full)."""
    s = self.spec
    if len(self.rows) < s.rows:
      return False
    return not s.packing or all(n >= s.max_length for n in self.row_lengths)

  def add(self, sample: dict) -> bool:
    """Take `sample` if it fits (a row with room and enough free image slots); False leaves the batch as is."""
    s = self.spec
    n = int(sample["input_ids"].shape[0])
    k = int(sample["pixels"].shape[0])
    if n > s.max_length:
      raise ValueError(f"sample of {n} tokens > max_length={s.max_length} (the encoder truncates to it)")
    if self.num_images + k > s.image_slots:
      return False
    if s.packing:
      for r, used in enumerate(self.row_lengths):
        if used + n <= s.max_length:
          self.rows[r].append(sample)
          self.row_lengths[r] += n
          self.num_images += k
          return True
    if len(self.rows) < s.rows:
      self.rows.append([sample])
      self.row_lengths.append(n)
      self.num_images += k
      return True
    return False

  def assemble(self) -> Dict[str, np.ndarray]:
    """The batch as fixed-shape numpy arrays (see the module doc); empty rows are all padding."""
    return assemble(self.rows, self.spec)


def assemble(rows: Sequence[Sequence[dict]], spec: BatchSpec) -> Dict[str, np.ndarray]:
  """rows (≤ spec.rows lists of samples) → the batch dict of numpy arrays (see the module doc)."""
  b, s = spec.rows, spec.image_size
  lengths = [sum(int(x["input_ids"].shape[0]) for x in row) for row in rows]
  if len(rows) > b:
    raise ValueError(f"{len(rows)} rows > {b} rows per batch")
  t = spec.max_length if spec.packing else pick_bucket(max(lengths, default=1), spec.buckets)
  input_ids = np.full((b, t), spec.pad_id, np.int32)
  loss_mask = np.zeros((b, t), np.bool_)
  segment_ids = np.zeros((b, t), np.int32)
  positions = np.zeros((b, t), np.int32)
  pixels = np.zeros((spec.image_slots, s, s, 3), np.uint8)
  image_valid = np.zeros((spec.image_slots,), np.bool_)
  img = 0
  for r, row in enumerate(rows):
    if lengths[r] > t:
      raise ValueError(f"row {r} holds {lengths[r]} tokens > {t}")
    start = 0
    for seg, x in enumerate(row, start=1):
      n = int(x["input_ids"].shape[0])
      input_ids[r, start:start + n] = x["input_ids"]
      loss_mask[r, start:start + n] = x["loss_mask"]
      loss_mask[r, start] = False  # a segment's first token is never predicted from inside it
      segment_ids[r, start:start + n] = seg
      positions[r, start:start + n] = np.arange(n, dtype=np.int32)
      pix = x["pixels"]
      k = int(pix.shape[0])
      if k:
        if img + k > spec.image_slots:
          raise ValueError(f"batch holds more than {spec.image_slots} images")
        if pix.shape[1:] != (s, s, 3):
          raise ValueError(f"image of shape {pix.shape[1:]} in a batch of {s}x{s} images")
        if pix.dtype != np.uint8:
          raise ValueError(f"sample pixels must be uint8 (resized, not yet normalized), got {pix.dtype}")
        pixels[img:img + k] = pix
        image_valid[img:img + k] = True
        img += k
      start += n
  pixel_values = np.zeros((spec.image_slots, s, s, 3), np.float32)
  image_lib.normalize_batch(pixels[:img], spec.image_mean, spec.image_std, out=pixel_values[:img])
  return {"input_ids": input_ids, "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions,
          "pixel_values": pixel_values, "image_valid": image_valid}
