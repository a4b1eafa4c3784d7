"""The training loop end to end on configs/tiny.py: resume after preemption reproduces an uninterrupted run bit for
bit (params, optimizer state, data order, logged losses), checkpoints restore onto other mesh shapes, the CLI
saves and exits cleanly on SIGTERM and a rerun resumes, and the demo recipe learns on a shortened schedule.

Every run here uses 8 simulated CPU devices (tests/conftest.py) and a tokenizer trained once per module.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import jax
from flax import traverse_util

from llava_jax import parallel, recipes
from llava_jax.data import from_config as data_config
from llava_jax.data.pipeline import make_pipeline
from llava_jax.train import checkpointing, loop
from llava_jax.train.metrics import read_metrics
from llava_jax.train.optim import optimizer_from_config
from llava_jax.train.state import abstract_train_state, state_shardings
from llava_jax.train.step import make_train_step
from tests.fixtures import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_STEPS, PREEMPT_AT = 6, 3
EX_TEMPFAIL = 75  # sysexits.h "temporary failure, try again": what a preempted (saved, unfinished) run exits with
# metrics that must repeat exactly on a resumed run (timings and MFU are wall-clock)
DETERMINISTIC = ("loss", "loss_sum", "grad_norm", "accuracy", "correct", "tokens", "input_tokens",
                 "learning_rate", "data/samples", "data/batches")


def tiny_config(**train):
  c = load_config("tiny")
  c.eval.synthetic_samples = 0
  c.mesh = (8, 1, 1)
  c.train.num_steps = N_STEPS
  c.train.checkpoint_every = 2
  c.train.keep_checkpoints = 2
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent XLA cache for this module: each train() call builds new jits of the same computations, so
  only the first run of a mesh shape compiles (a cached executable is the same code: results are unchanged)."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  path = str(tmp_path_factory.mktemp("xla_cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  for n, v in zip(names, (path, 0, 0)):
    jax.config.update(n, v)
  cc.reset_cache()
  yield path
  for n, v in saved.items():
    jax.config.update(n, v)
  cc.reset_cache()


@pytest.fixture(scope="module")
def tokenizer_root(tmp_path_factory):
  """A workdir-like directory whose tokenizer/ holds the synthetic tokenizer (trained once for the module)."""
  root = str(tmp_path_factory.mktemp("tok"))
  c = tiny_config()
  data_config.build_tokenizer(c, recipes.llava_config(c.model), root)
  return root


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, tokenizer_root):
  """The reference: N_STEPS uninterrupted steps (checkpoints every 2 steps, the newest 2 kept)."""
  workdir = str(tmp_path_factory.mktemp("run_a"))
  result = loop.train(tiny_config(), workdir, tokenizer_workdir=tokenizer_root)
  return workdir, result


def leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def paths_and_leaves(tree):
  return {"/".join(str(k) for k in p): np.asarray(x) for p, x in traverse_util.flatten_dict(tree).items()}


def _assert_same_rows(rows, reference, steps):
  by_step = {r["step"]: r for r in reference}
  assert [r["step"] for r in rows] == list(steps)
  for r in rows:
    for key in DETERMINISTIC:
      assert r[key] == by_step[r["step"]][key], (r["step"], key, r[key], by_step[r["step"]][key])


def test_resume_after_preemption_is_bit_identical(run_a, tmp_path, tokenizer_root, monkeypatch):
  workdir_a, result_a = run_a
  assert result_a.steps == N_STEPS
  rows_a = read_metrics(workdir_a)
  assert [r["step"] for r in rows_a] == list(range(1, N_STEPS + 1))
  assert rows_a[-1]["loss"] < rows_a[0]["loss"]

  # Run B, leg 1: the same config (same schedule), but a real SIGTERM arrives during step PREEMPT_AT.
  workdir_b = str(tmp_path / "run_b")
  real_make_train_step = loop.make_train_step

  def make_preempted_step(*args, **kwargs):
    step_fn = real_make_train_step(*args, **kwargs)
    calls = []

    def step(state, batch):
      out = step_fn(state, batch)
      calls.append(1)
      if len(calls) == PREEMPT_AT:
        os.kill(os.getpid(), signal.SIGTERM)  # handled by train()'s PreemptionFlag, not fatal
      return out
    return step

  handler_before = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(loop, "make_train_step", make_preempted_step)
  leg1 = loop.train(tiny_config(), workdir_b, tokenizer_workdir=tokenizer_root)
  monkeypatch.setattr(loop, "make_train_step", real_make_train_step)
  assert leg1.preempted and leg1.steps == PREEMPT_AT
  assert signal.getsignal(signal.SIGTERM) == handler_before  # train() put the previous handler back
  assert _checkpoint_steps(workdir_b) == [2, PREEMPT_AT]  # the grid, and the preemption save off the grid
  assert not os.path.exists(os.path.join(workdir_b, loop.PARAMS_DIR))  # an unfinished stage exports nothing
  _assert_same_rows(read_metrics(workdir_b), rows_a, range(1, PREEMPT_AT + 1))

  # Leg 2: a plain rerun resumes from step PREEMPT_AT (state, RNG and the data iterator) and finishes.
  leg2 = loop.train(tiny_config(), workdir_b, tokenizer_workdir=tokenizer_root)
  assert leg2.steps == N_STEPS and not leg2.preempted
  rows_b = read_metrics(workdir_b)
  _assert_same_rows(rows_b, rows_a, range(1, N_STEPS + 1))  # no step logged twice, every value identical
  assert int(leg2.state.step) == int(result_a.state.step) == N_STEPS
  for x, y in zip(leaves(leg2.state), leaves(result_a.state), strict=True):
    np.testing.assert_array_equal(x, y)  # params, frozen, opt_state, rng: bit-identical
  assert jax.tree.structure(leg2.state) == jax.tree.structure(result_a.state)
  ckpt = checkpointing.Checkpointer(workdir_b)
  config_b = ckpt.restore_config()
  ckpt.close()
  assert config_b["train"]["num_steps"] == N_STEPS and config_b["mesh"] == [8, 1, 1]


def test_resume_after_a_crash_redoes_the_steps_since_the_last_checkpoint(run_a, tmp_path, tokenizer_root,
                                                                          monkeypatch):
  """A hard failure (no preemption save) during step 4: the rerun resumes from the step-2 checkpoint, redoes
  steps 3.. with the batches of steps 3.. (the iterator state of step 2), and ends bit-identical to run A."""
  workdir_a, result_a = run_a
  rows_a = read_metrics(workdir_a)
  workdir = str(tmp_path / "crash")
  real_make_train_step = loop.make_train_step

  def make_crashing_step(*args, **kwargs):
    step_fn = real_make_train_step(*args, **kwargs)
    calls = []

    def step(state, batch):
      calls.append(1)
      if len(calls) == 4:
        raise RuntimeError("simulated crash")
      return step_fn(state, batch)
    return step

  real_make_pipeline, pipelines = loop.make_pipeline, []

  closed = []

  def recording_pipeline(*args, **kwargs):
    pipe = real_make_pipeline(*args, **kwargs)
    real_close = pipe.close
    pipe.close = lambda: (closed.append(pipe), real_close())
    pipelines.append(pipe)
    return pipe

  handler_before = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(loop, "make_train_step", make_crashing_step)
  monkeypatch.setattr(loop, "make_pipeline", recording_pipeline)
  with pytest.raises(RuntimeError, match="simulated crash"):
    loop.train(tiny_config(), workdir, tokenizer_workdir=tokenizer_root)
  monkeypatch.undo()
  # train() cleaned up on the way out: the pipeline closed, the SIGTERM handler restored and the async save
  # of step 2 finished (the checkpointer was closed, which waits for it).
  assert closed == pipelines and len(pipelines) == 1
  assert signal.getsignal(signal.SIGTERM) == handler_before
  assert _checkpoint_steps(workdir) == [2]

  result = loop.train(tiny_config(), workdir, tokenizer_workdir=tokenizer_root)
  assert result.steps == N_STEPS and not result.preempted
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5, 6]  # step 3 logged by both runs
  _assert_same_rows(rows[:3], rows_a, range(1, 4))
  _assert_same_rows(rows[3:], rows_a, range(3, N_STEPS + 1))
  for x, y in zip(leaves(result.state), leaves(result_a.state), strict=True):
    np.testing.assert_array_equal(x, y)


def _pipeline_at(config, tokenizer_root, data_state):
  """The train() pipeline of `config`, restored to a checkpoint's iterator state."""
  model_config = recipes.llava_config(config.model)
  tokenizer = data_config.build_tokenizer(config, model_config, tokenizer_root)
  source = data_config.build_source(config.data, model_config)
  pipe = make_pipeline(source, seed=int(config.train.seed), global_batch_size=int(config.train.global_batch_size),
                       **data_config.pipeline_kwargs(config, model_config, tokenizer))
  pipe.set_state(data_state)
  return pipe


