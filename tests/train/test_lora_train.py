"""LoRA training: only adapters + projector get gradients and optimizer state, and one step equals PyTorch (a
PEFT model with the same adapter, backward, then torch.optim.AdamW with the reference's two learning rates);
an 8-device sharded LoRA step (with dropout) equals the single-device one; a tiny two-stage run (full stage,
then LoRA from its params) learns and leaves the base weights untouched."""
import os

import numpy as np
import optax
import pytest
import torch

import jax
from flax import traverse_util

from llava_jax import export_hf, parallel, recipes
from llava_jax.checkpoints import peft as peft_io
from llava_jax.checkpoints.orbax_params import restore_params
from llava_jax.train import loop, optim
from llava_jax.train.metrics import read_metrics
from llava_jax.train.state import create_train_state
from llava_jax.train.step import make_train_step
from tests import fixtures
from tests.train.test_step import FAST, make_batch

peft = pytest.importorskip("peft")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LR, PROJECTOR_LR, WD = 2e-3, 2e-4, 0.1
OPT = optim.make_optimizer(learning_rate=LR, total_steps=10, warmup_ratio=0.0, weight_decay=WD, max_grad_norm=None,
                           projector_learning_rate=PROJECTOR_LR)


def flat(tree):
  return {"/".join(map(str, p)): np.asarray(v) for p, v in traverse_util.flatten_dict(tree).items()}


def adam_grads(opt_state):
  """Gradients of the first step, mu / (1 − β1), merged over the optimizer's parameter groups."""
  out = {}
  states = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
  for s in states:
    if isinstance(s, optax.ScaleByAdamState):
      for path, v in traverse_util.flatten_dict(s.mu).items():
        if not isinstance(v, optax.MaskedNode):  # the other group's leaves
          out["/".join(path)] = np.asarray(v) / (1 - 0.9)
  return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  torch.manual_seed(7)
  pm = peft.get_peft_model(fixtures.tiny_hf_llava(seed=3), peft.LoraConfig(
      r=4, lora_alpha=12, lora_dropout=0.0, target_modules=LLM_TARGETS, init_lora_weights=False))
  d = str(tmp_path_factory.mktemp("adapter"))
  pm.save_pretrained(d)
  base = fixtures.tiny_hf_llava(seed=3)
  config = fixtures.llava_config_from_hf_model(base, scan_layers=True)
  lconfig, lparams = peft_io.import_peft_adapter(d, config, fixtures.llava_params_from_hf_model(base, config))
  return pm, lconfig, lparams, make_batch(config, 10)


def torch_step(pm, batch):
  """PEFT model: loss backward with the reference's labels, then one torch AdamW step (adapters at LR, the
  projector at PROJECTOR_LR, no decay on biases). Returns (loss, {name: grad}, {name: new weight})."""
  for n, p in pm.named_parameters():
    p.requires_grad_("lora_" in n or "multi_modal_projector" in n)
  ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
  attn = torch.from_numpy((batch["segment_ids"] > 0).astype(np.int64))
  labels = torch.where(torch.from_numpy(batch["loss_mask"]) & (attn > 0), ids, torch.tensor(-100))
  pixels = torch.from_numpy(batch["pixel_values"][batch["image_valid"]].transpose(0, 3, 1, 2).copy())
  named = {n: p for n, p in pm.named_parameters() if p.requires_grad}
  groups = [dict(params=[p for n, p in named.items() if "lora_" in n], lr=LR, weight_decay=WD),
            dict(params=[p for n, p in named.items() if "projector" in n and n.endswith("weight")], lr=PROJECTOR_LR,
                 weight_decay=WD),
            dict(params=[p for n, p in named.items() if "projector" in n and n.endswith("bias")], lr=PROJECTOR_LR,
                 weight_decay=0.0)]
  opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
  loss = pm(input_ids=ids, pixel_values=pixels, attention_mask=attn, labels=labels).loss
  loss.backward()
  grads = {n: p.grad.detach().numpy().copy() for n, p in named.items()}
  opt.step()
  return loss.item(), grads, {n: p.detach().numpy().copy() for n, p in named.items()}


