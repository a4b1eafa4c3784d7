"""The training step: token-weighted cross-entropy over the whole global batch, gradient accumulation, AdamW.

Loss. `loss = Σ_tokens CE / N` where the sum runs over every supervised token of the global batch (all
micro-batches, all devices) and N is their number. CE is computed in float32 from float32 logits
(`max + log Σ exp(logits − max) − logits[target]`). The global batch [B, ...] is split into k micro-batches (row
r goes to micro-batch r mod k, so every micro-batch stays spread over all devices); a `lax.scan` accumulates the
gradient of the SUM of CE over the micro-batches and divides once by N. This is the token-weighted mean the
reference intends — not its mean of per-device, per-micro-batch means, whose weighting depends on batch
composition. Accuracy counts a supervised token as correct iff its target logit equals the max logit (the max
logsumexp needs, so no separate argmax over the vocabulary): the same as `argmax == target` except on exact
ties for the max, which it counts as correct whichever tied index is the target.

Images. The (frozen) vision tower runs once per global batch, outside the micro-batch loop; each micro-batch
gathers the features of its own placeholders (the i-th placeholder of the global batch, in row-major order,
reads the i-th feature vector of the valid images in slot order — the model's splice rule) and applies the
trainable projector per position (it acts token-wise; at LLaVA sizes projecting all b·T positions costs well
under 1 % of the decoder's FLOPs). Padding image slots (image_valid False) may sit anywhere, e.g. at the end of each
host's slots. If vision-tower parameters are trainable, the gradient of the summed loss with respect to the
image features is accumulated over micro-batches and pulled back through the tower once (one `jax.vjp`).

Labels, the loss head (`loss_head`) and the per-token statistics live in `train/loss.py`.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llava_jax import parallel
from llava_jax.config import LlavaConfig
from llava_jax.models.llava import LlavaModel, check_image_placeholders
from llava_jax.train import loss as loss_lib
from llava_jax.train.loss import loss_head, loss_row_budget, next_token_targets
from llava_jax.train.optim import Optimizer, global_norm
from llava_jax.train.state import TrainState, has_trainable_under, merge_params

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


def _split_micro_batches(config: LlavaConfig, batch: Mapping[str, jax.Array], k: int, mesh: Mesh):
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
  k, chunk = int(micro_batches), loss_lib.chunk_length(chunked_loss)
  mb, tokens, input_tokens, has_images = _split_micro_batches(config, batch, k, mesh)
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

  def _place(self, state, batch):
    if batch and all(isinstance(x, jax.ShapeDtypeStruct) for x in batch.values()):
      batch = {k: batch[k] for k in BATCH_KEYS if k in batch}  # abstract global batch (ahead-of-time lowering)
    else:
      batch = parallel.shard_batch(_select_batch(self._config, batch), self._mesh, micro_batches=self._k)
    if self._jitted is None:
      self._build(state)
    return batch

  def __call__(self, state: TrainState, batch: Mapping[str, Any]):
    batch = self._place(state, batch)
    with parallel.mesh_context(self._mesh):
      return self._jitted(state, batch)

  def lower(self, state: TrainState, batch: Mapping[str, Any]):
    """`jax.jit(...).lower` on these arguments (for cost analysis / compile-time checks). `state` and `batch`
    may be `jax.ShapeDtypeStruct`s carrying their global shapes and NamedShardings (nothing allocated, e.g.
    `abstract_train_state` and `llava_jax.scale.memory.abstract_batch`)."""
    batch = self._place(state, batch)
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
