"""The training step: token-weighted cross-entropy over the whole global batch, gradient accumulation, AdamW.

Labels. Position t predicts input_ids[t+1]; it is supervised iff loss_mask[t+1] (the data pipeline marks the
tokens that are answers), t+1 is in the same non-padding segment as t (packed rows never predict across
samples), and input_ids[t+1] is an in-vocabulary, non-image-placeholder id. The last position predicts nothing.
This is HF's `ForCausalLMLoss` with labels = where(loss_mask, input_ids, -100).

Loss. `loss = Σ_tokens CE / N` where the sum runs over every supervised token of the global batch (all
micro-batches, all devices) and N is their number. CE is computed in float32 from float32 logits
(`logsumexp(logits) − logits[target]`). The global batch [B, ...] is split into k micro-batches (row r goes to
micro-batch r mod k, so every micro-batch stays spread over all devices); a `lax.scan` accumulates the
gradient of the SUM of CE over the micro-batches and divides once by N. This is the token-weighted mean the
reference intends — not its mean of per-device, per-micro-batch means, whose weighting depends on batch
composition.

Images. The (frozen) vision tower runs once per global batch, outside the micro-batch loop; each micro-batch
gathers the features of its own placeholders (the i-th placeholder of the global batch, in row-major order,
reads the i-th feature vector of the valid images in slot order — the model's splice rule) and applies the
trainable projector per position (it acts token-wise; at LLaVA sizes projecting all b·T positions costs well
under 1 % of the decoder's FLOPs). Padding image slots (image_valid False) may sit anywhere, e.g. at the end of each
host's slots. If vision-tower parameters are trainable, the gradient of the summed loss with respect to the
image features is accumulated over micro-batches and pulled back through the tower once (one `jax.vjp`).

Chunked loss (`chunked_loss` > 0): logits and CE are computed from the final hidden states in chunks of that
many positions (rematerialized in the backward pass), so [B, T, V] float32 logits never exist at once.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llava_jax import parallel
from llava_jax.config import LlavaConfig
from llava_jax.models.llava import LlavaModel
from llava_jax.train import sharding as shd
from llava_jax.train.optim import Optimizer, global_norm
from llava_jax.train.state import TrainState, has_trainable_under, merge_params

DEFAULT_LOSS_CHUNK = 512


# ---------------------------------------------------------------------------------------------------------
# Labels and per-token statistics


def next_token_targets(input_ids: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array, vocab_size: int,
                       image_token_index: Optional[int] = None):
  """(targets [B, T] int32, weights [B, T] bool): position t predicts input_ids[t+1] (see module doc)."""
  nxt = input_ids[:, 1:]
  w = loss_mask[:, 1:].astype(bool) & (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
  w = w & (nxt >= 0) & (nxt < vocab_size)
  if image_token_index is not None:
    w = w & (nxt != image_token_index)
  targets = jnp.pad(jnp.clip(nxt, 0, vocab_size - 1).astype(jnp.int32), ((0, 0), (0, 1)))
  weights = jnp.pad(w, ((0, 0), (0, 1)))
  return targets, weights


def token_stats(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """logits [..., V] → (Σ CE over weighted tokens, Σ correct argmax) as float32 scalars."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  w = weights.astype(jnp.float32)
  ce_sum = jnp.sum((logz - target_logit) * w)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * w)
  return ce_sum, correct


def _chunk_length(chunked_loss: Union[bool, int]) -> int:
  if chunked_loss is True:
    return DEFAULT_LOSS_CHUNK
  if not chunked_loss:
    return 0
  if int(chunked_loss) < 1:
    raise ValueError(f"chunked_loss={chunked_loss}: give a chunk length ≥ 1, True ({DEFAULT_LOSS_CHUNK}) or 0")
  return int(chunked_loss)


def chunked_token_stats(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array,
                        weights: jax.Array, chunk: int):
  """`token_stats(logits_fn(hidden), ...)` over chunks of `chunk` positions: hidden [B, T, D] → sums.

  Each chunk's logits [B, chunk, V] are recomputed in the backward pass (`jax.checkpoint`).
  """
  b, t, d = hidden.shape
  chunk = min(chunk, t)
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def one(h, tg, w):
    return token_stats(logits_fn(h), tg, w)

  def body(carry, xs):
    ce, corr = one(*xs)
    return (carry[0] + ce, carry[1] + corr), None

  zero = jnp.zeros((), jnp.float32)
  (ce, corr), _ = jax.lax.scan(body, (zero, zero), (split(hidden), split(targets), split(weights)))
  return ce, corr


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