def ours_of(name, tree, layer_count):
  """A PEFT / transformers parameter name → the matching array of our (scanned) tree, torch layout."""
  if "multi_modal_projector" in name:
    lin, kind = name.split("multi_modal_projector.")[1].split(".")[:2]
    v = tree[f"multi_modal_projector/{lin}/{'kernel' if kind == 'weight' else 'bias'}"]
    return v.T if kind == "weight" else v
  parts = name.split(".")
  i = parts.index("layers")
  layer, block, mod, ab = int(parts[i + 1]), parts[i + 2], parts[i + 3], parts[i + 4]
  v = tree[f"language_model/layers/{block}/{mod}/{'lora_a' if ab == 'lora_A' else 'lora_b'}"]
  assert v.shape[0] == layer_count
  return v[layer].T


def test_one_lora_step_equals_peft_and_torch_adamw(setup):
  pm, lconfig, lparams, batch = setup
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  state = create_train_state(lconfig, OPT, mesh, 0, trainable_patterns=recipes.LORA_TRAINABLE, params=lparams)
  before = {**flat(state.params), **flat(state.frozen)}
  trainable_keys = set(flat(state.params))
  assert trainable_keys == {k for k in before if k.endswith(("lora_a", "lora_b")) or k.startswith("multi_modal")}
  assert len(trainable_keys) == 14 + 4
  # optimizer state mirrors exactly the trainable leaves (mu and nu of each, in its own group)
  opt_arrays = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  assert sum(x.size for x in opt_arrays) == 2 * sum(before[k].size for k in trainable_keys)

  step = make_train_step(lconfig, OPT, mesh, compiler_options=FAST)
  state, metrics = step(state, batch)
  metrics, state = jax.device_get(metrics), jax.device_get(state)
  loss, grads, new = torch_step(pm, batch)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=2e-6)
  np.testing.assert_allclose(metrics["learning_rate"], LR, rtol=1e-7)
  ours_g, ours_new = adam_grads(state.opt_state), flat(state.params)
  assert set(ours_g) == trainable_keys
  layers = lconfig.text.num_hidden_layers
  for n in grads:
    g = ours_of(n, ours_g, layers)
    scale = np.abs(grads[n]).max()
    assert scale > 0, n
    np.testing.assert_allclose(g, grads[n], rtol=0, atol=2e-4 * scale, err_msg=n)
    lr = PROJECTOR_LR if "projector" in n else LR
    step_size = np.abs(ours_of(n, ours_new, layers) - ours_of(n, before, layers)).max()
    assert lr * 0.5 < step_size < lr * 1.5, (n, step_size)  # each group moves at its own rate
    np.testing.assert_allclose(ours_of(n, ours_new, layers), new[n], rtol=0, atol=0.02 * lr, err_msg=n)
  for k, v in flat(state.frozen).items():  # base decoder and CLIP: untouched
    np.testing.assert_array_equal(v, before[k], err_msg=k)


def run_steps(config, params, batches, shape, k):
  mesh = parallel.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
  state = create_train_state(config, OPT, mesh, 0, trainable_patterns=recipes.LORA_TRAINABLE, params=params)
  step = make_train_step(config, OPT, mesh, micro_batches=k, compiler_options=FAST)
  out = []
  for b in batches:
    state, metrics = step(state, b)
    out.append(jax.device_get(metrics))
  return out, jax.device_get(state)


