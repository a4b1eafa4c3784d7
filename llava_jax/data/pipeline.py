"""The grain input pipeline: source records → fixed-shape, checkpointable per-host batches.

    source ─ map_with_index(AddOrigin: where each record is in its source, for skip logs / strict errors)
      ─ shuffle(seed; reseeded per epoch) ─ trim to a multiple of process_count ─ [process_index::count]
      ─ repeat(num_epochs) ─ map(EncodeSample)              (MapDataset: random access, index-deterministic)
      ─ to_iter_dataset (read threads) ─ mp_prefetch(worker_count)   (decode + resize / crop / pad to uint8
                                                                      pixels in worker processes)
      ─ BatchIterDataset                                   (main process: skip accounting, grouping, padding /
                                                            packing into fixed shapes, one vectorized CLIP
                                                            normalization per batch, see data/batching.py)

Workers ship uint8 pixels (150 kB per 224 px image, not 600 kB of float32) and the main process normalizes
each batch with a lookup table; batches hold CLIP-normalized float32 `pixel_values` equal to
`image.preprocess` per image. Batching stays in the main process: grain's `mp_prefetch` gives each worker a
slice (i::worker_count) of the elements, so batching there would make batch contents depend on worker_count
and scatter skip counts, `last_ids` and the open-batch state over the workers.

Determinism. Every stage before the batcher is a pure function of the element index and bad samples travel as
skip markers instead of being filtered, so the element stream — and hence every batch — is the same for any
worker_count. Same seed → same order; each epoch is shuffled differently (grain folds the epoch into the seed).

Sharding. Hosts shuffle with the same seed and each takes the slice process_index::process_count of the
shuffled epoch (trimmed to a multiple of process_count so all hosts see the same number of samples), so the
hosts read disjoint slices that together cover the epoch (minus < process_count samples). Hosts skip different
bad samples, so with a finite num_epochs they can run out a batch or two apart: multi-host training should use
num_epochs=None and a fixed number of steps.

Checkpointing. `get_state()` / `set_state()` on the returned iterator (a grain DatasetIterator; also orbax's
`save` / `load`). Samples waiting in an open batch are not serialized: the state holds the parent (grain) state
from before the oldest waiting sample was fetched, how many samples were fetched since, and which of them are
still waiting; `set_state` re-fetches those (a few samples: at most one open batch per modality), so a restored
iterator yields exactly the batches the original would have yielded next. The state is JSON-serializable.

Bad data. Each SampleError becomes a marker counted per reason in the main process (exact with any number of
workers, and restored with the state); `skip_counts()` returns {reason: count} for this host (sum them over
hosts for a global figure). Skips are logged at WARNING with the id, origin (where the record sits in its source:
"data.jsonl line 13", "index 7") and reason (the first 10 per reason, then every 1000th). `strict=True` raises
the SampleError naming the sample id, origin and reason instead. Reading an image never blocks and every OS or
decoding failure is a SampleError (data/image_file.py), so no path in the data can crash or hang a non-strict run.

Group by modality. Image samples and text-only samples fill separate batches (it also works when one modality
is absent). A group whose oldest sample has waited more than `max_group_wait` fetched samples is emitted early
(with empty rows), which bounds the work a restore has to redo.

Image slots. n_img = images_per_batch if given, else rows × max_images_per_sample (padding mode) or
rows × max(max_images_per_sample, max_length // num_image_tokens) (packing mode): an upper bound that never
limits a batch. A smaller images_per_batch saves vision compute in packing mode (the packer then closes a batch
when its image slots run out). Samples with more than max_images_per_sample images are skipped ('too_long').
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

import grain

from llava_jax.data import batching
from llava_jax.data import transforms as transforms_lib
from llava_jax.data.errors import REASONS

logger = logging.getLogger(__name__)

LOG_FIRST_SKIPS = 10
LOG_EVERY_SKIPS = 1000
# Arrays smaller than this travel from the worker processes pickled through grain's queue instead of one
# shared-memory segment each (grain's default is 0: every array, even a 2 kB input_ids, gets a segment to
# create, map and unlink). Measured on the bench data task: ~1 ms less CPU per sample, workers and main
# process together, with 150 kB uint8 images.
MIN_SHM_BYTES = 1 << 20


@dataclasses.dataclass
class _Entry:
  fetch: int  # index of the fetch that produced the element (relative to the last restore)
  state: Any  # parent state before that fetch
  element: dict


class _Group:
  """The open batch of one modality (or of everything without grouping)."""

  def __init__(self, spec: batching.BatchSpec):
    self.spec = spec
    self.reset()

  def reset(self):
    self.builder = batching.BatchBuilder(self.spec)
    self.entries: List[_Entry] = []

  @property
  def oldest(self) -> Optional[int]:
    return self.entries[0].fetch if self.entries else None


class BatchIterator(grain.DatasetIterator):
  """Per-host batches of fixed shapes (see data/batching.py) with exact skip accounting and resumable state.

  Extra public API: `skip_counts()`, `metrics()`, `samples_seen`, `batches_produced`, `last_ids` (the sample ids of
  the last batch, one list per row), `spec` (a BatchSpec: rows, image slots, buckets, normalization).
  """

  def __init__(self, parent: grain.DatasetIterator, *, spec: batching.BatchSpec, group_by_modality: bool,
               strict: bool, max_group_wait: Optional[int], epoch_length: int):
    super().__init__(parent)
    self.spec = spec
    self._group_by_modality = group_by_modality
    self._strict = strict
    self._max_group_wait = max_group_wait
    self._epoch_length = epoch_length
    self._groups: Dict[str, _Group] = {}
    self._fetched = 0
    self._counts = collections.Counter()
    self._consecutive_skips = 0
    self.samples_seen = 0
    self.batches_produced = 0
    self.last_ids: List[List[str]] = []

  # ------------------------------------------------------------------------------------------------ public

  def skip_counts(self) -> Dict[str, int]:
    """{reason: number of samples skipped for it} on this host, every reason of errors.REASONS listed."""
    return {r: int(self._counts.get(r, 0)) for r in REASONS}

  def metrics(self, prefix: str = "data/") -> Dict[str, int]:
    """Flat counters for the training log: samples and batches produced, skips per reason (this host)."""
    out = {f"{prefix}samples": int(self.samples_seen), f"{prefix}batches": int(self.batches_produced)}
    out.update({f"{prefix}skipped/{r}": n for r, n in self.skip_counts().items()})
    return out

  def __next__(self) -> Dict[str, np.ndarray]:
    self._assert_not_closed()
    while True:
      for g in self._groups.values():
        if g.entries and g.builder.full:
          return self._emit(g)
      if self._max_group_wait is not None:
        for g in self._by_age():
          if self._fetched - g.oldest > self._max_group_wait:
            return self._emit(g)
      state_before = self._parent.get_state()
      try:
        element = next(self._parent)
      except StopIteration:
        waiting = self._by_age()
        if waiting:
          return self._emit(waiting[0])
        raise
      fetch = self._fetched
      self._fetched += 1
      if transforms_lib.is_skip(element):
        self._on_skip(element)
        continue
      self._consecutive_skips = 0
      self.samples_seen += 1
      batch = self._place(_Entry(fetch, state_before, element))
      if batch is not None:
        return batch

  def get_state(self) -> Dict[str, Any]:
    entries = [e for g in self._groups.values() for e in g.entries]
    if entries:
      anchor = min(entries, key=lambda e: e.fetch)
      parent = anchor.state
      replay = self._fetched - anchor.fetch
      keep = sorted(e.fetch - anchor.fetch for e in entries)
    else:
      parent, replay, keep = self._parent.get_state(), 0, []
    return {"parent": copy.deepcopy(parent), "replay": int(replay), "keep": [int(k) for k in keep],
            "skip_counts": {r: int(n) for r, n in self._counts.items()},
            "consecutive_skips": int(self._consecutive_skips), "samples_seen": int(self.samples_seen),
            "batches_produced": int(self.batches_produced)}

  def set_state(self, state: Dict[str, Any]) -> None:
    self._parent.set_state(copy.deepcopy(state["parent"]))
    self._groups = {}
    self._fetched = 0
    keep = set(int(k) for k in state["keep"])
    for offset in range(int(state["replay"])):
      before = self._parent.get_state() if offset in keep else None
      try:
        element = next(self._parent)
      except StopIteration:
        raise ValueError("cannot restore the pipeline state: the data ended while re-reading the samples of "
                         "the open batch (was the state saved with a different source or options?)") from None
      self._fetched += 1
      if offset in keep:
        if transforms_lib.is_skip(element):
          raise ValueError("cannot restore the pipeline state: a waiting sample is now a skipped one "
                           "(different source or options?)")
        if self._place(_Entry(offset, before, element)) is not None:
          raise ValueError("cannot restore the pipeline state: the waiting samples no longer form one open "
                           "batch (different options?)")
    self._counts = collections.Counter({r: int(n) for r, n in state["skip_counts"].items()})
    self._consecutive_skips = int(state["consecutive_skips"])
    self.samples_seen = int(state["samples_seen"])
    self.batches_produced = int(state["batches_produced"])

  def __str__(self) -> str:
    return (f"BatchIterator(rows={self.spec.rows}, packing={self.spec.packing}, "
            f"group_by_modality={self._group_by_modality})")

  # ----------------------------------------------------------------------------------------------- private

  def _group(self, element: dict) -> _Group:
    key = ("image" if element["pixels"].shape[0] else "text") if self._group_by_modality else "all"
    if key not in self._groups:
      self._groups[key] = _Group(self.spec)
    return self._groups[key]

  def _by_age(self) -> List[_Group]:
    return sorted((g for g in self._groups.values() if g.entries), key=lambda g: g.oldest)

  def _place(self, entry: _Entry) -> Optional[Dict[str, np.ndarray]]:
    """Add to the open batch of its group. A sample that does not fit closes that batch (returned) and opens
    the next one; a batch that becomes full is emitted by the next loop turn (at most one batch per call)."""
    g = self._group(entry.element)
    batch = None
    if not g.builder.add(entry.element):
      if not g.entries:
        self._raise_unfit(entry.element)
      batch = self._emit(g)
      if not g.builder.add(entry.element):
        self._raise_unfit(entry.element)
    g.entries.append(entry)
    return batch

  def _raise_unfit(self, element: dict):
    raise ValueError(f"sample {element['id']!r} ({element['input_ids'].shape[0]} tokens, "
                     f"{element['pixels'].shape[0]} images) does not fit an empty batch of {self.spec}")

  def _emit(self, g: _Group) -> Dict[str, np.ndarray]:
    batch = g.builder.assemble()
    self.last_ids = [[x["id"] for x in row] for row in g.builder.rows]
    g.reset()
    self.batches_produced += 1
    return batch

  def _on_skip(self, element: dict) -> None:
    if self._strict:
      raise transforms_lib.skip_to_error(element)
    reason = element["skip"]
    self._counts[reason] += 1
    n = self._counts[reason]
    if n <= LOG_FIRST_SKIPS or n % LOG_EVERY_SKIPS == 0:
      origin = element.get("origin")
      logger.warning("skipping sample %r%s [%s] (%d skipped for this reason so far%s): %s", element["id"],
                     f" ({origin})" if origin else "", reason, n,
                     "; logging every 1000th from now" if n == LOG_FIRST_SKIPS else "", element["message"])
    self._consecutive_skips += 1
    if self._epoch_length and self._consecutive_skips >= self._epoch_length:
      raise RuntimeError(f"every one of the last {self._consecutive_skips} samples (a whole epoch of this host's "
                         f"shard) was skipped: {self.skip_counts()}; check the data paths and options")


class BatchIterDataset(grain.IterDataset):
  """IterDataset of per-host batches over an IterDataset of encoded samples / skip markers."""

  def __init__(self, parent: grain.IterDataset, *, spec: batching.BatchSpec, group_by_modality: bool = False,
               strict: bool = False, max_group_wait: Optional[int] = None, epoch_length: int = 0):
    super().__init__(parent)
    self.spec = spec
    self._kw = dict(spec=spec, group_by_modality=group_by_modality, strict=strict,
                    max_group_wait=max_group_wait, epoch_length=epoch_length)

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self._parent.__iter__(), **self._kw)

  def __str__(self) -> str:
    return f"BatchIterDataset(rows={self.spec.rows}, packing={self.spec.packing})"


def _mark_flags_parsed():
  """grain's worker processes read absl flags; outside absl.app they must be marked parsed."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(source: Sequence[dict], *, tokenizer, template, image_size: int, num_image_tokens: int,
                 image_token_index: int, max_length: int, global_batch_size: int, aspect_ratio: str = "square",
                 seed: int = 0, shuffle: bool = True, num_epochs: Optional[int] = None, worker_count: int = 0,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 bucket_lengths: Optional[Sequence[int]] = None, packing: bool = False,
                 images_per_batch: Optional[int] = None, max_images_per_sample: int = 1,
                 group_by_modality: bool = False, max_group_wait: Optional[int] = None, strict: bool = False,
                 image_root: Optional[str] = None, max_pixels: Optional[int] = None,
                 max_image_bytes: Optional[int] = None, pad_id: Optional[int] = None,
                 read_threads: int = 2, read_buffer_size: Optional[int] = None,
                 worker_buffer_size: int = 2) -> BatchIterDataset:
  """The pipeline as a grain IterDataset (`iter()` it for a BatchIterator); see `make_pipeline`."""
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
  rows = global_batch_size // process_count
  if max_images_per_sample < 0:
    raise ValueError(f"max_images_per_sample must be >= 0, got {max_images_per_sample}")
  if images_per_batch is None:
    per_row = max_images_per_sample
    if packing:
      per_row = max(per_row, max_length // max(1, num_image_tokens))
    images_per_batch = rows * per_row
  if max_images_per_sample > images_per_batch:
    raise ValueError(f"max_images_per_sample={max_images_per_sample} > images_per_batch={images_per_batch}")
  if image_root is None:
    image_root = getattr(source, "image_root", None)
  if pad_id is None:
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
  spec = batching.BatchSpec(rows=rows, image_slots=int(images_per_batch), image_size=int(image_size),
                            max_length=int(max_length), buckets=batching.normalize_buckets(bucket_lengths, max_length),
                            packing=bool(packing), pad_id=int(pad_id))
  if group_by_modality and max_group_wait is None:
    max_group_wait = 32 * rows

  n = len(source)
  per_host = n // process_count
  if per_host == 0:
    raise ValueError(f"a source of {n} samples cannot be split over {process_count} processes")
  ds = grain.MapDataset.source(source)
  ds = ds.map_with_index(transforms_lib.AddOrigin(getattr(source, "origins", None)))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds[:per_host * process_count][process_index::process_count]
  ds = ds.repeat(num_epochs)
  ds = ds.map(transforms_lib.EncodeSample(
      tokenizer=tokenizer, template=template, image_size=image_size, aspect_ratio=aspect_ratio,
      num_image_tokens=num_image_tokens, image_token_index=image_token_index, max_length=max_length,
      image_root=image_root, max_pixels=max_pixels, max_images=max_images_per_sample,
      max_image_bytes=max_image_bytes))
  if read_buffer_size is None:
    read_buffer_size = max(2, 2 * rows)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer_size))
  if worker_count > 0:
    _mark_flags_parsed()
    it = grain.experimental.WithOptionsIterDataset(it, grain.experimental.DatasetOptions(min_shm_size=MIN_SHM_BYTES))
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=worker_buffer_size))
  return BatchIterDataset(it, spec=spec, group_by_modality=group_by_modality, strict=strict,
                          max_group_wait=max_group_wait, epoch_length=per_host)


