"""The loss head: labels, token-weighted cross-entropy and where its logits are computed.

Labels. Position t predicts input_ids[t+1]; it is supervised iff loss_mask[t+1] (the data pipeline marks the
tokens that are answers), t+1 is in the same non-padding segment as t (packed rows never predict across
samples), and input_ids[t+1] is an in-vocabulary, non-image-placeholder id. The last position predicts nothing.
This is HF's `ForCausalLMLoss` with labels = where(loss_mask, input_ids, -100).

Where logits are computed (`loss_head`). The lm_head and CE run only where a target can be: each row's
supervised positions (weights true), in order, are gathered into a static budget of `cap` positions per row
(`loss_row_budget`: T minus one row's share K·⌊N/B⌋ of the image placeholders — never targets — rounded up to a
multiple of 8), giving [b, cap, D] with the row axis still the batch-sharded one; unused budget slots read the
last position, whose weight is always 0. The count is data dependent, so per micro-batch a `lax.cond` checks that
no row has more than `cap` supervised positions and otherwise computes all b·T positions: the result is exact
for any batch (e.g. a long text-only row beside image rows). Text-only batches (no pixel_values) and budgets
≥ T compile no branch and compute all positions. The gradient of Σ CE with respect to the hidden states and the
head's parameters is formed in the same forward pass from the logits already in hand (d logits = softmax −
onehot; a `jax.custom_vjp`), so autodiff never differentiates the cond, whose residuals would otherwise include
the full branch's [b, T, V] logits even when the compact branch runs; a frozen head (stage 1) skips its matmul.
Metric `logit_positions` = the positions whose logits were actually computed (b·cap or b·T per micro-batch).

Chunked loss (`chunked_loss` > 0): the loss head works through its positions in blocks of that many positions
(accumulating the head's gradient in float32), so only one block's [b, chunk, V] float32 logits exist at a time.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llava_jax import parallel

DEFAULT_LOSS_CHUNK = 512
LOSS_ROW_MULTIPLE = 8


# ---------------------------------------------------------------------------------------------------------
# Labels and per-token statistics


def next_token_targets(input_ids: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array, vocab_size: int,
                       image_token_index: Optional[int] = None):
  """(targets [B, T] int32, weights [B, T] bool): position t predicts input_ids[t+1] (see module doc).

  weights[:, -1] is always False (the last position predicts nothing): the loss head uses it as filler."""
  nxt = input_ids[:, 1:]
  w = loss_mask[:, 1:].astype(bool) & (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
  w = w & (nxt >= 0) & (nxt < vocab_size)
  if image_token_index is not None:
    w = w & (nxt != image_token_index)
  targets = jnp.pad(jnp.clip(nxt, 0, vocab_size - 1).astype(jnp.int32), ((0, 0), (0, 1)))
  weights = jnp.pad(w, ((0, 0), (0, 1)))
  return targets, weights


def _ce_parts(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """logits [..., V] → (Σ CE, Σ correct, exp(logits − max) [..., V], their sum [...]) in float32.

  One max over V serves both logsumexp (computed here from it) and accuracy: a token is correct iff its target
  logit reaches the max. That equals `argmax == target` except on exact ties for the max, where argmax picks
  the first index and this rule counts the target as correct whichever tied index it is.
  """
  logits = logits.astype(jnp.float32)
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  e = jnp.exp(logits - m[..., None])
  s = jnp.sum(e, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  w = weights.astype(jnp.float32)
  ce_sum = jnp.sum((m + jnp.log(s) - target_logit) * w)
  correct = jnp.sum((target_logit >= m).astype(jnp.float32) * w)
  return ce_sum, correct, e, s


def token_stats(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """logits [..., V] → (Σ CE, Σ correct) over weighted tokens as float32 scalars (correct: the target logit is
  the max, see `_ce_parts`)."""
  ce_sum, correct, _, _ = _ce_parts(logits, targets, weights)
  return ce_sum, correct


def chunk_length(chunked_loss: Union[bool, int]) -> int:
  if chunked_loss is True:
    return DEFAULT_LOSS_CHUNK
  if not chunked_loss:
    return 0
  if int(chunked_loss) < 1:
    raise ValueError(f"chunked_loss={chunked_loss}: give a chunk length ≥ 1, True ({DEFAULT_LOSS_CHUNK}) or 0")
  return int(chunked_loss)


def loss_row_budget(length: int, num_image_slots: int, rows: int, tokens_per_image: int,
                    multiple: int = LOSS_ROW_MULTIPLE) -> int:
  """Static number of positions per row the loss head computes logits for (`cap_row`), in [1, length].

  length − tokens_per_image · ⌊num_image_slots / rows⌋ (the positions left once every row holds its share of the
  image placeholders, which are never targets), at least 1, rounded up to `multiple`, at most length (= no
  compaction, e.g. when there are fewer image slots than rows). The budget only decides speed: a micro-batch
  with a row of more supervised tokens falls back to all positions (see `loss_head`).
  """
  per_row = num_image_slots // rows if rows else 0
  cap = max(length - tokens_per_image * per_row, 1)
  return int(min(-(-cap // multiple) * multiple, length))


# ---------------------------------------------------------------------------------------------------------
# The loss head: logits + CE + accuracy at the supervised positions, gradients formed in the forward pass


def _head_block(logits_fn, head, h, tg, w, grads: bool, head_grad: bool):
  """One block of positions h [b, n, D] → (Σ CE, Σ correct) and, with `grads`, the gradients of Σ CE
  (d_head (None unless head_grad), d_h [b, n, D]). d logits = (softmax − onehot(target)) · weight."""
  if not grads:
    return token_stats(logits_fn(head, h), tg, w)
  if head_grad:
    logits, pull = jax.vjp(logits_fn, head, h)
  else:
    logits, pull_h = jax.vjp(lambda x: logits_fn(head, x), h)
    pull = lambda g: (None,) + tuple(pull_h(g))
  ce, corr, e, s = _ce_parts(logits, tg, w)
  probs = e / s[..., None]
  hit = jnp.arange(logits.shape[-1], dtype=jnp.int32) == tg[..., None]
  dlogits = jnp.where(hit, probs - 1.0, probs) * w.astype(jnp.float32)[..., None]
  d_head, d_h = pull(dlogits.astype(logits.dtype))
  return ce, corr, d_head, d_h


def _positions_stats(logits_fn, head, h, tg, w, chunk: int, grads: bool, head_grad: bool):
  """`_head_block` over all positions of h [b, n, D], in blocks of `chunk` positions when 0 < chunk < n (one
  block's [b, chunk, V] logits exist at a time; the gradient of the head is summed in float32)."""
  b, n, d = h.shape
  if not chunk or chunk >= n:
    return _head_block(logits_fn, head, h, tg, w, grads, head_grad)
  nb = -(-n // chunk)
  pad = nb * chunk - n
  if pad:  # padded positions carry weight 0
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    tg, w = jnp.pad(tg, ((0, 0), (0, pad))), jnp.pad(w, ((0, 0), (0, pad)))
  split = lambda x: jnp.moveaxis(x.reshape(b, nb, chunk, *x.shape[2:]), 1, 0)
  zero = jnp.zeros((), jnp.float32)
  if not grads:
    def body(carry, xs):
      ce, corr = _head_block(logits_fn, head, *xs, False, False)
      return (carry[0] + ce, carry[1] + corr), None
    (ce, corr), _ = jax.lax.scan(body, (zero, zero), (split(h), split(tg), split(w)))
    return ce, corr

  def body(carry, xs):
    ce_acc, corr_acc, dh_acc = carry
    ce, corr, d_head, d_h = _head_block(logits_fn, head, *xs, True, head_grad)
    if head_grad:
      dh_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), dh_acc, d_head)
    return (ce_acc + ce, corr_acc + corr, dh_acc), d_h

  dh0 = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), head) if head_grad else None
  (ce, corr, d_head), d_h = jax.lax.scan(body, (zero, zero, dh0), (split(h), split(tg), split(w)))
  d_h = jnp.moveaxis(d_h, 0, 1).reshape(b, nb * chunk, d)[:, :n]
  if head_grad:
    d_head = jax.tree.map(lambda g, x: g.astype(x.dtype), d_head, head)
  return ce, corr, d_head, d_h


