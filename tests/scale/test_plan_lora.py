"""The plan with LoRA (and the state-first check and bisected micro-batch search it needs on one device): the
state it counts is the training's own (adapters + projector trainable, optimizer state for them only, the frozen
base in param_dtype), the report shows that split, and a state over the budget is said without compiling."""
import dataclasses
import importlib

import jax
import pytest

from llava_jax import recipes
from llava_jax.scale import Chip, Topology, plan
from llava_jax.scale.memory import Candidate, MemoryReport, measure_state
from tests.fixtures import load_config

plan_lib = importlib.import_module("llava_jax.scale.plan")  # the module (llava_jax.scale.plan is also the function)


def lora_trainable_count(config) -> int:
  """Adapters r·(in + out) on q, k, v, o, gate, up, down of every decoder layer, plus the mlp2x_gelu projector:
  counted from the architecture, not from our parameter tree."""
  mc = recipes.llava_config(config.model)
  t, r = mc.text, int(config.model.runtime.lora.rank)
  d, f, hd = t.hidden_size, t.intermediate_size, t.resolved_head_dim
  q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
  per_layer = r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
  v = mc.vision.hidden_size
  projector = v * d + d + d * d + d
  return t.num_hidden_layers * per_layer + projector


def all_params_count(config) -> int:
  from llava_jax.models.llava import init_params
  mc = recipes.llava_config(config.model)
  shapes = jax.eval_shape(lambda r: init_params(mc, r), jax.random.PRNGKey(0))
  return sum(x.size for x in jax.tree.leaves(shapes))


def test_lora_plan_counts_optimizer_state_for_the_trainable_only():
  """tiny:lora on 8 simulated devices (data parallel: every device holds the whole state)."""
  config = load_config("tiny", "lora")
  p = plan(config, "8xA100-80G", recipe="configs/tiny.py:lora", devices=jax.devices()[:8])
  assert p.fits, p.render()
  trainable = lora_trainable_count(config)
  assert p.trainable_params == trainable
  assert p.frozen_params == all_params_count(config) - trainable
  s = p.state
  assert s is not None and not s.compiled and s.error is None
  assert s.params == 4 * trainable  # float32 adapters + projector, replicated
  assert s.frozen == 4 * p.frozen_params  # the frozen base in param_dtype float32
  # AdamW mu and nu of the trainable leaves only (+ its step counts); nothing for the frozen base
  assert 2 * 4 * trainable <= s.optimizer < 2 * 4 * trainable + 64
  m = p.chosen.memory
  assert (m.params, m.frozen, m.optimizer) == (s.params, s.frozen, s.optimizer)  # the compiled step's state
  assert abs(m.arguments - (s.state + m.batch)) < 1 << 20
  # FLOPs: the base decoder counted frozen (only adapters and projector train), not fully trained
  from llava_jax.models import flops as flops_lib
  mc = recipes.llava_config(config.model)
  kw = dict(global_batch=8, seq_len=int(config.data.max_length), images=8, projector_trainable=True,
            remat_policy="none", attention_impl="xla")
  assert p.chosen.flops.model == flops_lib.step_flops(mc, decoder_trainable=False, **kw).model
  assert p.chosen.flops.model < flops_lib.step_flops(mc, decoder_trainable=True, **kw).model
  text = p.render()
  assert "state per device" in text and f"{trainable / 1e9:.3f} B params" in text
  assert "frozen" in text and "optimizer" in text


def test_state_over_the_budget_is_said_without_compiling(monkeypatch):
  config = load_config("tiny", "lora")
  compiled = []
  monkeypatch.setattr(plan_lib, "measure", lambda *a, **k: compiled.append(a) or pytest.fail("compiled"))
  toy = Topology("8xtoy", Chip("toy", "gpu", 1e12, 64 * 1024, "a 64 KiB test chip"), 8, 1)
  p = plan(config, toy, recipe="configs/tiny.py:lora", devices=jax.devices()[:8])
  assert not p.fits and p.state_exceeds_budget and not p.trials and not compiled
  assert p.state.state > p.budget_bytes
  text = p.render()
  assert "NOTHING FITS" in text and "the state alone" in text and "nothing compiled" in text


