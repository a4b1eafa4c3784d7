"""The memory / throughput plan: topologies, analytic FLOPs, the ahead-of-time compile of the real 7B stage-2
step on 8 simulated devices, 'nothing fits', and `--mode=plan` on the command line."""
import math
import os
import subprocess
import sys

import jax
import pytest

from llava_jax import recipes
from llava_jax.models import flops as flops_lib
from llava_jax.models.llava import abstract_params
from llava_jax.scale import Chip, Topology, get_topology, plan
from llava_jax.scale.hardware import GIB
from llava_jax.scale.plan import resolve_mesh
from llava_jax.train import loop
from llava_jax.train.state import split_params
from tests.fixtures import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_topologies():
  t = get_topology("8xA100-80G")
  assert (t.num_devices, t.num_hosts, t.chip.memory_bytes, t.chip.peak_flops) == (8, 1, 80 * GIB, 312e12)
  assert get_topology("8xa100-40g").chip.memory_bytes == 40 * GIB
  assert get_topology("16xH100").num_hosts == 2
  # Cloud TPU types: v4 / v5p count TensorCores (2 per chip = one JAX device), v5e counts chips
  v4, v5p, v5e = get_topology("v4-32"), get_topology("v5p-64"), get_topology("v5e-256")
  assert (v4.num_devices, v4.num_hosts, v4.tpu_topology()) == (16, 4, "v4:2x2x4")
  assert (v5p.num_devices, v5p.num_hosts, v5p.tpu_topology()) == (32, 8, "v5p:2x4x4")
  assert (v5e.num_devices, v5e.num_hosts, v5e.tpu_topology()) == (256, 32, "v5e:16x16")
  assert v5e.peak_flops == 256 * 197e12
  for bad in ("8xV100", "v4-33", "tpu", "0xH100"):
    with pytest.raises(ValueError, match="topology"):
      get_topology(bad)


def test_mesh_resolution():
  assert resolve_mesh((1, -1, 1), 8, 128, 32, 32) == (1, 8, 1)
  assert resolve_mesh((-1, 1, 1), 8, 128, 32, 32) == (8, 1, 1)
  # 256 chips, global batch 128: the batch splits 128 ways, the rest goes to tensor parallelism
  assert resolve_mesh((1, -1, 1), 256, 128, 32, 32) == (1, 128, 2)
  # a recipe mesh for another device count falls back to FSDP over everything
  assert resolve_mesh((2, 2, 2), 16, 128, 32, 32) == (1, 16, 1)


