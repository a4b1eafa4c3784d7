"""Per-host batches of one global shape: in padding mode each process picks its bucket from its own rows, so
before a step the processes agree on the longest (a tiny all-gather of one int) and pad to it.

The pipeline gives process h the samples h::P of the shared shuffled epoch, so the P host batches of step i
together hold exactly the rows the single-process batch i holds: the agreed length is the bucket one process
would pick on the same data (no padding beyond it). Packing (T = max_length) and a single bucket need no
agreement.
"""
from __future__ import annotations

from typing import Dict

import jax
import numpy as np

from llava_jax.data.batching import BatchSpec, pad_to_length


def needs_agreement(spec: BatchSpec) -> bool:
  """Whether hosts' batches can differ in length: several processes, padding mode, several buckets."""
  return jax.process_count() > 1 and not spec.packing and len(spec.buckets) > 1


def global_length(local_length: int) -> int:
  """The longest of every process's `local_length` (a collective: every process calls it at each step)."""
  from jax.experimental import multihost_utils
  lengths = multihost_utils.process_allgather(np.array([local_length], np.int32))
  return int(np.max(np.asarray(lengths)))


def agree_on_length(batch: Dict[str, np.ndarray], spec: BatchSpec) -> Dict[str, np.ndarray]:
  """This host's batch padded to the length every host's batch gets this step (unchanged when no agreement is
  needed, see `needs_agreement`)."""
  if not needs_agreement(spec):
    return batch
  return pad_to_length(batch, global_length(int(batch["input_ids"].shape[1])), spec.pad_id)