def _decode(config: LlavaConfig, params, mb: Mapping[str, jax.Array], vis_flat: Optional[jax.Array],
            return_hidden: bool) -> jax.Array:
  """One micro-batch through projector (on gathered image features) + decoder → logits or hidden [b, T, ·]."""
  def fn(m):
    embeds = m.embed_text(mb["input_ids"])
    if vis_flat is not None:
      tok = jnp.take(vis_flat, mb["feat_index"], axis=0)  # [b, T, Dv]: the feature each placeholder reads
      tok = jax.lax.with_sharding_constraint(tok, P(shd.BATCH_AXES))
      proj = m.multi_modal_projector(tok).astype(embeds.dtype)
      embeds = jnp.where(mb["is_image"][..., None], proj, embeds)
    return m.decode(embeds, mb["positions"], mb["segment_ids"], return_hidden=return_hidden)
  return LlavaModel(config).apply({"params": params}, method=fn)


def _logits_fn(config: LlavaConfig, params):
  return lambda h: LlavaModel(config).apply({"params": params}, h, method=LlavaModel.logits)


def _micro_sums(config: LlavaConfig, chunk: int, trainable, frozen, vis_flat, mb):
  """(Σ CE, Σ correct) of one micro-batch."""
  params = merge_params(trainable, frozen)
  out = _decode(config, params, mb, vis_flat, return_hidden=chunk > 0)
  if chunk > 0:
    return chunked_token_stats(_logits_fn(config, params), out, mb["targets"], mb["weights"], chunk)
  return token_stats(out, mb["targets"], mb["weights"])


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
  spec = NamedSharding(mesh, P(None, shd.BATCH_AXES))
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
  return jax.lax.with_sharding_constraint(flat, NamedSharding(mesh, P()))


# ---------------------------------------------------------------------------------------------------------
# Loss and gradient over the global batch


def loss_and_grads(config: LlavaConfig, trainable, frozen, batch: Mapping[str, jax.Array], mesh: Mesh, *,
                   micro_batches: int = 1, chunked_loss: Union[bool, int] = 0, with_grads: bool = True):
  """Σ CE, Σ correct, N and (if with_grads) the gradient of Σ CE / N w.r.t. `trainable`. Call inside jit.

  Returns (sums dict(ce_sum, correct, tokens, input_tokens), grads or None); tokens = supervised tokens,
  input_tokens = non-padding tokens (for throughput).
  """
  k, chunk = int(micro_batches), _chunk_length(chunked_loss)
  mb, tokens, input_tokens, has_images = _prepare(config, batch, k, mesh)
  vision_trainable = with_grads and has_trainable_under(trainable, "vision_tower")

  vis_flat = vis_vjp = None
  if has_images:
    if vision_trainable:
      vis_flat, vis_vjp = jax.vjp(lambda tr: _image_features(config, merge_params(tr, frozen), batch, mesh),
                                  trainable)
    else:
      vis_flat = jax.lax.stop_gradient(_image_features(config, merge_params(trainable, frozen), batch, mesh))

  zero = jnp.zeros((), jnp.float32)
  sums = lambda tr, vf, m: _micro_sums(config, chunk, tr, frozen, vf, m)

  if not with_grads:
    def body(carry, m):
      ce, corr = sums(trainable, vis_flat, m)
      return (carry[0] + ce, carry[1] + corr), None
    (ce_sum, correct), _ = jax.lax.scan(body, (zero, zero), mb)
    return dict(ce_sum=ce_sum, correct=correct, tokens=tokens, input_tokens=input_tokens), None

  f32 = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
  add = lambda a, b: jax.tree.map(lambda x, y: x + y.astype(jnp.float32), a, b)
  diff_vis = vis_vjp is not None
  argnums = (0, 1) if diff_vis else 0

  def body(carry, m):
    g_acc, dv_acc, ce_acc, corr_acc = carry
    (ce, corr), g = jax.value_and_grad(lambda tr, vf: sums(tr, vf, m), argnums=argnums,
                                       has_aux=True)(trainable, vis_flat)
    if diff_vis:
      g, dv = g
      dv_acc = dv_acc + dv.astype(jnp.float32)
    return (add(g_acc, g), dv_acc, ce_acc + ce, corr_acc + corr), None

  dv0 = jnp.zeros(vis_flat.shape, jnp.float32) if diff_vis else zero
  (g_sum, dv_sum, ce_sum, correct), _ = jax.lax.scan(body, (f32(trainable), dv0, zero, zero), mb)
  if diff_vis:
    g_sum = add(g_sum, vis_vjp(dv_sum.astype(vis_flat.dtype))[0])
  denom = jnp.maximum(tokens, 1).astype(jnp.float32)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, trainable)
  return dict(ce_sum=ce_sum, correct=correct, tokens=tokens, input_tokens=input_tokens), grads