@pytest.mark.parametrize("new_mesh", [(2, 2, 2), (1, 4, 2)])
def test_restore_onto_a_different_mesh(run_a, tokenizer_root, new_mesh):
  workdir_a, _ = run_a
  config = tiny_config()
  model_config = recipes.llava_config(config.model)
  restore_step = N_STEPS - 2  # kept (keep 2, every 2)
  ckpt = checkpointing.Checkpointer(workdir_a)
  assert restore_step in ckpt.manager.all_steps()
  old_mesh = parallel.make_mesh((8, 1, 1))
  new = parallel.make_mesh(new_mesh)
  source_len = len(data_config.build_source(config.data, model_config))
  optimizer = optimizer_from_config(config.train, recipes.total_steps(config.train, source_len))
  states = {}
  for name, mesh in (("old", old_mesh), ("new", new)):
    abstract = abstract_train_state(model_config, optimizer, mesh, trainable_patterns=config.train.trainable)
    state, data_state, _ = ckpt.restore(restore_step, abstract)
    # every leaf lands on the target mesh's sharding (orbax reads it straight onto those shards)
    for x, a in zip(jax.tree.leaves(state), jax.tree.leaves(abstract), strict=True):
      assert x.sharding.is_equivalent_to(a.sharding, x.ndim), (x.sharding, a.sharding)
      assert x.shape == a.shape and x.dtype == a.dtype
    states[name] = (mesh, state, data_state)
  ckpt.close()

  old_state, new_state = states["old"][1], states["new"][1]
  assert int(old_state.step) == int(new_state.step) == restore_step
  for x, y in zip(leaves(old_state), leaves(new_state), strict=True):
    np.testing.assert_array_equal(x, y)  # the values do not depend on the mesh they were restored onto
  # the new mesh really shards differently: some leaf is split over fsdp / tensor now
  new_specs = {str(x.sharding.spec) for x in jax.tree.leaves(new_state)}
  assert any("fsdp" in s or "tensor" in s for s in new_specs), new_specs
  assert states["old"][2] == states["new"][2]

  # Continue one step on each mesh from the restored data iterator: the loss of step restore_step+1 equals the
  # uninterrupted run's logged loss (exactly on the saving mesh, to float32 tolerance on the other one).
  logged = {r["step"]: r for r in read_metrics(workdir_a)}[restore_step + 1]
  pipe = _pipeline_at(config, tokenizer_root, states["old"][2])
  batch = next(pipe)
  pipe.close()
  out = {}
  for name, (mesh, state, _) in states.items():
    step_fn = make_train_step(model_config, optimizer, mesh, state_shardings=state_shardings(state))
    new_state_after, m = step_fn(state, batch)
    out[name] = (jax.device_get(m), new_state_after)
  assert float(out["old"][0]["loss"]) == logged["loss"]
  np.testing.assert_allclose(float(out["new"][0]["loss"]), logged["loss"], rtol=2e-6)
  np.testing.assert_allclose(float(out["new"][0]["grad_norm"]), logged["grad_norm"], rtol=1e-4)
  assert float(out["new"][0]["tokens"]) == logged["tokens"]
  old_p, new_p = paths_and_leaves(out["old"][1].params), paths_and_leaves(out["new"][1].params)
  for k in old_p:
    np.testing.assert_allclose(new_p[k], old_p[k], rtol=0, atol=1e-5, err_msg=k)


