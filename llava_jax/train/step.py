"""The training step: token-weighted cross-entropy over the whole global batch, gradient accumulation, AdamW.

Labels. Position t predicts input_ids[t+1]; it is supervised iff loss_mask[t+1] (the data pipeline marks the
tokens that are answers), t+1 is in the same non-padding segment as t (packed rows never predict across
samples), and input_ids[t+1] is an in-vocabulary, non-image-placeholder id. The last position predicts nothing.
This is HF's `ForCausalLMLoss` with labels = where(loss_mask, input_ids, -100).

Loss. `loss = Σ_tokens CE / N` where the sum runs over every supervised token of the global batch (all
micro-batches, all devices) and N is their number. CE is computed in float32 from float32 logits
(`max + log Σ exp(logits − max) − logits[target]`). The global batch [B, ...] is split into k micro-batches (row
r goes to micro-batch r mod k, so every micro-batch stays spread over all devices); a `lax.scan` accumulates the
gradient of the SUM of CE over the micro-batches and divides once by N. This is the token-weighted mean the
reference intends — not its mean of per-device, per-micro-batch means, whose weighting depends on batch
composition. Accuracy counts a supervised token as correct iff its target logit equals the max logit (the max
logsumexp needs, so no separate argmax over the vocabulary): the same as `argmax == target` except on exact
ties for the max, which it counts as correct whichever tied index is the target.

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

Images. The (frozen) vision tower runs once per global batch, outside the micro-batch loop; each micro-batch
gathers the features of its own placeholders (the i-th placeholder of the global batch, in row-major order,
reads the i-th feature vector of the valid images in slot order — the model's splice rule) and applies the
trainable projector per position (it acts token-wise; at LLaVA sizes projecting all b·T positions costs well
under 1 % of the decoder's FLOPs). Padding image slots (image_valid False) may sit anywhere, e.g. at the end of each
host's slots. If vision-tower parameters are trainable, the gradient of the summed loss with respect to the
image features is accumulated over micro-batches and pulled back through the tower once (one `jax.vjp`).

Chunked loss (`chunked_loss` > 0): the loss head works through its positions in blocks of that many positions
(accumulating the head's gradient in float32), so only one block's [b, chunk, V] float32 logits exist at a time.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llava_jax import parallel
from llava_jax.config import LlavaConfig
from llava_jax.models.llava import LlavaModel, check_image_placeholders
from llava_jax.train.optim import Optimizer, global_norm
from llava_jax.train.state import TrainState, has_trainable_under, merge_params

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


def _chunk_length(chunked_loss: Union[bool, int]) -> int:
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


# ---------------------------------------------------------------------------------------------------------
# Model pieces


def vision_features(config: LlavaConfig, params, pixel_values: jax.Array) -> jax.Array:
  """CLIP features before the projector: [N, H, W, 3] → [N, K, Dv·len(layers)] (LlavaModel.embed_image minus
  the projector: selected hidden states, CLS dropped for 'default', concatenated on features)."""
  def fn(m, px):
    hidden = m.vision_tower(px, layers=config.vision_feature_layers)  # [S, N, P+1, Dv]
    if config.vision_feature_select_strategy == "default":
      hidden = hidden[:, :, 1:]
    return jnp.concatenate(list(hidden), axis=-1)
  return LlavaModel(config).apply({"params": params}, pixel_values, method=fn)


def _decode_hidden(config: LlavaConfig, params, mb: Mapping[str, jax.Array],
                   vis_flat: Optional[jax.Array]) -> jax.Array:
  """One micro-batch through projector (on gathered image features) + decoder → final-normed hidden [b, T, D]
  (the loss head applies the lm_head where it is needed)."""
  def fn(m):
    embeds = m.embed_text(mb["input_ids"])
    if vis_flat is not None:
      tok = jnp.take(vis_flat, mb["feat_index"], axis=0)  # [b, T, Dv]: the feature each placeholder reads
      tok = jax.lax.with_sharding_constraint(tok, P(parallel.BATCH_AXES))
      proj = m.multi_modal_projector(tok).astype(embeds.dtype)
      embeds = jnp.where(mb["is_image"][..., None], proj, embeds)
    return m.decode(embeds, mb["positions"], mb["segment_ids"], return_hidden=True)
  rngs = {"dropout": mb["dropout_rng"]} if "dropout_rng" in mb else None  # LoRA dropout (training only)
  return LlavaModel(config).apply({"params": params}, method=fn, rngs=rngs)


def _head_name(config: LlavaConfig) -> str:
  """The decoder parameter `LlavaModel.logits` reads: the lm_head, or the embedding table when tied."""
  return "embed_tokens" if config.text.tie_word_embeddings else "lm_head"


def _head_params(config: LlavaConfig, params):
  name = _head_name(config)
  return {"language_model": {name: params["language_model"][name]}}


def _apply_logits(config: LlavaConfig, head, hidden: jax.Array) -> jax.Array:
  """`LlavaModel.logits` with only the head's parameters: hidden [b, n, D] → logits [b, n, V] float32."""
  return LlavaModel(config).apply({"params": head}, hidden, method=LlavaModel.logits)