def test_step_flops_against_hand_count_and_training_metric():
  """The one FLOP model (models/flops.py) against a hand count; the training loop's MFU uses the same."""
  cfg = recipes.llava_config(load_config("v15_stage2", "7b").model)
  t = cfg.text
  d, f, layers, v, seq = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size, 2048
  tokens = 128 * seq
  matmul_params = layers * (4 * d * d + 3 * d * f) + d * v  # q, k, v, o, gate, up, down, lm_head
  want = tokens * (6 * matmul_params + 3 * layers * 4 * seq * d)  # 6N plus attention scores and values
  got = flops_lib.step_flops(cfg, global_batch=128, seq_len=seq, images=0, decoder_trainable=True,
                             projector_trainable=True, remat_policy="none", attention_impl="xla", loss_elementwise=False)
  assert got.model == pytest.approx(want, rel=1e-12)
  # the loss's elementwise work: 7 per logit, at every position by default or at `logit_positions`
  with_loss = flops_lib.step_flops(cfg, global_batch=128, seq_len=seq, images=0, decoder_trainable=True,
                                   projector_trainable=True, remat_policy="none", attention_impl="xla")
  assert with_loss.model - got.model == pytest.approx(7 * tokens * v, rel=1e-12)
  fewer = flops_lib.step_flops(cfg, global_batch=128, seq_len=seq, images=0, decoder_trainable=True,
                               projector_trainable=True, remat_policy="none", attention_impl="xla", logit_positions=1000)
  assert with_loss.model - fewer.model == pytest.approx((tokens - 1000) * (3 * 2 * d * v + 7 * v), rel=1e-12)
  # the training loop's MFU numerator: the same model for the run's batch and trainable parts
  config = load_config("v15_stage2", "7b")
  shapes, _ = abstract_params(cfg)
  trainable, _ = split_params(shapes, config.train.trainable, config.train.freeze)
  per_token = loop.model_flops_per_token(config, cfg, trainable)
  run = flops_lib.step_flops(cfg, global_batch=128, seq_len=seq, images=128, decoder_trainable=True,
                             projector_trainable=True)
  assert per_token == pytest.approx(run.model / tokens, rel=1e-12) and per_token > got.model / tokens
  # full remat recomputes each layer's forward once
  full = flops_lib.step_flops(cfg, global_batch=128, seq_len=seq, images=0, decoder_trainable=True,
                              projector_trainable=True, remat_policy="full", attention_impl="xla",
                              loss_elementwise=False)
  assert full.hardware - full.model == pytest.approx(tokens * layers * (2 * (4 * d * d + 3 * d * f) + 4 * seq * d))
  # frozen decoder (stage 1): no weight gradients for its matmuls
  frozen = flops_lib.step_flops(cfg, global_batch=128, seq_len=seq, images=0, decoder_trainable=False,
                                projector_trainable=True, remat_policy="none", attention_impl="xla",
                                loss_elementwise=False)
  assert frozen.model == pytest.approx(tokens * (4 * matmul_params + 3 * layers * 4 * seq * d), rel=1e-12)
  # one CLIP ViT-L/14-336 image: ~2 · 0.3 B params · 577 tokens forward
  assert flops_lib.vision_flops_per_image(cfg) == pytest.approx(2 * 0.303e9 * 577, rel=0.15)


def test_plan_7b_stage2_on_8xa100_80g():
  """The reference's set-up (per-device 16 × 2048, 8 × 80 GB) fits with ≥ 10 % headroom, on the real step."""
  config = load_config("v15_stage2", "7b")
  p = plan(config, "8xA100-80G", recipe="configs/v15_stage2.py:7b", devices=jax.devices()[:8])
  assert p.fits and p.chosen is not None, p.render()
  m = p.chosen.memory
  assert m.error is None
  # simulated-CPU temporaries are scaled by the TPU-compiler calibration before the budget check
  assert p.temp_factor == 1.25 and p.chosen.total == pytest.approx(m.total + 0.25 * m.temporaries)
  assert p.chosen.total <= 0.9 * 80 * GIB
  # 7B stage 2 trains the LLM + projector: params float32 sharded 8 ways (norm scales replicated)
  t = recipes.llava_config(config.model).text
  d, f, layers, v = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size
  projector = 1024 * d + d + d * d + d
  trainable = 2 * v * d + layers * (4 * d * d + 3 * d * f + 2 * d) + d + projector
  assert p.trainable_params == trainable
  assert m.params == pytest.approx(4 * trainable / 8, rel=2e-3)
  assert m.optimizer == pytest.approx(2 * m.params, rel=1e-3)  # AdamW mu and nu
  # the compiler's argument bytes are exactly the state and batch as sharded
  assert abs(m.arguments - (m.params + m.frozen + m.optimizer + m.batch)) < 1 << 20
  assert m.outputs - m.aliased < 1 << 20  # the new state reuses the donated buffers
  assert 10 * GIB < m.temporaries < m.total
  # throughput: analytic FLOPs, step time at MFU 40 %, the recipe's steps
  assert p.steps == math.ceil(665_298 / 128)
  assert p.chosen.step_seconds == pytest.approx(p.chosen.flops.model / (8 * 312e12 * 0.4))
  assert p.wall_clock_hours() == pytest.approx(p.steps * p.chosen.step_seconds / 3600)
  text = p.render()
  assert "FITS" in text and "--config.train.micro_batches=1" in text and "published" in text