def _loss_head_impl(logits_fn, head, hidden, targets, weights, cap: int, chunk: int, grads: bool,
                    head_grad: bool):
  """(Σ CE, Σ correct, logit positions computed[, d_head, d_hidden]) for hidden [b, T, D].

  cap < T: `lax.cond` on (max supervised positions per row ≤ cap): the supervised positions of each row, in
  order, are gathered into [b, cap, D] (the rest of the budget reads position T−1, whose weight is always 0),
  else every position is computed. cap ≥ T: every position, no branch."""
  b, t, _ = hidden.shape
  f32 = lambda x: jnp.asarray(x, jnp.float32)

  def full(head, hidden, targets, weights):
    out = _positions_stats(logits_fn, head, hidden, targets, weights, chunk, grads, head_grad)
    return (*out[:2], f32(b * t), *out[2:])

  if cap >= t:
    return full(head, hidden, targets, weights)

  def compact(head, hidden, targets, weights):
    idx = jax.vmap(lambda w: jnp.nonzero(w, size=cap, fill_value=t - 1)[0])(weights).astype(jnp.int32)
    take = jax.vmap(lambda row, i: row[i])  # per row: [T, ...] gathered at [cap] → [cap, ...]
    h_sel = jax.lax.with_sharding_constraint(take(hidden, idx), P(parallel.BATCH_AXES))
    out = _positions_stats(logits_fn, head, h_sel, take(targets, idx), take(weights, idx), chunk, grads,
                           head_grad)
    out = (*out[:2], f32(b * cap), *out[2:])
    if not grads:
      return out
    d_sel = out[-1]
    d_h = jax.vmap(lambda z, i, g: z.at[i].add(g))(jnp.zeros_like(hidden), idx, d_sel)
    return (*out[:-1], jax.lax.with_sharding_constraint(d_h, P(parallel.BATCH_AXES)))

  fits = jnp.max(jnp.sum(weights.astype(jnp.int32), axis=1)) <= cap
  return jax.lax.cond(fits, compact, full, head, hidden, targets, weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6, 7))
