"""The training step against transformers (loss and gradients of LlavaForConditionalGeneration in PyTorch on the
same weights and batch) and against itself across meshes, micro-batch counts, trainable sets and loss chunking.

Gradients are read back from AdamW's first moment after one step (mu = (1 − β1)·g with no clipping), so every
run uses the real optimizer and still exposes its gradient.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import traverse_util

from llava_jax import parallel
from llava_jax.train import optim
from llava_jax.train.state import create_train_state, split_params
from llava_jax.train.loss import loss_row_budget, next_token_targets, token_stats
from llava_jax.train.step import _select_batch, make_eval_step, make_train_step
from tests import fixtures

STAGE1 = r"multi_modal_projector/.*"
STAGE2 = r"multi_modal_projector/.*|language_model/.*"
FAST = dict(xla_backend_optimization_level=0)  # compile time dominates these tests
B, T = 16, 48
IMAGE_ROWS = (0, 1, 2, 5, 6, 9)
IMAGE_VALID = np.array([1, 1, 1, 0, 1, 1, 1, 0], bool)  # a padding slot mid-way, as per-host padding makes it
OPT = optim.make_optimizer(learning_rate=1e-3, total_steps=10, warmup_ratio=0.0, weight_decay=0.1,
                           max_grad_norm=None)


def make_batch(config, seed):
  """B rows, right-padded; rows in IMAGE_ROWS start with BOS + one image run. Supervised spans at the row ends,
  long on rows ≡ 0 (mod 4) and a single token on rows ≡ 3, so micro-batches (rows j::k) differ in token count."""
  rs = np.random.RandomState(seed)
  k_img, img = config.num_image_tokens, config.image_token_index
  ids = np.zeros((B, T), np.int32)
  loss_mask = np.zeros((B, T), bool)
  seg = np.zeros((B, T), np.int32)
  for r in range(B):
    head = [1] + ([img] * k_img if r in IMAGE_ROWS else [])
    length = rs.randint(len(head) + 8, T + 1)
    ids[r, :length] = head + list(rs.randint(3, 120, length - len(head)))
    seg[r, :length] = 1
    n_sup = {0: length - len(head) - 2, 1: 4, 2: 3, 3: 1}[r % 4]
    loss_mask[r, length - n_sup:length] = True
  return dict(input_ids=ids, loss_mask=loss_mask, segment_ids=seg,
              positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
              pixel_values=rs.randn(len(IMAGE_VALID), 28, 28, 3).astype(np.float32), image_valid=IMAGE_VALID)


def hf_reference(model, config, batch):
  """transformers' loss (labels = input_ids where supervised, else -100), per-token CE, argmax accuracy, grads."""
  ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
  attn = torch.from_numpy((batch["segment_ids"] > 0).astype(np.int64))
  labels = torch.where(torch.from_numpy(batch["loss_mask"]) & (attn > 0), ids, torch.tensor(-100))
  pixels = torch.from_numpy(batch["pixel_values"][batch["image_valid"]].transpose(0, 3, 1, 2).copy())
  pixels = pixels if len(pixels) else None
  model.zero_grad()
  out = model(input_ids=ids, pixel_values=pixels, attention_mask=attn, labels=labels)
  out.loss.backward()
  logits = out.logits.detach().float()
  shifted = labels[:, 1:]
  ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                         reduction="none", ignore_index=-100).reshape(shifted.shape).numpy()
  sup = (shifted != -100).numpy()
  # the loss is exactly the mean CE over supervised next tokens (the label shift we implement)
  np.testing.assert_allclose(out.loss.item(), ce[sup].mean(), rtol=1e-6)
  correct = (logits[:, :-1].argmax(-1) == shifted).numpy() & sup
  grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
           for n, p in model.named_parameters()}
  grad_tree = fixtures.llava_params_from_hf_model(SimpleNamespace(state_dict=lambda: grads), config)
  return dict(loss=out.loss.item(), ce=ce, sup=sup, tokens=int(sup.sum()), accuracy=correct.sum() / sup.sum(),
              grads=grad_tree)