def _metrics(sums, extra: Optional[dict] = None) -> Dict[str, jax.Array]:
  denom = jnp.maximum(sums["tokens"], 1).astype(jnp.float32)
  out = dict(loss=sums["ce_sum"] / denom, accuracy=sums["correct"] / denom, tokens=sums["tokens"],
             input_tokens=sums["input_tokens"], loss_sum=sums["ce_sum"], correct=sums["correct"])
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
    shd.check_image_slots(out, config.num_image_tokens, config.image_token_index)
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
    rep = NamedSharding(self._mesh, P())
    out = (sh, rep) if self._donate else rep
    # Inputs keep the shardings they carry (state: as created / restored; batch: from shard_batch); outputs
    # are pinned so the new state has exactly the old state's layout.
    self._jitted = jax.jit(self._fn, out_shardings=out, donate_argnums=(0,) if self._donate else (),
                           compiler_options=self._compiler_options)

  def _prepare(self, state, batch):
    if batch and all(isinstance(x, jax.ShapeDtypeStruct) for x in batch.values()):
      batch = {k: batch[k] for k in BATCH_KEYS if k in batch}  # abstract global batch (ahead-of-time lowering)
    else:
      batch = shd.shard_batch(_select_batch(self._config, batch), self._mesh, micro_batches=self._k)
    if self._jitted is None:
      self._build(state)
    return batch

  def __call__(self, state: TrainState, batch: Mapping[str, Any]):
    batch = self._prepare(state, batch)
    with jax.set_mesh(self._mesh), parallel.axis_rules():
      return self._jitted(state, batch)

  def lower(self, state: TrainState, batch: Mapping[str, Any]):
    """`jax.jit(...).lower` on these arguments (for cost analysis / compile-time checks). `state` and `batch`
    may be `jax.ShapeDtypeStruct`s carrying their global shapes and NamedShardings (nothing allocated, e.g.
    `abstract_train_state` and `llava_jax.scale.memory.abstract_batch`)."""
    batch = self._prepare(state, batch)
    with jax.set_mesh(self._mesh), parallel.axis_rules():
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
  metrics (replicated scalars): loss (token-weighted mean CE), accuracy (argmax == target over supervised
  tokens), tokens (number of supervised tokens), input_tokens (non-padding tokens, for tokens/s), loss_sum,
  correct, grad_norm (before clipping), learning_rate (the rate this update used).
  state_shardings: TrainState of NamedShardings (default: those of the first state passed in).
  compiler_options: XLA options for `jax.jit` (e.g. {'xla_backend_optimization_level': 0} compiles faster).
  """
  if not isinstance(optimizer, Optimizer):
    optimizer = Optimizer(optimizer)
  k = int(micro_batches)
  if k < 1:
    raise ValueError(f"micro_batches={micro_batches} must be ≥ 1")

  def step(state: TrainState, batch):
    sums, grads = loss_and_grads(config, state.params, state.frozen, batch, mesh, micro_batches=k,
                                 chunked_loss=chunked_loss)
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
  """`eval_step(state, batch) -> metrics` (loss, accuracy, tokens, input_tokens, loss_sum, correct); no update,
  no donation.

  Sum `loss_sum`, `correct` and `tokens` over eval batches for a token-weighted mean over a whole eval set.
  """
  k = int(micro_batches)

  def step(state: TrainState, batch):
    sums, _ = loss_and_grads(config, state.params, state.frozen, batch, mesh, micro_batches=k,
                             chunked_loss=chunked_loss, with_grads=False)
    return _metrics(sums)

  return _JittedStep(step, config, mesh, k, donate=False, state_shardings=state_shardings,
                     compiler_options=compiler_options)
