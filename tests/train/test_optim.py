"""Optimizer pieces against their PyTorch / transformers references; the trainable/frozen split."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from llava_jax.train import optim
from llava_jax.train.state import merge_params, split_params, trainable_paths
from tests import fixtures


@pytest.mark.parametrize("total,ratio", [(100, 0.03), (10, 0.0), (7, 0.5), (33, 0.1)])
def test_schedule_matches_transformers(total, ratio):
  from types import SimpleNamespace
  from transformers import TrainingArguments, get_cosine_schedule_with_warmup
  # HF's own rule (a TrainingArguments instance needs `accelerate`; the method only reads warmup_steps)
  warm = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=ratio), total)
  assert optim.warmup_steps(total, ratio) == warm
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.AdamW([p], lr=2e-3)
  sched = get_cosine_schedule_with_warmup(opt, warm, total)
  ref = []
  for _ in range(total):  # the rate update i uses, as HF Trainer steps: optimizer.step() then scheduler.step()
    ref.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
  ours = np.asarray(jax.vmap(optim.make_schedule(2e-3, total, ratio))(jnp.arange(total)))
  # float32 (what training uses) vs HF's float64 python math: near the end 1 + cos(πp) cancels, so the
  # tolerance is relative to the peak rate
  np.testing.assert_allclose(ours, np.asarray(ref), rtol=1e-6, atol=1e-7 * 2e-3)
  if warm:
    assert ref[0] == 0.0 and ours[0] == 0.0  # HF's first update really uses lr 0


def _torch_reference(params, grads_seq, *, lr, total, ratio, wd, clip, decay):
  """HF Trainer's optimizer on the same tensors: AdamW param groups (decay / no decay), cosine LambdaLR, clipping."""
  from transformers import get_cosine_schedule_with_warmup
  tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
  groups = [dict(params=[tp[k] for k in tp if decay[k]], weight_decay=wd),
            dict(params=[tp[k] for k in tp if not decay[k]], weight_decay=0.0)]
  opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
  sched = get_cosine_schedule_with_warmup(opt, optim.warmup_steps(total, ratio), total)
  history = []
  for grads in grads_seq:
    for k in tp:
      tp[k].grad = torch.tensor(grads[k])
    torch.nn.utils.clip_grad_norm_(list(tp.values()), clip)
    opt.step()
    sched.step()
    history.append({k: v.detach().numpy().copy() for k, v in tp.items()})
  return history


def test_adamw_clip_schedule_match_torch():
  rs = np.random.RandomState(0)
  flat = {"proj/kernel": rs.randn(4, 3), "proj/bias": rs.randn(3), "norm/scale": 1 + rs.randn(3),
          "embed_tokens/embedding": rs.randn(5, 3)}
  flat = {k: v.astype(np.float32) for k, v in flat.items()}
  # gradient norms around the clip threshold: some steps are clipped, some not
  grads_seq = [{k: (rs.randn(*v.shape) * s).astype(np.float32) for k, v in flat.items()}
               for s in (0.05, 2.0, 0.1, 3.0, 0.02, 1.0)]
  decay = {k: optim.decays(k) for k in flat}
  assert decay == {"proj/kernel": True, "proj/bias": False, "norm/scale": False, "embed_tokens/embedding": True}
  kw = dict(lr=1e-2, total=10, ratio=0.2, wd=0.1, clip=1.0)
  ref = _torch_reference(flat, grads_seq, decay=decay, **kw)

  nest = lambda d: traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in d.items()}, sep="/")
  opt = optim.make_optimizer(learning_rate=kw["lr"], total_steps=kw["total"], warmup_ratio=kw["ratio"],
                             weight_decay=kw["wd"], max_grad_norm=kw["clip"])
  params = nest(flat)
  state = opt.init(params)
  update = jax.jit(opt.update)
  for i, grads in enumerate(grads_seq):
    updates, state = update(nest(grads), state, params)
    params = optax.apply_updates(params, updates)
    for k, want in ref[i].items():
      a, b = k.split("/")
      np.testing.assert_allclose(np.asarray(params[a][b]), want, atol=1e-6, rtol=0, err_msg=f"step {i} {k}")
  # the run moved the weights (lr(0) = 0 during warmup, later steps are real updates)
  assert np.abs(ref[-1]["proj/kernel"] - flat["proj/kernel"]).max() > 1e-3


def test_weight_decay_mask_matches_hf_trainer():
  from types import SimpleNamespace
  from transformers import Trainer
  model = fixtures.tiny_hf_llava()
  hf_decay = set(Trainer.get_decay_parameter_names(None, model))
  # every tensor filled with HF's verdict (1 = decayed), converted to our tree by the checkpoint key tables
  verdict = {n: torch.full(p.shape, float(n in hf_decay)) for n, p in model.named_parameters()}
  for scan in (False, True):
    config = fixtures.llava_config_from_hf_model(model, scan_layers=scan)
    tree = fixtures.llava_params_from_hf_model(SimpleNamespace(state_dict=lambda: verdict), config)
    mask = optim.weight_decay_mask(tree)
    flat_tree, flat_mask = traverse_util.flatten_dict(tree, sep="/"), traverse_util.flatten_dict(mask, sep="/")
    assert set(flat_tree) == set(flat_mask)
    for path, x in flat_tree.items():
      assert np.all(x == x.flat[0]), path
      assert flat_mask[path] == bool(x.flat[0]), (path, flat_mask[path])
    assert {bool(x.flat[0]) for x in flat_tree.values()} == {True, False}
  assert flat_mask["language_model/embed_tokens/embedding"] is True  # HF decays embeddings
  assert flat_mask["language_model/layers/input_layernorm/scale"] is False
  assert flat_mask["vision_tower/encoder/layers/self_attn/q_proj/bias"] is False


def test_split_and_merge_by_patterns():
  tree = {"vision_tower": {"a": {"kernel": 1}}, "multi_modal_projector": {"linear_1": {"kernel": 2, "bias": 3}},
          "language_model": {"norm": {"scale": 4}, "lm_head": {"kernel": 5}}}
  t1, f1 = split_params(tree, r"multi_modal_projector/.*")
  assert t1 == {"multi_modal_projector": tree["multi_modal_projector"]}
  assert set(f1) == {"vision_tower", "language_model"}
  assert merge_params(t1, f1) == tree
  t2, f2 = split_params(tree, [r"multi_modal_projector/.*", r"language_model/.*"])
  assert set(t2) == {"multi_modal_projector", "language_model"} and set(f2) == {"vision_tower"}
  # the vision tower stays frozen unless asked for explicitly
  t3, f3 = split_params(tree, ".*")
  assert "vision_tower" not in t3 and f3 == {"vision_tower": tree["vision_tower"]}
  t4, f4 = split_params(tree, ".*", freeze=None)
  assert t4 == tree and f4 == {}
  # full-match semantics: a prefix alone does not match
  assert trainable_paths(tree, "language_model/lm_head/.*") == ["language_model/lm_head/kernel"]
  with pytest.raises(ValueError, match=r"match no parameter.*top-level subtrees"):
    split_params(tree, "language_model")
  with pytest.raises(ValueError, match="freeze=None"):
    split_params(tree, r"vision_tower/.*")
  with pytest.raises(ValueError, match="both trainable and frozen"):
    merge_params(t1, tree)
