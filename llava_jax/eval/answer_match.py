"""Teacher-forced answer matching: does greedy decoding reproduce each sample's supervised answer?

Under teacher forcing, if the argmax at every supervised position equals the target token, greedy decoding
from the prompt emits exactly that answer and its stop (each step sees the same prefix); if any position
differs, greedy decoding diverges there. So the per-sample exact-match of greedy generation is computed in
one forward pass per batch, with no decode loop.
"""
from __future__ import annotations

from typing import Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax import parallel
from llava_jax.config import LlavaConfig
from llava_jax.models.llava import LlavaModel


def _row_matches(config: LlavaConfig, params, batch: Mapping[str, jax.Array]):
  """[B] bool (all supervised next-token argmaxes right; rows without supervision are False), [B] int32 counts."""
  logits = LlavaModel(config).apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                                    positions=batch["positions"], segment_ids=batch["segment_ids"],
                                    image_valid=batch["image_valid"])
  preds = jnp.argmax(logits[:, :-1], axis=-1)
  targets = batch["input_ids"][:, 1:]
  supervised = batch["loss_mask"][:, 1:] & (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1])
  right = (preds == targets) | ~supervised
  return jnp.all(right, axis=-1) & jnp.any(supervised, axis=-1), jnp.sum(supervised, axis=-1)


_jitted = jax.jit(_row_matches, static_argnums=0)


def batch_answer_matches(config: LlavaConfig, params, batch: Mapping[str, np.ndarray], mesh=None) -> np.ndarray:
  """Per-row exact match [B] bool for a padded (not packed) batch from data.pipeline."""
  if mesh is None:
    return np.asarray(_jitted(config, params, dict(batch))[0])
  with parallel.mesh_context(mesh):
    matches = _jitted(config, params, dict(batch))[0]
  if not matches.is_fully_addressable:  # params spread over several processes' devices
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(matches, tiled=True))
  return np.asarray(matches)


def summarize(matches: Dict[str, list]) -> Dict[str, float]:
  """{kind: [bool, ...]} → {kind: accuracy, 'overall': accuracy, 'n': count}."""
  out = {k: float(np.mean(v)) for k, v in sorted(matches.items()) if v}
  every = [x for v in matches.values() for x in v]
  out["overall"] = float(np.mean(every)) if every else float("nan")
  out["n"] = len(every)
  return out