def _micro_sums(config: LlavaConfig, chunk: int, cap: int, head_grad: bool, trainable, frozen, vis_flat, mb):
  """(Σ CE, (Σ correct, logit positions)) of one micro-batch."""
  params = merge_params(trainable, frozen)
  hidden = _decode_hidden(config, params, mb, vis_flat)
  ce, correct, positions = loss_head(functools.partial(_apply_logits, config), _head_params(config, params),
                                     hidden, mb["targets"], mb["weights"], cap, chunk, head_grad)
  return ce, (correct, positions)


# ---------------------------------------------------------------------------------------------------------
# Batch preparation (inside jit)


def split_micro_batches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] → [k, B/k, ...], micro-batch j = rows j, j+k, j+2k, ... (each stays spread over all devices)."""
  b = x.shape[0]
  return jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)


def _prepare(config: LlavaConfig, batch: Mapping[str, jax.Array], k: int, mesh: Mesh):
  """Global batch → (micro-batch dict with leading [k] axis, supervised tokens, input tokens, has_images)."""
  ids = batch["input_ids"].astype(jnp.int32)
  b, t = ids.shape
  seg = batch.get("segment_ids", batch.get("attention_mask"))
  seg = jnp.ones((b, t), jnp.int32) if seg is None else seg.astype(jnp.int32)
  pos = batch.get("positions")
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if pos is None else pos.astype(jnp.int32)
  targets, weights = next_token_targets(ids, batch["loss_mask"], seg, config.text.vocab_size,
                                        config.image_token_index)
  is_image = ids == config.image_token_index
  mb = dict(input_ids=ids, segment_ids=seg, positions=pos, targets=targets, weights=weights, is_image=is_image)
  px = batch.get("pixel_values")
  has_images = px is not None and px.shape[0] > 0
  if has_images:
    total = px.shape[0] * config.num_image_tokens
    mb["feat_index"] = jnp.clip(jnp.cumsum(is_image.reshape(-1)) - 1, 0, total - 1).reshape(b, t).astype(jnp.int32)
  spec = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
  mb = {name: jax.lax.with_sharding_constraint(split_micro_batches(x, k), spec) for name, x in mb.items()}
  return mb, jnp.sum(weights.astype(jnp.int32)), jnp.sum((seg != 0).astype(jnp.int32)), has_images


def _image_features(config: LlavaConfig, params, batch, mesh: Mesh) -> jax.Array:
  """Valid images' CLIP features, flattened [N·K, Dv] in placeholder order, replicated on the mesh."""
  px = batch["pixel_values"]
  feats = vision_features(config, params, px)  # [N, K, Dv]
  valid = batch.get("image_valid")
  if valid is not None:  # valid slots first, in slot order (padding may sit anywhere, e.g. per host)
    order = jnp.argsort(jnp.logical_not(valid.astype(bool)), stable=True)
    feats = jnp.take(feats, order, axis=0)
  flat = feats.reshape(-1, feats.shape[-1])
  return jax.lax.with_sharding_constraint(flat, parallel.replicated(mesh))


# ---------------------------------------------------------------------------------------------------------
# Loss and gradient over the global batch