@pytest.fixture(scope="module")
def setup():
  model = fixtures.tiny_hf_llava(seed=3)
  config = fixtures.llava_config_from_hf_model(model, scan_layers=True)
  params = fixtures.llava_params_from_hf_model(model, config)
  batches = [make_batch(config, 10), make_batch(config, 11)]
  ref = hf_reference(model, config, batches[0])
  cache = {}

  def run(shape, k, patterns=STAGE2, freeze="vision_tower/.*", chunk=0):
    """Two train steps on mesh `shape` with k micro-batches → per step (metrics, numpy state)."""
    key = (shape, k, patterns, freeze, chunk)
    if key not in cache:
      mesh = parallel.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
      state = create_train_state(config, OPT, mesh, 0, trainable_patterns=patterns, freeze=freeze, params=params)
      step = make_train_step(config, OPT, mesh, micro_batches=k, chunked_loss=chunk, compiler_options=FAST)
      out = []
      for batch in batches:
        state, metrics = step(state, batch)
        out.append((jax.device_get(metrics), jax.device_get(state)))
      cache[key] = out
    return cache[key]

  return SimpleNamespace(model=model, config=config, params=params, batches=batches, ref=ref, run=run)


def adam_moments(opt_state):
  """(mu, nu) of the ScaleByAdamState inside an optax chain."""
  if hasattr(opt_state, "mu") and hasattr(opt_state, "nu"):
    return opt_state.mu, opt_state.nu
  children = opt_state if isinstance(opt_state, (tuple, list)) else getattr(opt_state, "inner_state", ())
  for child in (children if isinstance(children, (tuple, list)) else (children,)):
    found = adam_moments(child)
    if found is not None:
      return found
  return None


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def assert_grads_match(grads_from_mu, ref_grads, paths=None):
  ref = flat(ref_grads)
  ours = flat(grads_from_mu)
  assert set(ours) == set(paths if paths is not None else ours)
  for p, g in ours.items():
    want = ref[p]
    scale = max(np.abs(want).max(), 1e-8)
    np.testing.assert_allclose(g, want, rtol=0, atol=2e-4 * scale + 1e-8, err_msg=p)


def grads_of(state):
  mu, _ = adam_moments(state.opt_state)
  return jax.tree.map(lambda m: np.asarray(m) / (1 - 0.9), mu)


def test_single_device_step_matches_transformers(setup):
  (m1, s1), _ = setup.run((1, 1, 1), 1)
  ref = setup.ref
  assert int(m1["tokens"]) == ref["tokens"]
  assert int(m1["input_tokens"]) == int((setup.batches[0]["segment_ids"] > 0).sum())
  np.testing.assert_allclose(m1["loss"], ref["loss"], rtol=2e-6)
  np.testing.assert_allclose(m1["accuracy"], ref["accuracy"], atol=1e-7)
  np.testing.assert_allclose(m1["learning_rate"], 1e-3, rtol=1e-7)
  grads = grads_of(s1)
  trainable, _ = split_params(ref["grads"], STAGE2)
  assert_grads_match(grads, ref["grads"], paths=flat(trainable).keys())
  ref_norm = np.sqrt(sum(np.sum(np.square(g)) for g in flat(trainable).values()))
  np.testing.assert_allclose(m1["grad_norm"], ref_norm, rtol=1e-4)


@pytest.mark.parametrize("shape,k", [((8, 1, 1), 2), ((2, 4, 1), 1), ((2, 2, 2), 4)])
def test_sharded_step_equals_single_device(setup, shape, k):
  base = setup.run((1, 1, 1), 1)
  got = setup.run(shape, k)
  for (mb, _), (mg, _) in zip(base, got):
    assert int(mg["tokens"]) == int(mb["tokens"])
    for name in ("loss", "accuracy", "grad_norm", "learning_rate"):
      np.testing.assert_allclose(mg[name], mb[name], rtol=1e-5, err_msg=name)
  sb, sg = base[-1][1], got[-1][1]
  (mu_b, nu_b), (mu_g, nu_g) = adam_moments(sb.opt_state), adam_moments(sg.opt_state)
  # moments (hence gradients) to float32 reduction-order noise relative to each leaf's scale; params to a
  # small fraction of one AdamW step (lr 1e-3): AdamW divides by sqrt(nu), amplifying noise on ~0 gradients
  for name, a, b, tol in (("mu", mu_g, mu_b, 1e-4), ("nu", nu_g, nu_b, 1e-4), ("params", sg.params, sb.params, None)):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for p in fa:
      atol = 5e-3 * 1e-3 if tol is None else tol * np.abs(fb[p]).max()
      np.testing.assert_allclose(fa[p], fb[p], rtol=0, atol=atol, err_msg=f"{name} {p}")
  assert int(sg.step) == 2