def make_pipeline(source: Sequence[dict], **kwargs) -> BatchIterator:
  """A checkpointable iterator of per-host batches of fixed shapes (numpy; see data/batching.py).

  source: random access (len + __getitem__) records `{"id", "conversations", "image" | "images", "meta"}`.
  tokenizer, template (name or Template): how conversations become tokens (data/tokenize.py).
  image_size, aspect_ratio ('square' | 'pad'), max_pixels, max_image_bytes, image_root (default:
    `source.image_root`): image loading and CLIP preprocessing (None limits: data/image.py's defaults).
  num_image_tokens, image_token_index: placeholders per image and their id.
  max_length: longest sequence (image placeholders included); longer samples are truncated or skipped.
  global_batch_size: rows over all hosts; each host yields global_batch_size / process_count rows.
  seed, shuffle, num_epochs (None = forever): order.
  worker_count: decode + preprocess in that many processes (0 = threads of this process).
  process_index, process_count: this host's shard (default: jax.process_index() / process_count()).
  bucket_lengths: padding-mode row lengths (default quarter / half / full max_length); max_length always added.
  packing: several samples per row (T = max_length) with segment_ids and per-segment positions.
  images_per_batch, max_images_per_sample: image slots per batch and images per sample (see module doc).
  group_by_modality, max_group_wait (default 32 × rows fetched samples): separate image and text-only batches.
  strict: raise on the first bad sample (a SampleError naming its id, origin and reason) instead of skipping it.
  pad_id: token id on padding (default: tokenizer.pad_token_id, else 0 as LLaVA's unk).
  read_threads, read_buffer_size, worker_buffer_size: grain ReadOptions / MultiprocessingOptions.
  """
  return iter(make_dataset(source, **kwargs))