def test_nothing_fits_is_said_clearly():
  from llava_jax.scale.memory import Candidate, measure_state
  config = load_config("tiny")
  # a chip that holds the state (else nothing is compiled: tests/scale/test_plan_lora.py) but no step
  state = measure_state(config, Candidate((8, 1, 1), "none", "xla", 1, 0), jax.devices()[:8]).state
  memory = (state + (64 << 10)) / 0.9
  toy = Topology("8xtoy", Chip("toy", "gpu", 1e12, memory, "a test chip"), 8, 1)
  p = plan(config, toy, recipe="configs/tiny.py", devices=jax.devices()[:8])
  assert not p.fits and p.chosen is None and not p.state_exceeds_budget
  labels = [tr.candidate.label() for tr in p.trials]
  # every memory saver was tried, one at a time: the recipe, chunked attention, chunked loss, full remat
  assert len(labels) == len(set(labels)) == 4
  assert [tr.candidate.attention_impl for tr in p.trials] == ["xla", "chunked", "chunked", "chunked"]
  assert p.trials[-1].candidate.remat_policy == "full" and p.trials[-1].candidate.chunked_loss
  assert all(tr.memory.error is None and tr.total > memory for tr in p.trials)
  text = p.render()
  assert "NOTHING FITS" in text and "parameters + optimizer state" in text


def test_explore_prefers_less_recomputation_that_fits():
  config = load_config("tiny")
  config.model.runtime.remat_policy = "dots_no_batch"
  p = plan(config, "8xA100-80G", recipe="configs/tiny.py", explore=True, devices=jax.devices()[:8])
  # the recipe fits; then only policies recomputing less are compiled ('save_attn_out' and 'full' recompute
  # more than 'dots_no_batch', which recomputes the attention core), and kept when they fit
  assert [tr.candidate.remat_policy for tr in p.trials] == ["dots_no_batch", "dots"]
  assert all(tr.fits for tr in p.trials)
  assert p.chosen.candidate.remat_policy == "dots" and p.chosen.flops.recompute_factor == 1.0
  assert p.trials[0].flops.recompute_factor > 1.0


def test_unsplittable_batch_is_a_problem_not_a_crash():
  config = load_config("tiny")
  config.train.global_batch_size = 6
  p = plan(config, "8xA100-80G", recipe="configs/tiny.py", devices=jax.devices()[:8])
  assert not p.fits and not p.trials
  assert "global batch 6" in p.problem and "multiple of" in p.problem
  assert "PROBLEM" in p.render()


def test_cli_plan_mode():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the plan's child process sets its own device count
  cmd = [sys.executable, "-m", "llava_jax.main", "--mode=plan", "--config=configs/tiny.py",
         "--plan.topology=8xA100-40G", "--plan.mfu=0.5"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "on 8xA100-40G" in out.stdout and "FITS" in out.stdout and "MFU 50%" in out.stdout
  bad = subprocess.run(cmd[:-2], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "--plan.topology" in bad.stderr


def test_backend_resolution(monkeypatch):
  """'auto' compiles TPU slices with libtpu's TPU compiler when it is importable and falls back to simulated CPU
  devices (saying why) otherwise; GPU topologies are always simulated; 'tpu' never falls back silently."""
  from llava_jax.scale import tpu as tpu_lib
  from llava_jax.scale.plan import resolve_backend
  v5e, a100 = get_topology("v5e-8"), get_topology("8xA100-80G")
  monkeypatch.setattr(tpu_lib, "libtpu_available", lambda: True)
  assert resolve_backend(v5e) == ("tpu", "")
  assert resolve_backend(v5e, "cpu") == ("cpu", "asked for with --plan.backend=cpu")
  assert resolve_backend(a100) == ("cpu", "")
  assert resolve_backend(get_topology("v5e-48")) == ("cpu", "no libtpu topology shape known for v5e-48")
  monkeypatch.setattr(tpu_lib, "libtpu_available", lambda: False)
  backend, note = resolve_backend(v5e)
  assert backend == "cpu" and "libtpu is not installed" in note
  with pytest.raises(ValueError, match="libtpu"):
    resolve_backend(v5e, "tpu")
  with pytest.raises(ValueError, match="TPU topology"):
    resolve_backend(a100, "tpu")
  with pytest.raises(ValueError, match="backend="):
    resolve_backend(v5e, "gpu")