def _fake_measure(temporaries_at_one: int, state: MemoryReport):
  """A stand-in for compiling: temporaries halve as micro-batches double (what activations do)."""
  def fake(config, c, devices, **kw):
    temp = temporaries_at_one // c.micro_batches
    return dataclasses.replace(state, arguments=state.state, temporaries=temp, compiled=True,
                               compile_seconds=0.0)
  return fake


@pytest.mark.parametrize("fit_from", [4, 8, 2, None])
def test_micro_batch_ladder_is_bisected(monkeypatch, fit_from):
  """One device, 8 rows: after the recipe (1 micro-batch) the ladder 2, 4, 8 is bisected — the fewest
  micro-batches that fit, in at most 2 more compiles (the linear search took up to 3)."""
  config = load_config("tiny", "lora")
  config.model.runtime.update(attention_impl="chunked", remat_policy="full")
  config.train.chunked_loss = True
  c = Candidate(mesh=(1, 1, 1), remat_policy="full", attention_impl="chunked", micro_batches=1, chunked_loss=512)
  state = measure_state(config, c, jax.devices()[:1])
  one = 1 << 26
  monkeypatch.setattr(plan_lib, "measure", _fake_measure(one, state))
  # budget: between the totals at fit_from / 2 and fit_from micro-batches (None: below the 8-micro-batch total)
  k = fit_from or 16
  budget = state.state + one // k + (one // k) // 2
  toy = Topology("1xtoy", Chip("toy", "gpu", 1e12, budget / 0.9, "a test chip"), 1, 1)
  p = plan(config, toy, recipe="configs/tiny.py:lora", devices=jax.devices()[:1], temp_factor=1.0)
  tried = [tr.candidate.micro_batches for tr in p.trials]
  assert tried[0] == 1 and len(tried) <= 3
  if fit_from is None:
    assert not p.fits and tried == [1, 4, 8]
  else:
    assert p.fits and p.chosen.candidate.micro_batches == fit_from
    # every fewer-micro-batch setting on the ladder does not fit, as compiled or implied by one that did not
    assert all(not tr.fits for tr in p.trials if tr.candidate.micro_batches < fit_from)


@pytest.mark.skipif(not __import__("llava_jax.scale.tpu", fromlist=["x"]).libtpu_available(),
                    reason="libtpu is not installed (pip install -e '.[dev]')")