def micro_batch(batch, rows):
  """The rows `rows` of a batch with their own images (valid images belong to IMAGE_ROWS in order)."""
  valid_px = batch["pixel_values"][batch["image_valid"]]
  px = np.asarray([valid_px[IMAGE_ROWS.index(r)] for r in rows if r in IMAGE_ROWS], np.float32)
  px = px.reshape(-1, *valid_px.shape[1:])  # a micro-batch may hold no image at all
  sub = {k: v[rows] for k, v in batch.items() if k not in ("pixel_values", "image_valid")}
  return dict(sub, pixel_values=px, image_valid=np.ones(len(px), bool))


def test_accumulation_is_token_weighted_not_mean_of_means(setup):
  """k = 4 micro-batches (rows j::4) with very different supervised-token counts: loss and gradient are the whole
  batch's token-weighted mean (transformers on the whole batch), not the mean of the micro-batch means
  (transformers on each micro-batch, averaged — what the reference's accumulation computes)."""
  ref, k = setup.ref, 4
  counts = [int(ref["sup"][j::k].sum()) for j in range(k)]
  assert len(set(counts)) == k and max(counts) > 5 * min(counts)
  micro = [hf_reference(setup.model, setup.config, micro_batch(setup.batches[0], np.arange(B)[j::k]))
           for j in range(k)]
  assert [r["tokens"] for r in micro] == counts
  mean_of_means = np.mean([r["loss"] for r in micro])
  (m, s), _ = setup.run((2, 2, 2), k)
  np.testing.assert_allclose(m["loss"], ref["loss"], rtol=2e-6)
  assert abs(mean_of_means - ref["loss"]) > 100 * 2e-6 * ref["loss"]  # the weightings differ beyond tolerance
  trainable, _ = split_params(ref["grads"], STAGE2)
  ours = grads_of(s)
  assert_grads_match(ours, ref["grads"], paths=flat(trainable).keys())
  mom = jax.tree.map(lambda *g: np.mean(g, axis=0), *[split_params(r["grads"], STAGE2)[0] for r in micro])
  tw = flat(trainable)
  rel = lambda a: np.sqrt(sum(np.sum((a[p] - tw[p]) ** 2) for p in tw) / sum(np.sum(tw[p] ** 2) for p in tw))
  assert rel(flat(ours)) < 1e-4 and rel(flat(mom)) > 0.05, (rel(flat(ours)), rel(flat(mom)))


def test_stage1_updates_only_the_projector(setup):
  (m, s), _ = setup.run((2, 2, 2), 2, patterns=STAGE1)
  before = flat(setup.params)
  assert set(s.params) == {"multi_modal_projector"}
  assert set(s.frozen) == {"vision_tower", "language_model"}
  for p, x in flat(s.frozen).items():
    assert x.dtype == before[p].dtype and np.array_equal(x, before[p]), p  # bit-identical
  for p, x in flat(s.params).items():
    assert not np.array_equal(x, before[p]), p
  # optimizer state: only projector-shaped leaves (AdamW mu and nu), besides scalar counters
  paths = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(s.opt_state)
           if np.ndim(leaf) > 0]
  assert paths and all("multi_modal_projector" in p for p in paths)
  assert len(paths) == 2 * len(flat(s.params))
  trainable, _ = split_params(setup.ref["grads"], STAGE1)
  assert_grads_match(grads_of(s), setup.ref["grads"], paths=flat(trainable).keys())
  np.testing.assert_allclose(m["loss"], setup.ref["loss"], rtol=2e-6)