def loss_and_grads(config: LlavaConfig, trainable, frozen, batch: Mapping[str, jax.Array], mesh: Mesh, *,
                   micro_batches: int = 1, chunked_loss: Union[bool, int] = 0, with_grads: bool = True,
                   dropout_rng: Optional[jax.Array] = None):
  """Σ CE, Σ correct, N and (if with_grads) the gradient of Σ CE / N w.r.t. `trainable`. Call inside jit.

  dropout_rng: raw key; when given, micro-batch j runs the model's dropout (LoRA's) with `split(rng, k)[j]`.

  Returns (sums dict(ce_sum, correct, tokens, input_tokens), grads or None); tokens = supervised tokens,
  input_tokens = non-padding tokens (for throughput).
  """
  k, chunk = int(micro_batches), _chunk_length(chunked_loss)
  mb, tokens, input_tokens, has_images = _prepare(config, batch, k, mesh)
  if dropout_rng is not None:
    mb["dropout_rng"] = jax.random.split(dropout_rng, k)
  vision_trainable = with_grads and has_trainable_under(trainable, "vision_tower")
  head_grad = with_grads and bool(trainable.get("language_model", {}).get(_head_name(config)))
  b, t = batch["input_ids"].shape
  cap = (loss_row_budget(t, batch["pixel_values"].shape[0], b, config.num_image_tokens) if has_images else t)

  vis_flat = vis_vjp = None
  if has_images:
    if vision_trainable:
      vis_flat, vis_vjp = jax.vjp(lambda tr: _image_features(config, merge_params(tr, frozen), batch, mesh),
                                  trainable)
    else:
      vis_flat = jax.lax.stop_gradient(_image_features(config, merge_params(trainable, frozen), batch, mesh))

  zero = jnp.zeros((), jnp.float32)
  sums = lambda tr, vf, m: _micro_sums(config, chunk, cap, head_grad, tr, frozen, vf, m)
  out = lambda ce, corr, pos: dict(ce_sum=ce, correct=corr, tokens=tokens, input_tokens=input_tokens,
                                   logit_positions=pos)

  if not with_grads:
    def body(carry, m):
      ce, (corr, pos) = sums(trainable, vis_flat, m)
      return (carry[0] + ce, carry[1] + corr, carry[2] + pos), None
    (ce_sum, correct, positions), _ = jax.lax.scan(body, (zero, zero, zero), mb)
    return out(ce_sum, correct, positions), None

  f32 = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
  add = lambda a, b: jax.tree.map(lambda x, y: x + y.astype(jnp.float32), a, b)
  diff_vis = vis_vjp is not None
  argnums = (0, 1) if diff_vis else 0

  def body(carry, m):
    g_acc, dv_acc, ce_acc, corr_acc, pos_acc = carry
    (ce, (corr, pos)), g = jax.value_and_grad(lambda tr, vf: sums(tr, vf, m), argnums=argnums,
                                              has_aux=True)(trainable, vis_flat)
    if diff_vis:
      g, dv = g
      dv_acc = dv_acc + dv.astype(jnp.float32)
    return (add(g_acc, g), dv_acc, ce_acc + ce, corr_acc + corr, pos_acc + pos), None

  dv0 = jnp.zeros(vis_flat.shape, jnp.float32) if diff_vis else zero
  (g_sum, dv_sum, ce_sum, correct, positions), _ = jax.lax.scan(body, (f32(trainable), dv0, zero, zero, zero), mb)
  if diff_vis:
    g_sum = add(g_sum, vis_vjp(dv_sum.astype(vis_flat.dtype))[0])
  denom = jnp.maximum(tokens, 1).astype(jnp.float32)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, trainable)
  return out(ce_sum, correct, positions), grads


def _metrics(sums, extra: Optional[dict] = None) -> Dict[str, jax.Array]:
  denom = jnp.maximum(sums["tokens"], 1).astype(jnp.float32)
  out = dict(loss=sums["ce_sum"] / denom, accuracy=sums["correct"] / denom, tokens=sums["tokens"],
             input_tokens=sums["input_tokens"], loss_sum=sums["ce_sum"], correct=sums["correct"],
             logit_positions=sums["logit_positions"].astype(jnp.int32))
  out.update(extra or {})
  return out


# ---------------------------------------------------------------------------------------------------------
# Jitted steps


BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions", "attention_mask", "pixel_values", "image_valid")


def _select_batch(config: LlavaConfig, batch: Mapping[str, Any]) -> Dict[str, Any]:
  """Keep the arrays the step reads (others, e.g. sample ids, stay on the host); check host-side image counts."""
  missing = [k for k in ("input_ids", "loss_mask") if k not in batch]
  if missing:
    raise ValueError(f"batch lacks {missing}; it needs input_ids [B, T] and loss_mask [B, T] (see make_train_step)")
  out = {k: batch[k] for k in BATCH_KEYS if k in batch and batch[k] is not None}
  if not isinstance(out["input_ids"], jax.Array):  # per-host numpy: check before it disappears into jit
    px, valid = out.get("pixel_values"), out.get("image_valid")
    n_valid = 0 if px is None else int(np.shape(px)[0]) if valid is None else int(np.sum(np.asarray(valid)))
    check_image_placeholders(np.asarray(out["input_ids"]), n_valid, config.num_image_tokens, config.image_token_index)
  return out