def _checkpoint_steps(workdir):
  """Finalized orbax checkpoint steps in <workdir>/checkpoints (in-progress saves have temporary names)."""
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def _wait_for(predicate, proc, timeout, what):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"the run exited with code {proc.returncode} before {what}")
    time.sleep(0.2)
  raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _start_cli(workdir, log_path, env):
  cmd = [sys.executable, "-m", "llava_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
         "--config.train.num_steps=100000", "--config.train.checkpoint_every=2", "--config.eval.synthetic_samples=0"]
  log = open(log_path, "ab")
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _sigterm_and_wait(proc, timeout=90):
  proc.send_signal(signal.SIGTERM)
  return proc.wait(timeout=timeout)


def test_preempted_exit_code_is_ex_tempfail():
  assert checkpointing.PREEMPTED_EXIT_CODE == EX_TEMPFAIL == os.EX_TEMPFAIL


def test_cli_sigterm_saves_exits_cleanly_and_rerun_resumes(tmp_path, tokenizer_root, compilation_cache):
  """`python -m llava_jax.main` on a long run: SIGTERM after the first checkpoint → exit code 75 (EX_TEMPFAIL, "try
  again": a requeue-on-failure scheduler reruns it) with a checkpoint at the step reached (the last logged step);
  a rerun resumes from it (not from scratch) and is preempted again, exiting 75 again."""
  workdir = str(tmp_path / "cli")
  shutil.copytree(os.path.join(tokenizer_root, "tokenizer"), os.path.join(workdir, "tokenizer"))
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
  log_path = str(tmp_path / "cli.log")
  logged = lambda: [r["step"] for r in read_metrics(workdir)]  # noqa: E731
  procs = []
  try:
    proc, log = _start_cli(workdir, log_path, env)
    procs.append((proc, log))
    _wait_for(lambda: _checkpoint_steps(workdir), proc, 240, "the first checkpoint")
    assert _sigterm_and_wait(proc) == EX_TEMPFAIL, open(log_path).read()[-3000:]
    reached = logged()[-1]
    assert logged() == list(range(1, reached + 1))
    assert reached >= 2 and _checkpoint_steps(workdir)[-1] == reached  # saved where it stopped, on or off the grid
    assert not os.path.exists(os.path.join(workdir, loop.PARAMS_DIR))

    proc, log = _start_cli(workdir, log_path, env)
    procs.append((proc, log))
    _wait_for(lambda: logged()[-1] > reached, proc, 240, "a step after the resume")
    assert _sigterm_and_wait(proc) == EX_TEMPFAIL, open(log_path).read()[-3000:]
    steps = logged()
    assert steps == list(range(1, steps[-1] + 1))  # continued at reached + 1: nothing repeated, nothing skipped
    assert _checkpoint_steps(workdir)[-1] == steps[-1] > reached
    text = open(log_path).read()
    assert f"resumed from {os.path.join(workdir, 'checkpoints')} at step {reached}" in text
    assert text.count("preempted at step") == 2
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
      log.close()


