"""QLoRA training (train/qlora.py): LoRA adapters on a frozen, quantized decoder.

The oracle is LoRA training on the dequantized base, the function a QLoRA model computes (the LoRA step itself is
checked against PEFT + torch AdamW in test_lora_train.py): the same adapters and batches give the same losses,
gradients and updates; only adapters + projector get gradients and optimizer state; the quantized leaves never
change; a checkpoint restores and resumes exactly; 8 sharded devices (with remat, micro-batches, dropout) equal
one; float starting weights (a float run's params, a llava-hf directory) are quantized as they load; the merged
export is the dequantized base plus the adapters, which transformers reloads with our logits."""
import os

import numpy as np
import pytest

import jax
from flax import traverse_util

from llava_jax import parallel, recipes
from llava_jax.checkpoints.export import export_hf
from llava_jax.models.quant import dequantize_params
from llava_jax.config import LoraConfig
from llava_jax.infer.loading import load_for_inference
from llava_jax.models import quant
from llava_jax.models.llava import init_params
from llava_jax.train import checkpointing, loop, optim
from llava_jax.train.metrics import read_metrics
from llava_jax.train.state import abstract_train_state, create_train_state
from llava_jax.train.step import make_train_step
from tests import fixtures
from tests.fixtures import hf_checkpoints as H
from tests.train.test_lora_train import full_stage, load_tiny  # noqa: F401  (module fixture: a float tiny run)
from tests.train.test_step import FAST, make_batch

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
TEXT = dict(hidden_size=128, intermediate_size=256)  # in / 64 ≥ 2: 4-bit group axes shard over fsdp = 2
OPT = optim.make_optimizer(learning_rate=2e-3, total_steps=10, warmup_ratio=0.0, weight_decay=0.1,
                           max_grad_norm=1.0, projector_learning_rate=2e-4)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def flat(tree):
  return {"/".join(map(str, p)): np.array(v) for p, v in traverse_util.flatten_dict(tree).items()}