def test_trainable_vision_tower_and_chunked_loss(setup):
  """Everything trainable (vision gradients pulled back once through the tower) with a chunked loss whose chunk
  (7) does not divide T: loss and every gradient match transformers; the loss equals the plain step's."""
  (m, s), _ = setup.run((2, 2, 2), 2, patterns=".*", freeze=None, chunk=7)
  assert set(s.params) == {"vision_tower", "multi_modal_projector", "language_model"} and not s.frozen
  np.testing.assert_allclose(m["loss"], setup.ref["loss"], rtol=2e-6)
  (plain, _), _ = setup.run((1, 1, 1), 1)
  np.testing.assert_allclose(m["loss"], plain["loss"], rtol=1e-6)
  assert_grads_match(grads_of(s), setup.ref["grads"], paths=flat(setup.ref["grads"]).keys())
  assert np.abs(flat(grads_of(s))["vision_tower/encoder/layers/mlp/fc1/kernel"]).max() > 0


def test_eval_step_matches_transformers_and_keeps_state(setup):
  mesh = parallel.make_mesh((2, 4, 1))
  state = create_train_state(setup.config, OPT, mesh, 0, trainable_patterns=STAGE2, params=setup.params)
  evaluate = make_eval_step(setup.config, mesh, micro_batches=2, compiler_options=FAST)
  m = jax.device_get(evaluate(state, setup.batches[0]))
  assert int(m["tokens"]) == setup.ref["tokens"]
  np.testing.assert_allclose(m["loss"], setup.ref["loss"], rtol=2e-6)
  np.testing.assert_allclose(m["accuracy"], setup.ref["accuracy"], atol=1e-7)
  np.testing.assert_allclose(m["loss_sum"] / m["tokens"], m["loss"], rtol=1e-6)
  again = jax.device_get(evaluate(state, setup.batches[0]))  # state not donated
  assert again["loss"] == m["loss"] and int(state.step) == 0


def test_create_train_state_random_init_lands_on_shardings(setup):
  mesh = parallel.make_mesh((2, 4, 1))
  state = create_train_state(setup.config, OPT, mesh, jax.random.key(1), trainable_patterns=STAGE2)
  lm_head = state.params["language_model"]["lm_head"]["kernel"]
  assert lm_head.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert lm_head.addressable_shards[0].data.shape == (lm_head.shape[0] // 4, lm_head.shape[1])
  mu, nu = adam_moments(state.opt_state)
  for tree in (mu, nu):
    for (p, x), (_, w) in zip(flat(tree).items(), flat(state.params).items()):
      assert x.sharding == w.sharding, p
  assert "vision_tower" in state.frozen and "vision_tower" not in state.params
  assert float(jnp.std(lm_head)) > 0.01  # really initialized
  assert state.step.sharding.is_fully_replicated and state.rng.dtype == jnp.uint32


def test_next_token_targets_rule():
  """t predicts t+1, supervised iff loss_mask[t+1], same non-pad segment, in-vocab and not a placeholder."""
  ids = np.array([[1, 5, 6, 7, 1, 8, 9, 0], [1, 99, -200, 4, 5, 6, 2, 0]], np.int32)
  mask = np.array([[0, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 1, 0]], bool)
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 0]], np.int32)
  targets, weights = next_token_targets(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(seg), 64, 99)
  np.testing.assert_array_equal(np.asarray(weights), [[1, 1, 1, 0, 1, 1, 0, 0],  # no cross-segment, no pad
                                                     [0, 0, 1, 1, 0, 1, 0, 0]])  # 99 placeholder, -200, 5 unmasked
  np.testing.assert_array_equal(np.asarray(targets)[0, :6], [5, 6, 7, 1, 8, 9])


def test_mesh_and_batch_errors_say_what_to_change(setup):
  with pytest.raises(ValueError, match=r"set config.mesh so data\*fsdp\*tensor == 8"):
    parallel.make_mesh((3, 1, 1))
  mesh = parallel.make_mesh((8, 1, 1))
  batch = setup.batches[0]
  with pytest.raises(ValueError, match=r"global_batch_size a multiple of 8 "):
    parallel.shard_batch({k: v[:12] for k, v in batch.items() if k not in ("pixel_values", "image_valid")}, mesh)
  with pytest.raises(ValueError, match=r"multiple of 32 \(= data·fsdp·micro_batches\)"):
    parallel.shard_batch(batch, mesh, micro_batches=4)
  with pytest.raises(ValueError, match=r"6 image slots.*multiple of 8"):
    parallel.shard_batch(dict(batch, pixel_values=batch["pixel_values"][:6], image_valid=IMAGE_VALID[:6]), mesh)
  with pytest.raises(ValueError, match=r"96 image placeholders.*5 image\(s\) give"):
    _select_batch(setup.config, dict(batch, image_valid=IMAGE_VALID & (np.arange(8) != 0)))
  _select_batch(setup.config, batch)