# The demo on a shortened schedule (configs/demo.py runs 300 + 600 steps): 200 + 300 steps, ~3-6 min on 2 cores.
# Only the step counts and the number of held-out questions are overridden; the model, data, learning rates
# and eval are the demo's own.
DEMO_STAGE1_STEPS, DEMO_STAGE2_STEPS, DEMO_EVAL_QUESTIONS = 200, 300, 200
DEMO_MARGIN = 0.10  # held-out accuracy must beat the majority-answer baseline by 10 points
DEMO_TIMEOUT_S = 1500


def test_demo_learns_on_a_shortened_schedule(tmp_path):
  """The README's main command (`python -m llava_jax.main --config=configs/demo.py`, one CPU device, no
  downloads): stage 1 then stage 2 from random init, then greedy answers to held-out generated questions, whose
  accuracy must clearly beat always answering each question kind's most frequent answer."""
  workdir = str(tmp_path / "demo")
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # one device, as the README command runs on a laptop CPU
  cmd = [sys.executable, "-m", "llava_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
         f"--config.stage1.train.num_steps={DEMO_STAGE1_STEPS}",
         f"--config.stage2.train.num_steps={DEMO_STAGE2_STEPS}",
         f"--config.eval.synthetic_samples={DEMO_EVAL_QUESTIONS}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        timeout=DEMO_TIMEOUT_S)
  out = proc.stdout.decode("utf-8", "replace")
  assert proc.returncode == 0, out[-3000:]
  assert read_metrics(os.path.join(workdir, "stage1"))[-1]["step"] == DEMO_STAGE1_STEPS
  rows = read_metrics(os.path.join(workdir, "stage2"))
  assert rows[-1]["step"] == DEMO_STAGE2_STEPS and rows[-1]["loss"] < rows[0]["loss"], (rows[0], rows[-1])
  with open(os.path.join(workdir, "eval_report.json")) as f:
    report = json.load(f)
  acc, base = report["accuracy"], report["majority_baseline"]
  assert acc["n"] == DEMO_EVAL_QUESTIONS and sum(report["skipped"].values()) == 0
  assert f"accuracy {acc['overall']:.1%}" in out  # printed for the user
  assert acc["overall"] >= base["overall"] + DEMO_MARGIN, json.dumps(report, indent=1)