def leaves(state):
  """Every leaf of a TrainState (params, frozen, opt_state, step, rng) by its key path, as numpy."""
  return {jax.tree_util.keystr(p): np.array(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def single_mesh():
  return parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def base():
  """(LoRA config, float params with adapters): a tiny transformers LLaVA's weights and adapters whose B is
  non-zero (so every adapter leaf has a gradient), and two batches."""
  hf = fixtures.tiny_hf_llava(seed=5, text=TEXT)
  config = fixtures.llava_config_from_hf_model(hf, scan_layers=True).with_runtime(lora=LORA)
  params = traverse_util.flatten_dict(fixtures.llava_params_from_hf_model(hf, config))
  rs = np.random.RandomState(1)
  for p, v in traverse_util.flatten_dict(init_params(config, jax.random.key(0))).items():
    if p[-1] == "lora_a":
      params[p] = np.asarray(v)
    elif p[-1] == "lora_b":
      params[p] = (0.05 * rs.randn(*v.shape)).astype(np.float32)
  return config, traverse_util.unflatten_dict(params), [make_batch(config, 3), make_batch(config, 4)]


def run(config, params, batches, mesh, k=1):
  state = create_train_state(config, OPT, mesh, 0, trainable_patterns=recipes.LORA_TRAINABLE, params=params)
  step = make_train_step(config, OPT, mesh, micro_batches=k, compiler_options=FAST)
  metrics = []
  for b in batches:
    state, m = step(state, b)
    metrics.append(jax.device_get(m))
  return metrics, state, step


def optimizer_arrays(state):
  return [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_qlora_steps_equal_lora_steps_on_the_dequantized_base(base, mode):
  config, params, batches = base
  qconfig = config.with_runtime(quantize=mode)
  mesh = single_mesh()
  qstate = create_train_state(qconfig, OPT, mesh, 0, trainable_patterns=recipes.LORA_TRAINABLE, params=params)
  trainable, frozen = flat(qstate.params), flat(qstate.frozen)
  # the float base was quantized: every decoder target holds kernel_q (int8 / packed uint8) + scale, no kernel
  codes = {k: v for k, v in frozen.items() if k.endswith("kernel_q")}
  assert len(codes) == 7 and all(v.dtype == (np.int8 if mode == "int8" else np.uint8) for v in codes.values())
  assert not any(k.startswith("language_model") and k.endswith(f"{t}/kernel") for k in frozen for t in TARGETS)
  # only adapters + projector train; optimizer state = AdamW's mu and nu of exactly those, nothing else
  assert set(trainable) == {k for k in {**trainable, **frozen}
                            if k.endswith(("lora_a", "lora_b")) or k.startswith("multi_modal_projector")}
  opt = optimizer_arrays(qstate)
  assert all(np.issubdtype(x.dtype, np.floating) for x in opt)
  assert sum(x.nbytes for x in opt) == 2 * sum(v.nbytes for v in trainable.values())

  # the oracle: LoRA on the dequantized base, same adapters and projector
  qparams = jax.device_get(qstate.full_params())  # host copies: the steps below donate their states
  deq = dequantize_params(qparams, mode)
  assert not any(np.issubdtype(x.dtype, np.integer) for x in jax.tree.leaves(deq))
  m_q, s_q, _ = run(qconfig, qparams, batches, mesh)
  m_l, s_l, _ = run(config, deq, batches, mesh)
  for a, b in zip(m_q, m_l):
    for name in ("loss", "grad_norm", "accuracy"):
      np.testing.assert_allclose(a[name], b[name], rtol=1e-6, err_msg=name)
  got, want = flat(s_q.params), flat(s_l.params)
  for k in want:
    moved = np.abs(want[k] - trainable[k]).max()
    assert moved > 0, k  # every adapter and projector leaf was updated
    # a 4-bit kernel is two dots (even / odd rows, models/quant.py): a float32 summation order other than the
    # oracle's one dot, and Adam's normalization lifts ~1e-7 gradient differences of near-zero gradients to a
    # visible part of a step; so 99.9 % of the entries agree to 1e-4 of the step and all of them to 1 %
    err = np.abs(got[k] - want[k])
    assert np.quantile(err, 0.999) <= 1e-4 * moved and err.max() <= 1e-2 * moved, (k, err.max() / moved)
  after = flat(s_q.frozen)
  for k, v in frozen.items():  # the quantized base (and CLIP, embeddings, norms, lm_head): bit-identical
    assert after[k].dtype == v.dtype, k
    np.testing.assert_array_equal(after[k], v, err_msg=k)


def test_quantized_leaves_never_train_whatever_the_patterns(base):
  """Even `.*` with nothing frozen leaves every quantized leaf out of the trainable set and the optimizer."""
  config, _, _ = base
  qconfig = config.with_runtime(quantize="nf4")
  mesh = single_mesh()
  for patterns, freeze in ((r".*", None), (recipes.STAGE2_TRAINABLE, r"vision_tower/.*")):
    a = abstract_train_state(qconfig, OPT, mesh, trainable_patterns=patterns, freeze=freeze)
    trainable = traverse_util.flatten_dict(a.params)
    assert trainable and not any(p[-1] in ("kernel_q", "kernel_scale") for p in trainable)
    assert all(np.issubdtype(x.dtype, np.floating) for x in jax.tree.leaves(a.opt_state) if x.ndim)
    frozen = traverse_util.flatten_dict(a.frozen)
    assert sum(p[-1] == "kernel_q" for p in frozen) == 7
    assert ("language_model", "norm", "scale") in trainable  # the float leaves the pattern names still train


def test_sharded_qlora_with_remat_microbatches_and_dropout_equals_one_device(base):
  config, params, batches = base
  qconfig = config.with_runtime(quantize="nf4", remat_policy="full",
                                lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1))
  m1, s1, _ = run(qconfig, params, batches, single_mesh(), k=2)
  m8, s8, _ = run(qconfig, params, batches, parallel.make_mesh((2, 2, 2)), k=2)
  q = s8.frozen["language_model"]["layers"]["mlp"]["down_proj"]["kernel_q"]
  assert len(q.sharding.device_set) == 8 and {"fsdp", "tensor"} <= set(jax.tree.leaves(tuple(q.sharding.spec)))
  for a, b in zip(m8, m1):
    for name in ("loss", "grad_norm", "accuracy"):
      np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)
  fa, fb = flat(s8.params), flat(s1.params)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], rtol=0, atol=1e-5, err_msg=k)
  ga, gb = flat(s8.frozen), flat(s1.frozen)
  for k in ga:
    np.testing.assert_array_equal(ga[k], gb[k], err_msg=k)


