"""Next-token choice: greedy, or sampling after temperature → top-k → top-p, the order and rules of
transformers' `generate` (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper).

Every parameter is a per-row array [B] (traced, so changing it never recompiles and one batch can mix
requests with different settings):
  temperature 0 → greedy (argmax of the raw logits, first index on ties, as HF's do_sample=False);
  top_k 0 → off; otherwise tokens scoring below the k-th largest are removed (ties with it are kept);
  top_p 1 → off; otherwise HF's rule: sort ascending, softmax, cumulative sum, remove the tokens whose
    cumulative probability is ≤ 1 - top_p, never the most likely one — i.e. keep the smallest set of
    most likely tokens whose probability reaches top_p, the token that crosses it included.
Random draws: row r at generation step i uses `fold_in(row_key[r], i)`, so a row's samples depend only on
its own key, never on the other rows of the batch or on how the steps were chunked.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _per_row(x, b: int, dtype) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(x, dtype), (b,))


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """logits [B, V] float → temperature-scaled logits with the removed tokens at -inf, [B, V] float32.

  temperature [B] (> 0 where used; rows with 0 are scaled by 1), top_k [B] int (0 = off),
  top_p [B] float in [0, 1] (1 = off). Scalars broadcast.
  """
  b, v = logits.shape
  temperature = _per_row(temperature, b, jnp.float32)
  top_k = _per_row(top_k, b, jnp.int32)
  top_p = _per_row(top_p, b, jnp.float32)
  neg_inf = jnp.float32(-jnp.inf)
  scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]

  order = jnp.argsort(scaled, axis=-1)  # ascending, as HF's top-p sort
  ascending = jnp.take_along_axis(scaled, order, axis=-1)
  # top-k: threshold = k-th largest value (k clipped to [1, V]); ties with it survive
  k = jnp.clip(top_k, 1, v)
  kth = jnp.take_along_axis(ascending, (v - k)[:, None], axis=-1)
  ascending = jnp.where((top_k > 0)[:, None] & (ascending < kth), neg_inf, ascending)
  # top-p on the top-k-filtered scores (sorting order is unchanged by the filter)
  cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
  remove = (cumulative <= (1.0 - top_p)[:, None]) & (top_p < 1.0)[:, None]
  remove = remove.at[:, -1].set(False)
  ascending = jnp.where(remove, neg_inf, ascending)
  rows = jnp.arange(b)[:, None]
  return jnp.zeros_like(scaled).at[rows, order].set(ascending)


def make_row_keys(seeds: jax.Array, salts: jax.Array) -> jax.Array:
  """Base key of each row, as raw key data [B, ...] uint32: fold_in(key(seeds[r]), salts[r])."""
  keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, salts)
  return jax.random.key_data(keys)


def step_keys(row_key_data: jax.Array, step) -> jax.Array:
  """Typed keys [B] for generation step `step`: fold_in(row key, step)."""
  keys = jax.random.wrap_key_data(row_key_data)
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)


def choose_tokens(logits: jax.Array, row_key_data: jax.Array, step, temperature, top_k, top_p) -> jax.Array:
  """logits [B, V] → next tokens [B] int32: greedy where temperature == 0, else a seeded sample from
  `filter_logits`. row_key_data [B, ...] from `make_row_keys`; step: int scalar (generation step)."""
  b = logits.shape[0]
  temperature = _per_row(temperature, b, jnp.float32)
  top_k = _per_row(top_k, b, jnp.int32)
  top_p = _per_row(top_p, b, jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  # Only pay for what some row uses: the vocabulary sort of top-k / top-p costs more than a whole decode
  # step of a small model on CPU (bench/README.md), and greedy batches need no sampling at all.
  def sample(_):
    sampling = temperature > 0
    needs_filter = jnp.any(sampling & ((top_k > 0) | (top_p < 1.0)))
    scaled = lambda: logits.astype(jnp.float32) / jnp.where(sampling, temperature, 1.0)[:, None]
    filtered = jax.lax.cond(needs_filter, lambda: filter_logits(logits, temperature, top_k, top_p), scaled)
    sampled = jax.vmap(lambda k, l: jax.random.categorical(k, l))(step_keys(row_key_data, step), filtered)
    return jnp.where(sampling, sampled.astype(jnp.int32), greedy)

  return jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)