# ---------------------------------------------------------------------------------------------------------
# The loss head computes logits only at supervised positions (a per-row budget, falling back to all positions).

CB, CT = 8, 40  # every row holds one image (16 placeholders): budget = round_up(40 − 16, 8) = 24 positions per row
CAP = 24


def compact_batch(config, seed, long_text_row=None):
  """CB rows of one image each (unless `long_text_row`: that row is text-only with 30 supervised tokens, more
  than the budget, and its image slot is padding). Supervised spans of varying length at the row ends."""
  rs = np.random.RandomState(seed)
  k_img, img = config.num_image_tokens, config.image_token_index
  ids = np.zeros((CB, CT), np.int32)
  loss_mask = np.zeros((CB, CT), bool)
  seg = np.zeros((CB, CT), np.int32)
  for r in range(CB):
    text_only = r == long_text_row
    head = [1] + ([] if text_only else [2 + r % 3] * 2 + [img] * k_img)
    length = CT if text_only else rs.randint(len(head) + 6, CT + 1)
    ids[r, :length] = head + list(rs.randint(3, 120, length - len(head)))
    seg[r, :length] = 1
    n_sup = 31 if text_only else rs.randint(1, length - len(head))
    loss_mask[r, length - n_sup:length] = True
  valid = np.array([r != long_text_row for r in range(CB)])
  return dict(input_ids=ids, loss_mask=loss_mask, segment_ids=seg,
              positions=np.tile(np.arange(CT, dtype=np.int32), (CB, 1)),
              pixel_values=rs.randn(CB, 28, 28, 3).astype(np.float32), image_valid=valid)


def one_step(config, params, batch, shape, k, patterns, freeze="vision_tower/.*", chunk=0):
  mesh = parallel.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
  state = create_train_state(config, OPT, mesh, 0, trainable_patterns=patterns, freeze=freeze, params=params)
  step = make_train_step(config, OPT, mesh, micro_batches=k, chunked_loss=chunk, compiler_options=FAST)
  lowered = step.lower(state, batch).as_text()
  state, metrics = step(state, batch)
  return jax.device_get(metrics), jax.device_get(state), lowered


def assert_matches_hf(ref, m, s, patterns, freeze="vision_tower/.*"):
  assert int(m["tokens"]) == ref["tokens"]
  np.testing.assert_allclose(m["loss"], ref["loss"], rtol=2e-6)
  np.testing.assert_allclose(m["accuracy"], ref["accuracy"], atol=1e-7)
  trainable, _ = split_params(ref["grads"], patterns, freeze=freeze)
  assert_grads_match(grads_of(s), ref["grads"], paths=flat(trainable).keys())


def test_loss_row_budget():
  assert loss_row_budget(40, 8, 8, 16) == CAP
  assert loss_row_budget(384, 4, 4, 256) == 128  # the bench's rows: 128 text tokens after 256 placeholders
  assert loss_row_budget(1200, 16, 8, 576) == 48  # two images per row (336 px)
  assert loss_row_budget(700, 16, 8, 576) == 8  # more placeholders than positions: at least 1, rounded up
  assert loss_row_budget(48, 8, 16, 16) == 48  # fewer image slots than rows: no compaction
  assert loss_row_budget(45, 4, 4, 16) == 32 and loss_row_budget(45, 4, 4, 16, multiple=64) == 45


def test_compacted_loss_matches_transformers(setup):
  """Every row fits the budget: logits at CB·24 positions instead of CB·40, same loss, accuracy and grads."""
  batch = compact_batch(setup.config, 20)
  ref = hf_reference(setup.model, setup.config, batch)
  assert ref["sup"].sum(1).max() <= CAP
  m, s, lowered = one_step(setup.config, setup.params, batch, (1, 1, 1), 1, STAGE2)
  assert int(m["logit_positions"]) == CB * CAP
  assert_matches_hf(ref, m, s, STAGE2)
  assert "stablehlo.case" in lowered  # the fallback branch exists