def test_lora_train_step_compiles_for_tpu():
  """tiny:lora's real train step, FSDP over a v5e 2x2 slice, on the TPU compiler: the compiler's arguments are
  exactly our state (tiled), and the optimizer state mirrors the adapters + projector only."""
  import numpy as np
  from llava_jax.scale import tpu as tpu_lib
  from llava_jax.scale.memory import _bytes_per_device, compile_step
  devices = tpu_lib.tpu_devices("v5e:2x2")
  config = load_config("tiny", "lora")
  c = Candidate(mesh=(1, 4, 1), remat_policy="full", attention_impl="xla", micro_batches=2, chunked_loss=512)
  compiled, state, batch = compile_step(config, c, devices)
  ma = compiled.memory_analysis()
  assert ma.argument_size_in_bytes == tpu_lib.tiled_bytes_per_device((state, batch), compiled.input_formats[0])
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  trainable = lora_trainable_count(config)
  assert count(state.params) == trainable
  assert count(state.frozen) == all_params_count(config) - trainable
  assert 2 * trainable <= count(state.opt_state) < 2 * trainable + 16  # mu, nu (+ step counts)
  assert _bytes_per_device(state.opt_state) <= 2 * _bytes_per_device(state.params) + 64
  leaves = ["/".join(str(getattr(k, "key", k)) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
  assert leaves and all(l.endswith(("lora_a", "lora_b")) or l.startswith("multi_modal_projector") for l in leaves)
  assert ma.alias_size_in_bytes == tpu_lib.tiled_bytes_per_device(state, compiled.input_formats[0][0])
  assert ma.temp_size_in_bytes > 0


def test_lora_step_flops_against_hand_count():
  """LoRA 7B: the base matmuls are frozen (forward + activation gradient: 4 FLOPs per weight and token), the
  adapters trained (6 per adapter weight and token), the attention core 3× its forward — not 6N of the base."""
  from llava_jax.models import flops as flops_lib
  config = load_config("v15_lora", "7b")
  cfg = recipes.llava_config(config.model)
  t = cfg.text
  d, f, layers, v, seq = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size, 2048
  tokens = 128 * seq
  base = layers * (4 * d * d + 3 * d * f) + d * v  # q, k, v, o, gate, up, down, lm_head
  projector = 1024 * d + d + d * d + d
  adapters = lora_trainable_count(config) - projector
  assert adapters == 32 * 128 * (8 * d + 3 * (d + f))
  want = tokens * (4 * base + 6 * adapters + 3 * layers * 4 * seq * d)
  got = flops_lib.step_flops(cfg, global_batch=128, seq_len=seq, images=0, decoder_trainable=False,
                             projector_trainable=True, remat_policy="none", attention_impl="xla", loss_elementwise=False)
  assert got.model == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_base_bytes_are_the_quantized_arrays(mode):
  """QLoRA (tiny:lora on a quantized base): the frozen bytes per device the plan counts are those of the arrays
  `quant.quantize_params` makes from a float checkpoint (kernel_q int8 / packed uint8 + float32 scales, the rest
  in param_dtype), and the parameter count is the float model's."""
  import numpy as np
  from flax import traverse_util
  from llava_jax.models import quant
  from llava_jax.models.llava import init_params
  from llava_jax.train.state import split_params
  config = load_config("tiny", "lora")
  float_params = jax.tree.map(np.asarray, init_params(recipes.llava_config(config.model), jax.random.PRNGKey(0)))
  quantized = quant.quantize_params(float_params, mode)
  trainable, frozen = split_params(quantized, config.train.trainable, config.train.freeze)
  want_frozen = sum(x.nbytes for x in jax.tree.leaves(frozen))
  kernels = [x for p, x in traverse_util.flatten_dict(frozen).items() if p[-1] == "kernel_q"]
  assert kernels and {x.dtype for x in kernels} == {np.dtype(np.int8 if mode == "int8" else np.uint8)}
  config.model.runtime.quantize = mode
  c = Candidate(mesh=(8, 1, 1), remat_policy="none", attention_impl="xla", micro_batches=1, chunked_loss=0)
  state = measure_state(config, c, jax.devices()[:8])  # data parallel: every device holds the whole state
  assert state.error is None
  assert state.frozen == want_frozen
  assert state.params == sum(x.nbytes for x in jax.tree.leaves(trainable)) == 4 * lora_trainable_count(config)
  assert 2 * state.params <= state.optimizer < 2 * state.params + 64
  # bytes per decoder weight: 1 (int8) or 0.5 (4-bit) plus the scales, against 4 for the float base
  n_q = sum(x.size * (1 if mode == "int8" else 2) for x in kernels)
  q_bytes = sum(x.nbytes for p, x in traverse_util.flatten_dict(frozen).items()
                if p[-1] in ("kernel_q", "kernel_scale"))
  per_weight = q_bytes / n_q
  assert per_weight == pytest.approx(1 + 4 / 64 if mode == "int8" else 0.5 + 4 / 64, rel=0.05)
  # the plan counts parameters, not stored bytes or scales
  p = plan_lib.plan(config, "8xA100-80G", devices=jax.devices()[:8], max_trials=0)
  assert p.frozen_params == all_params_count(load_config("tiny", "lora")) - lora_trainable_count(config)
  assert p.state.frozen == want_frozen