def loss_head(logits_fn: Callable, head, hidden: jax.Array, targets: jax.Array, weights: jax.Array, cap: int,
              chunk: int, head_grad: bool):
  """lm_head + CE + accuracy at the supervised positions of one micro-batch → (Σ CE, Σ correct, positions).

  logits_fn(head, h [b, n, D]) → logits [b, n, V] float32; head: the parameters it reads; hidden [b, T, D]
  final-normed decoder states; targets / weights [b, T] (`next_token_targets`); cap: positions per row
  (`loss_row_budget`; ≥ T = all positions); chunk: positions per block of logits (0 = one block);
  head_grad: whether the gradient with respect to `head` is needed (False: frozen head, its matmul is skipped).
  positions = b·cap or b·T, the logit rows actually computed (float32; for honest FLOP counts).

  Differentiable in head and hidden for Σ CE (Σ correct and positions have no gradient). The gradient is formed
  in the forward pass from the logits it already holds (d logits = softmax − onehot), so autodiff never
  differentiates the `lax.cond`: doing so would make both branches' residuals cond outputs, and the full
  branch's [b, T, V] logits would be allocated (as zeros) even when the compact branch runs.
  """
  return _loss_head_impl(logits_fn, head, hidden, targets, weights, cap, chunk, False, False)


def _loss_head_fwd(logits_fn, head, hidden, targets, weights, cap, chunk, head_grad):
  ce, corr, n, d_head, d_h = _loss_head_impl(logits_fn, head, hidden, targets, weights, cap, chunk, True,
                                             head_grad)
  return (ce, corr, n), (d_head if head_grad else head, d_h)


def _loss_head_bwd(logits_fn, cap, chunk, head_grad, res, g):
  d_head, d_h = res
  g_ce = g[0]
  scale = lambda x: (g_ce * x.astype(jnp.float32)).astype(x.dtype)
  d_head = jax.tree.map(scale if head_grad else jnp.zeros_like, d_head)  # zeros: a frozen head, never read
  return d_head, scale(d_h), None, None


loss_head.defvjp(_loss_head_fwd, _loss_head_bwd)