class _JittedStep:
  """One jit (built at the first call, from the state's shardings); enters the mesh and the logical-axis rules
  around each call and shards per-host numpy batches with `shard_batch`."""

  def __init__(self, fn, config: LlavaConfig, mesh: Mesh, micro_batches: int, donate: bool, state_shardings=None,
               compiler_options: Optional[dict] = None):
    self._fn, self._config, self._mesh, self._k, self._donate = fn, config, mesh, micro_batches, donate
    self._compiler_options = compiler_options
    self._state_shardings = state_shardings
    self._jitted = None

  def _build(self, state):
    sh = self._state_shardings or jax.tree.map(lambda x: x.sharding, state)
    rep = parallel.replicated(self._mesh)
    out = (sh, rep) if self._donate else rep
    # Inputs keep the shardings they carry (state: as created / restored; batch: from shard_batch); outputs
    # are pinned so the new state has exactly the old state's layout.
    self._jitted = jax.jit(self._fn, out_shardings=out, donate_argnums=(0,) if self._donate else (),
                           compiler_options=self._compiler_options)

  def _prepare(self, state, batch):
    if batch and all(isinstance(x, jax.ShapeDtypeStruct) for x in batch.values()):
      batch = {k: batch[k] for k in BATCH_KEYS if k in batch}  # abstract global batch (ahead-of-time lowering)
    else:
      batch = parallel.shard_batch(_select_batch(self._config, batch), self._mesh, micro_batches=self._k)
    if self._jitted is None:
      self._build(state)
    return batch

  def __call__(self, state: TrainState, batch: Mapping[str, Any]):
    batch = self._prepare(state, batch)
    with parallel.mesh_context(self._mesh):
      return self._jitted(state, batch)

  def lower(self, state: TrainState, batch: Mapping[str, Any]):
    """`jax.jit(...).lower` on these arguments (for cost analysis / compile-time checks). `state` and `batch`
    may be `jax.ShapeDtypeStruct`s carrying their global shapes and NamedShardings (nothing allocated, e.g.
    `abstract_train_state` and `llava_jax.scale.memory.abstract_batch`)."""
    batch = self._prepare(state, batch)
    with parallel.mesh_context(self._mesh):
      return self._jitted.lower(state, batch)


def make_train_step(config: LlavaConfig, optimizer: Union[Optimizer, optax.GradientTransformation], mesh: Mesh, *,
                    micro_batches: int = 1, chunked_loss: Union[bool, int] = 0, state_shardings=None,
                    compiler_options: Optional[dict] = None):
  """`step(state, batch) -> (state, metrics)`, jitted with the state's in/out shardings, the state donated.

  batch: dict of per-host numpy arrays (or global jax.Arrays) — input_ids [B, T] int32, loss_mask [B, T] bool,
  segment_ids [B, T] int32 (0 = pad; default all 1), positions [B, T] int32 (default arange), pixel_values
  [N, S, S, 3] float32 and image_valid [N] bool (optional). B must be a multiple of data·fsdp·micro_batches.
  Other keys are ignored. Per-host numpy batches are checked (placeholders = valid images × tokens per image)
  and sharded with `shard_batch`; `attention_mask` [B, T] stands in for segment_ids when those are absent.
  metrics (replicated scalars): loss (token-weighted mean CE), accuracy (target logit == max logit over
  supervised tokens: argmax == target except on exact ties), tokens (number of supervised tokens), input_tokens
  (non-padding tokens, for tokens/s), loss_sum, correct, logit_positions (positions the lm_head ran on, see the
  module doc), grad_norm (before clipping), learning_rate (the rate this update used).
  state_shardings: TrainState of NamedShardings (default: those of the first state passed in).
  compiler_options: XLA options for `jax.jit` (e.g. {'xla_backend_optimization_level': 0} compiles faster).
  """
  if not isinstance(optimizer, Optimizer):
    optimizer = Optimizer(optimizer)
  k = int(micro_batches)
  if k < 1:
    raise ValueError(f"micro_batches={micro_batches} must be ≥ 1")

  def step(state: TrainState, batch):
    lora = config.runtime.lora
    dropout_rng = jax.random.fold_in(state.rng, state.step) if lora is not None and lora.dropout > 0 else None
    sums, grads = loss_and_grads(config, state.params, state.frozen, batch, mesh, micro_batches=k,
                                 chunked_loss=chunked_loss, dropout_rng=dropout_rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _metrics(sums, dict(grad_norm=global_norm(grads), learning_rate=optimizer.learning_rate(state.step)))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return _JittedStep(step, config, mesh, k, donate=True, state_shardings=state_shardings,
                     compiler_options=compiler_options)


def make_eval_step(config: LlavaConfig, mesh: Mesh, *, micro_batches: int = 1,
                   chunked_loss: Union[bool, int] = 0, state_shardings=None,
                   compiler_options: Optional[dict] = None):
  """`eval_step(state, batch) -> metrics` (loss, accuracy, tokens, input_tokens, loss_sum, correct,
  logit_positions); no update, no donation.

  Sum `loss_sum`, `correct` and `tokens` over eval batches for a token-weighted mean over a whole eval set.
  """
  k = int(micro_batches)

  def step(state: TrainState, batch):
    sums, _ = loss_and_grads(config, state.params, state.frozen, batch, mesh, micro_batches=k,
                             chunked_loss=chunked_loss, with_grads=False)
    return _metrics(sums)

  return _JittedStep(step, config, mesh, k, donate=False, state_shardings=state_shardings,
                     compiler_options=compiler_options)