def test_checkpoint_restore_resumes_the_same_next_step(base, tmp_path):
  config, params, batches = base
  qconfig = config.with_runtime(quantize="nf4")
  mesh = parallel.make_mesh((2, 2, 2))
  _, state, step = run(qconfig, params, batches[:1], mesh)
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state, force=True)
  ckpt.wait()
  abstract = abstract_train_state(qconfig, OPT, mesh, trainable_patterns=recipes.LORA_TRAINABLE)
  restored, _, _ = ckpt.restore(1, abstract)
  ckpt.close()
  want, got = leaves(state), leaves(restored)
  assert want.keys() == got.keys()
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert any(v.dtype == np.uint8 for v in got.values())
  s_a, m_a = step(state, batches[1])
  s_b, m_b = step(restored, batches[1])
  np.testing.assert_array_equal(jax.device_get(m_a)["loss"], jax.device_get(m_b)["loss"])
  a, b = leaves(s_a), leaves(s_b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_merged_export_of_a_qlora_model_is_its_dequantized_function(base, tmp_path):
  """export_hf of a QLoRA model writes deq(W_q) + (alpha / r)·A·B: transformers reloads it with our logits; the
  PEFT adapter export on the dequantized base gives them too."""
  import transformers
  config, params, _ = base
  qconfig = config.with_runtime(quantize="nf4")  # adapters with B ≠ 0 (the fixture's), the base quantized
  state = create_train_state(qconfig, OPT, single_mesh(), 0, trainable_patterns=recipes.LORA_TRAINABLE,
                             params=params)
  qparams = jax.device_get(state.full_params())
  out = export_hf(qconfig, qparams, str(tmp_path / "merged"))
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  assert not any("lora" in k for k in reloaded.state_dict())
  ids, mask, pixels = H.inputs(qconfig.num_image_tokens)
  ours = H.our_logits(qconfig, qparams, ids, mask, pixels)
  H.assert_logits_close(H.reference_logits(reloaded, ids, mask, pixels), ours, mask)
  float_ours = H.our_logits(config, params, ids, mask, pixels)  # the unquantized model differs: NF4 is lossy
  assert np.abs(float_ours - ours)[mask.astype(bool)].max() > 1e-3
  # the adapter alone in PEFT's format, on the dequantized base exported without it: PeftModel = our logits
  peft = pytest.importorskip("peft")
  from llava_jax.checkpoints.peft import export_peft_adapter
  from llava_jax.models.lora import strip_lora
  base_dir = export_hf(qconfig.with_runtime(lora=None), strip_lora(qparams), str(tmp_path / "base"))
  adapter = export_peft_adapter(qconfig, qparams, str(tmp_path / "adapter"))
  pm = peft.PeftModel.from_pretrained(transformers.LlavaForConditionalGeneration.from_pretrained(base_dir), adapter)
  H.assert_logits_close(H.reference_logits(pm.eval(), ids, mask, pixels), ours, mask)


def test_tiny_qlora_run_from_a_float_stage_learns_and_resumes(full_stage, tmp_path):  # noqa: F811
  """configs/tiny.py:qlora with init.from_workdir = a float run: the float kernels are quantized on the host
  (kernel_q = quantize_kernel of the run's kernels), the loss goes down, the saved params keep the quantized base
  and the float leaves but the projector; a longer rerun resumes from the checkpoint with the int leaves; the
  inference loader reads the finished run's quantized params as they are."""
  a = full_stage
  cfg = load_tiny("qlora")
  assert cfg.model.runtime.quantize == "nf4"
  cfg.eval.synthetic_samples = 0
  cfg.train.update(num_steps=6, learning_rate=1e-2, mm_projector_lr=1e-3, warmup_ratio=0.0, checkpoint_every=3)
  cfg.init.from_workdir = a.workdir
  b = loop.train(cfg, str(tmp_path / "b"), tokenizer_workdir=a.workdir)
  rows = read_metrics(b.workdir)
  assert rows[-1]["step"] == 6 and rows[-1]["loss"] < rows[0]["loss"] - 0.05, (rows[0], rows[-1])
  pa = flat(a.state.full_params())
  pb = flat(b.state.full_params())
  for k, v in pa.items():
    parent = k.rsplit("/", 1)[0]
    if quant.is_quantized_path(tuple(k.split("/"))):
      want = quant.quantize_kernel(v, "nf4")
      for name in ("kernel_q", "kernel_scale"):
        np.testing.assert_array_equal(pb[f"{parent}/{name}"], want[name], err_msg=k)
    elif not k.startswith("multi_modal_projector"):
      np.testing.assert_array_equal(pb[k], v, err_msg=k)
  cfg.train.num_steps = 8  # rerun: resumes at step 6 from the checkpoint (int leaves restored), trains 2 more
  c = loop.train(cfg, str(tmp_path / "b"), tokenizer_workdir=a.workdir)
  assert c.steps == 8 and [r["step"] for r in read_metrics(c.workdir)][-2:] == [7, 8]
  pc = flat(c.state.frozen)
  for k, v in flat(b.state.frozen).items():
    np.testing.assert_array_equal(pc[k], v, err_msg=k)
  # chat / eval load the finished run's (already quantized) params as they are
  model = load_for_inference(cfg, workdir=a.workdir, checkpoint=os.path.join(c.workdir, loop.PARAMS_DIR))
  assert model.config.runtime.quantize == "nf4"
  got = flat(model.params)
  for k, v in flat(c.state.full_params()).items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_qlora_from_a_llava_hf_dir_quantizes_on_load(full_stage, tmp_path):  # noqa: F811
  """init.pretrained (a llava-hf export of the float run) under configs/tiny.py:qlora: the params arrive with
  the decoder kernels quantized (hf.load_pretrained) and the train state adds fresh adapters."""
  a = full_stage
  out = export_hf(a.model_config, a.state.full_params(), str(tmp_path / "hf"))
  cfg = load_tiny("qlora")
  cfg.init.pretrained = out
  model_config = recipes.llava_config(cfg.model)
  mesh = parallel.make_mesh((8, 1, 1))
  loaded_config, params = loop.initial_params(cfg, model_config, mesh)
  assert loaded_config.runtime.quantize == "nf4" and loaded_config.runtime.lora == model_config.runtime.lora
  state = create_train_state(loaded_config, OPT, mesh, 0, trainable_patterns=recipes.LORA_TRAINABLE, params=params)
  got, want = flat(state.full_params()), flat(a.state.full_params())
  for k, v in want.items():
    if quant.is_quantized_path(tuple(k.split("/"))):
      np.testing.assert_array_equal(got[k.replace("/kernel", "/kernel_q")], quant.quantize_kernel(v, "nf4")["kernel_q"])
    else:
      np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert sum(k.endswith("lora_b") and not np.any(v) for k, v in got.items()) == 7


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_v15_qlora_config_is_finetune_lora_with_bits_4_and_shards_on_8_devices(size):
  """configs/v15_qlora.py: finetune_lora.sh's values with the decoder in NF4; its abstract train state (no
  allocation) on 8 devices (the config's mesh: fsdp over all) has every leaf divisible by its sharding, gradients
  and optimizer state for the adapters + projector only, and 0.5 + 4/64 bytes per quantized decoder weight."""
  c = fixtures.load_config("v15_qlora", size)
  lora = c.model.runtime.lora
  assert (lora.rank, lora.alpha, lora.dropout, c.model.runtime.quantize) == (128, 256.0, 0.05, "nf4")
  assert (c.train.learning_rate, c.train.mm_projector_lr, c.train.global_batch_size) == (2e-4, 2e-5, 128)
  assert c.model.runtime.dtype == "bfloat16" and c.train.trainable == recipes.LORA_TRAINABLE
  config = recipes.llava_config(c.model)
  mesh = parallel.make_mesh(tuple(c.mesh))
  assert mesh.shape["fsdp"] == 8
  a = abstract_train_state(config, optim.optimizer_from_config(c.train, 100), mesh,
                           trainable_patterns=c.train.trainable, freeze=c.train.freeze)
  for x in jax.tree.leaves(a):
    x.sharding.shard_shape(x.shape)  # raises when a sharded axis does not divide
  trainable = traverse_util.flatten_dict(a.params)
  assert all(p[-1] in ("lora_a", "lora_b") or p[0] == "multi_modal_projector" for p in trainable)
  nbytes = lambda xs: sum(x.size * x.dtype.itemsize for x in xs)
  opt = [x for x in jax.tree.leaves(a.opt_state) if x.ndim]
  assert nbytes(opt) == 2 * nbytes(trainable.values())
  frozen = traverse_util.flatten_dict(a.frozen)
  quantized = [x for p, x in frozen.items() if p[-1] in ("kernel_q", "kernel_scale")]
  t = config.text
  weights = t.num_hidden_layers * (2 * t.hidden_size * t.hidden_size
                                   + 2 * t.hidden_size * t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
                                   + 3 * t.hidden_size * t.intermediate_size)
  assert nbytes(quantized) == weights * (0.5 + 4 / 64)