def test_sharded_lora_step_with_dropout_equals_single_device(setup):
  _, lconfig, lparams, batch = setup
  dconfig = lconfig.with_runtime(lora=lconfig.runtime.lora.__class__(
      rank=4, alpha=12.0, dropout=0.2, target=lconfig.runtime.lora.target))
  batches = [batch, make_batch(lconfig, 11)]
  m1, s1 = run_steps(dconfig, lparams, batches, (1, 1, 1), 2)
  m8, s8 = run_steps(dconfig, lparams, batches, (2, 2, 2), 2)
  m0, _ = run_steps(lconfig, lparams, batches[:1], (1, 1, 1), 2)
  assert abs(float(m1[0]["loss"]) - float(m0[0]["loss"])) > 1e-4  # dropout is on in the step
  for a, b in zip(m8, m1):
    for name in ("loss", "grad_norm", "accuracy"):
      np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)
  fa, fb = flat(s8.params), flat(s1.params)
  assert fa.keys() == fb.keys()
  for p in fa:
    np.testing.assert_allclose(fa[p], fb[p], rtol=0, atol=5e-3 * LR, err_msg=p)


def load_tiny(arg=""):
  return fixtures.load_config("tiny", arg or None)


@pytest.fixture(scope="module")
def full_stage(tmp_path_factory):
  """Stage A: configs/tiny.py, a full fine-tune of 2 steps."""
  full = load_tiny()
  full.eval.synthetic_samples = 0
  full.train.num_steps = 2
  return loop.train(full, str(tmp_path_factory.mktemp("a")))


def test_lora_run_from_a_pretrained_dir_gets_fresh_adapters(full_stage, tmp_path):
  """init.pretrained (a llava-hf export of stage A) under configs/tiny.py:lora: the loaded config keeps the LoRA
  runtime, the params are the checkpoint's, and the train state adds PEFT-initialized adapters (B = 0)."""
  a = full_stage
  out = export_hf(a.model_config, a.state.full_params(), str(tmp_path / "hf"))
  lora = load_tiny("lora")
  lora.init.pretrained = out
  model_config = recipes.llava_config(lora.model)
  mesh = parallel.make_mesh((8, 1, 1))
  loaded_config, params = loop.initial_params(lora, model_config, mesh)
  assert loaded_config.runtime.lora == model_config.runtime.lora and not any("lora" in k for k in flat(params))
  state = create_train_state(loaded_config, OPT, mesh, 0, trainable_patterns=recipes.LORA_TRAINABLE, params=params)
  got, want = flat(state.full_params()), flat(a.state.full_params())
  assert set(got) - set(want) == {k for k in got if "lora_" in k} and len(set(got) - set(want)) == 14
  for k in got:
    if k.endswith("lora_b"):
      assert not np.any(got[k]), k
    elif k.endswith("lora_a"):
      assert np.any(got[k]), k
    else:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_tiny_lora_run_after_a_full_stage_learns(full_stage, tmp_path):
  """configs/tiny.py:lora from stage A's params: fresh adapters are added to the restored base weights, the loss
  goes down, and the saved params keep stage A's base weights exactly."""
  a = full_stage
  lora = load_tiny("lora")
  lora.eval.synthetic_samples = 0
  lora.train.update(num_steps=10, learning_rate=1e-2, mm_projector_lr=1e-3, warmup_ratio=0.0, checkpoint_every=100)
  lora.init.from_workdir = a.workdir
  b = loop.train(lora, str(tmp_path / "b"), tokenizer_workdir=a.workdir)
  rows = read_metrics(b.workdir)
  assert rows[-1]["step"] == 10 and rows[-1]["loss"] < rows[0]["loss"] - 0.05, (rows[0], rows[-1])
  pa = flat(restore_params(os.path.join(a.workdir, loop.PARAMS_DIR)))
  pb = flat(restore_params(os.path.join(b.workdir, loop.PARAMS_DIR)))
  assert set(pb) - set(pa) == {k for k in pb if k.endswith(("lora_a", "lora_b"))} and len(set(pb) - set(pa)) == 14
  for k, v in pa.items():
    if k.startswith("multi_modal_projector"):
      assert not np.array_equal(pb[k], v), k
    else:
      np.testing.assert_array_equal(pb[k], v, err_msg=k)
