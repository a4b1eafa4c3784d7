"""Two processes on 127.0.0.1 with `jax.distributed` (4 simulated CPU devices each, gloo collectives) train the
tiny config on one global 8-device mesh with per-host data loading until SIGTERM, and agree with each other and
with a single-process run on 8 devices.

The pipeline gives host h the samples h::2 of the shared shuffled epoch, so global batch i is the same set of
samples as the single-process batch i, in another row order: the loss and the update match to float32
tolerance (summation order), not bit for bit. The two processes must match each other exactly.

Padding: each host picks a bucket from its own rows and the hosts agree on the longest every step
(train/host_batches.py), so a global batch is padded to exactly the length the one-process batch of the same
samples gets — not to max_length. BUCKETS are fine-grained around the tiny data's lengths (135-144 tokens), so
the length changes from step to step.

Preemption: SIGTERM reaches process 0 first and process 1 a second later (as on a pod, never at the same
step); jax's preemption sync manager makes both stop, save and exit cleanly at the same step.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from flax import traverse_util

from llava_jax import recipes
from llava_jax.data import from_config as data_config
from llava_jax.train import loop
from llava_jax.train.metrics import read_metrics
from tests.fixtures import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
SCHEDULE_STEPS, PROCESSES, DEVICES = 1000, 2, 4
TIMEOUT_S = 300
SIGNAL_SKEW_S = 1.0
BUCKETS = (136, 138, 140, 142, 144, 160)
DETERMINISTIC = ("loss", "loss_sum", "grad_norm", "accuracy", "correct", "tokens", "input_tokens",
                 "learning_rate", "data/row_length")


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def read_rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def checkpoint_steps(workdir) -> list:
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def run_workers(tmp_path, tokenizer_root):
  """Start both processes, SIGTERM them (skewed) after the first checkpoint, wait (bounded), kill both if either
  fails; returns the output directory."""
  out, workdir = tmp_path / "out", str(tmp_path / "workdir")
  out.mkdir()
  port = free_port()
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # the worker sets its own device count
  procs = []

  def failed():
    return [p for p, _ in procs if p.poll() not in (None, 0)]

  try:
    for i in range(PROCESSES):
      cmd = [sys.executable, WORKER, f"--process_id={i}", f"--num_processes={PROCESSES}", f"--port={port}",
             f"--devices={DEVICES}", f"--steps={SCHEDULE_STEPS}", f"--workdir={workdir}",
             f"--tokenizer_root={tokenizer_root}", f"--out={out}", "--buckets=" + ",".join(map(str, BUCKETS))]
      log = open(tmp_path / f"worker{i}.log", "wb")
      procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + TIMEOUT_S
    while not checkpoint_steps(workdir) and not failed() and time.monotonic() < deadline:
      time.sleep(0.2)
    for p, _ in procs:  # process 0 first, the other one SIGNAL_SKEW_S later
      if checkpoint_steps(workdir) and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        time.sleep(SIGNAL_SKEW_S)
    while any(p.poll() is None for p, _ in procs) and not failed() and time.monotonic() < deadline:
      time.sleep(0.2)
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
      log.close()
  codes = [p.returncode for p, _ in procs]
  if codes != [0] * PROCESSES:
    logs = "\n".join(f"--- worker {i} (exit {c}):\n" + (tmp_path / f"worker{i}.log").read_text()[-4000:]
                     for i, c in enumerate(codes))
    pytest.fail(f"multi-process run failed or timed out after {TIMEOUT_S} s:\n{logs}")
  return out


def single_process_run(config, workdir, tokenizer_root, stop_at, monkeypatch):
  """loop.train in this process (8 devices), preempted by a real SIGTERM during step `stop_at`."""
  real = loop.make_train_step

  def make_step(*args, **kwargs):
    step_fn, calls = real(*args, **kwargs), []

    def step(state, batch):
      out = step_fn(state, batch)
      calls.append(1)
      if len(calls) == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)  # train()'s PreemptionFlag (single process) handles it
      return out
    return step

  monkeypatch.setattr(loop, "make_train_step", make_step)
  try:
    return loop.train(config, workdir, tokenizer_workdir=tokenizer_root)
  finally:
    monkeypatch.setattr(loop, "make_train_step", real)


def test_two_processes_agree_with_each_other_and_one_process(tmp_path, monkeypatch):
  config = load_config("tiny")
  config.mesh = (PROCESSES * DEVICES, 1, 1)
  config.train.num_steps = SCHEDULE_STEPS
  config.train.warmup_ratio = 0.0
  config.train.checkpoint_every = 2
  config.eval.synthetic_samples = 0
  config.data.bucket_lengths = BUCKETS
  tokenizer_root = str(tmp_path / "tok")
  data_config.build_tokenizer(config, recipes.llava_config(config.model), tokenizer_root)

  out = run_workers(tmp_path, tokenizer_root)

  # Both processes stopped at the same step, saved a checkpoint there, and exited with code 0.
  results = [json.loads((out / f"result.process{i}.json").read_text()) for i in range(PROCESSES)]
  stopped = results[0]["steps"]
  assert results == [{"steps": stopped, "preempted": True}] * PROCESSES
  workdir = str(tmp_path / "workdir")
  assert 2 <= stopped < SCHEDULE_STEPS and checkpoint_steps(workdir)[-1] == stopped
  assert not os.path.exists(os.path.join(workdir, loop.PARAMS_DIR))

  # Replicated metrics and the parameters: one value, seen identically by both processes.
  rows = [read_rows(out / f"metrics.process{i}.jsonl") for i in range(PROCESSES)]
  assert [r["step"] for r in rows[0]] == list(range(1, stopped + 1))
  for a, b in zip(rows[0], rows[1], strict=True):
    for key in DETERMINISTIC:
      assert a[key] == b[key], (a["step"], key)
    assert a["data/samples"] == b["data/samples"] == a["step"] * config.train.global_batch_size // PROCESSES
  losses = [r["loss"] for r in rows[0]]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  params = [dict(np.load(out / f"params.process{i}.npz")) for i in range(PROCESSES)]
  assert params[0].keys() == params[1].keys()
  for k in params[0]:
    np.testing.assert_array_equal(params[0][k], params[1][k], err_msg=k)

  # The checkpoint holds each host's own iterator state, and a restore hands each process its own.
  with open(os.path.join(workdir, "checkpoints", str(stopped), "data", "metadata")) as f:
    data_item = json.load(f)
  assert data_item["kind"] == "per_process" and len(data_item["value"]) == PROCESSES
  per_host = stopped * config.train.global_batch_size // PROCESSES
  assert [s["value"]["samples_seen"] for s in data_item["value"]] == [per_host] * PROCESSES
  for i in range(PROCESSES):
    assert json.loads((out / f"probe.process{i}.json").read_text()) == {"host": i}

  # One process, 8 devices, the same config and schedule, stopped at the same step: the same global batches.
  single = single_process_run(config, str(tmp_path / "single"), tokenizer_root, stopped, monkeypatch)
  assert single.preempted and single.steps == stopped
  ref_rows = read_metrics(str(tmp_path / "single"))
  for a, r in zip(rows[0], ref_rows, strict=True):
    assert a["step"] == r["step"] and a["learning_rate"] == r["learning_rate"]
    assert a["tokens"] == r["tokens"] and a["input_tokens"] == r["input_tokens"] and a["correct"] == r["correct"]
    # no padding beyond one process's: the agreed length is the bucket of the whole global batch
    assert a["data/row_length"] == r["data/row_length"], a["step"]
    np.testing.assert_allclose(a["loss"], r["loss"], rtol=1e-6)
    np.testing.assert_allclose(a["grad_norm"], r["grad_norm"], rtol=1e-5)
  lengths = [a["data/row_length"] for a in rows[0]]
  assert min(lengths) < config.data.max_length and len(set(lengths)) > 1, lengths  # buckets in use, not max_length
  ref = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(single.state.full_params()).items()}
  assert ref.keys() == params[0].keys()
  for k in ref:
    np.testing.assert_allclose(params[0][k], ref[k], rtol=0, atol=1e-6, err_msg=k)


LAUNCH_TIMEOUT_S = 900


def test_launcher_trains_and_evaluates_tiny_across_two_processes(tmp_path):
  """launch/README.md's local command, as a user runs it (eval on): `launch/local_multiprocess.sh -n 2
  --devices-per-process 4 -- --config=configs/tiny.py --workdir=DIR` trains, evaluates the held-out questions on
  the mesh spanning both processes (generation fetches rows living on the other process's devices), exits 0, and
  the report is written and printed once (by process 0)."""
  out = subprocess.run(["bash", "-c", "echo ${BASH_VERSINFO[0]}.${BASH_VERSINFO[1]}"], capture_output=True,
                       text=True).stdout.strip()
  if tuple(int(x) for x in out.split(".")) < (5, 1):
    pytest.skip(f"launch/local_multiprocess.sh needs bash >= 5.1, this is {out}")
  config = load_config("tiny")
  workdir, logs = tmp_path / "mp_tiny", tmp_path / "logs"
  env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)  # the launcher gives each process its devices
  cmd = ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "-n", "2", "--devices-per-process", "4",
         "--port", str(free_port()), "--log-dir", str(logs), "--", "--config=configs/tiny.py", f"--workdir={workdir}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        timeout=LAUNCH_TIMEOUT_S)
  texts = [(logs / f"process_{i}.log").read_text() for i in range(PROCESSES)]
  assert proc.returncode == 0, "\n".join(t[-3000:] for t in texts)
  assert [r["step"] for r in read_metrics(str(workdir))] == list(range(1, config.train.num_steps + 1))
  report = json.loads((workdir / loop.EVAL_REPORT).read_text())
  assert report["accuracy"]["n"] == config.eval.synthetic_samples and len(report["samples"]) == 3
  assert [t.count("held-out synthetic questions:") for t in texts] == [1, 0]
  assert os.path.isdir(workdir / loop.PARAMS_DIR)