def test_compaction_falls_back_per_micro_batch(setup):
  """A text-only row with 30 supervised tokens (> 24) in micro-batch 1 of 2: that micro-batch computes all CT
  positions, the other compacts. Everything trainable (the vision vjp path), chunked loss (5), sharded."""
  batch = compact_batch(setup.config, 21, long_text_row=7)
  ref = hf_reference(setup.model, setup.config, batch)
  assert ref["sup"][7].sum() > CAP and ref["sup"][0::2].sum(1).max() <= CAP
  m, s, _ = one_step(setup.config, setup.params, batch, (2, 2, 2), 2, ".*", freeze=None, chunk=5)
  assert int(m["logit_positions"]) == (CB // 2) * CAP + (CB // 2) * CT
  assert_matches_hf(ref, m, s, ".*", freeze=None)
  assert np.abs(flat(grads_of(s))["vision_tower/encoder/layers/mlp/fc1/kernel"]).max() > 0


def test_compacted_frozen_head_chunked_micro_batches(setup):
  """Stage 1 (lm_head frozen: only d hidden is formed) with 2 micro-batches and chunks of 8 on a (1, 2, 2) mesh."""
  batch = compact_batch(setup.config, 22)
  ref = hf_reference(setup.model, setup.config, batch)
  m, s, _ = one_step(setup.config, setup.params, batch, (1, 2, 2), 2, STAGE1, chunk=8)
  assert int(m["logit_positions"]) == CB * CAP
  assert_matches_hf(ref, m, s, STAGE1)


def test_text_only_batch_has_no_branch(setup):
  batch = compact_batch(setup.config, 23)
  batch = dict(batch, input_ids=np.where(batch["input_ids"] == setup.config.image_token_index, 5,
                                         batch["input_ids"]))
  del batch["pixel_values"], batch["image_valid"]
  ref = hf_reference(setup.model, setup.config, dict(batch, pixel_values=np.zeros((0, 28, 28, 3), np.float32),
                                                     image_valid=np.zeros(0, bool)))
  m, s, lowered = one_step(setup.config, setup.params, batch, (1, 1, 1), 1, STAGE2)
  assert int(m["logit_positions"]) == CB * CT
  assert_matches_hf(ref, m, s, STAGE2)
  assert "stablehlo.case" not in lowered


def test_tied_embeddings_compacted():
  """Tied head: the embedding table's gradient sums the lookup's and the logits' parts."""
  model = fixtures.tiny_hf_llava(seed=4, text=dict(tie_word_embeddings=True))
  config = fixtures.llava_config_from_hf_model(model, scan_layers=True)
  assert config.text.tie_word_embeddings
  params = fixtures.llava_params_from_hf_model(model, config)
  batch = compact_batch(config, 24)
  ref = hf_reference(model, config, batch)
  m, s, _ = one_step(config, params, batch, (2, 1, 1), 1, STAGE2, chunk=16)
  assert int(m["logit_positions"]) == CB * CAP
  assert_matches_hf(ref, m, s, STAGE2)


def test_accuracy_counts_ties_for_the_max():
  """correct = target logit ≥ max logit (one reduction shared with logsumexp): argmax except on exact ties."""
  logits = jnp.array([[[1.0, 3.0, 3.0, 0.0], [0.5, 2.0, 1.0, -1.0], [4.0, 1.0, 2.0, 0.0]]])
  targets = jnp.array([[2, 1, 3]])
  weights = jnp.array([[True, True, True]])
  ce, correct = token_stats(logits, targets, weights)
  assert float(correct) == 2.0  # the tie (index 2 ties the max, argmax would say 1) and the plain hit
  want = torch.nn.functional.cross_entropy(torch.tensor(np.asarray(logits[0])), torch.tensor([2, 1, 3]),
                                           reduction="sum")
  np.testing.assert_allclose(float(ce), want.item(), rtol=1e-6)
  ce_w, correct_w = token_stats(logits, targets, jnp.array([[False, True, False]]))
  assert float(correct_w) == 1.0
