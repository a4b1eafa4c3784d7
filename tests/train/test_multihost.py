"""Two processes on 127.0.0.1 with `jax.distributed` (4 simulated CPU devices each, gloo collectives) train the
tiny config on one global 8-device mesh with per-host data loading, and agree with each other and with a
single-process run on 8 devices.

The pipeline gives host h the samples h::2 of the shared shuffled epoch, so global batch i is the same set of
samples as the single-process batch i, in another row order: the loss and the update match to float32
tolerance (summation order), not bit for bit. The two processes must match each other exactly.
"""
import importlib.util
import json
import os
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

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
STEPS, PROCESSES, DEVICES = 3, 2, 4
TIMEOUT_S = 300
DETERMINISTIC = ("loss", "loss_sum", "grad_norm", "accuracy", "correct", "tokens", "input_tokens",
                 "learning_rate")


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def read_rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def run_workers(tmp_path, tokenizer_root):
  """Start both processes, wait (bounded), kill both if either fails; returns the output directory."""
  out = tmp_path / "out"
  out.mkdir()
  port = free_port()
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # the worker sets its own device count
  procs = []
  try:
    for i in range(PROCESSES):
      cmd = [sys.executable, WORKER, f"--process_id={i}", f"--num_processes={PROCESSES}", f"--port={port}",
             f"--devices={DEVICES}", f"--steps={STEPS}", f"--workdir={tmp_path / 'workdir'}",
             f"--tokenizer_root={tokenizer_root}", f"--out={out}"]
      log = open(tmp_path / f"worker{i}.log", "wb")
      procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p, _ in procs):
      failed = [p for p, _ in procs if p.poll() not in (None, 0)]
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.5)
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


def test_two_processes_agree_with_each_other_and_one_process(tmp_path):
  config = load_config("tiny")
  config.mesh = (PROCESSES * DEVICES, 1, 1)
  config.train.num_steps = STEPS
  config.train.checkpoint_every = 2
  config.eval.synthetic_samples = 0
  tokenizer_root = str(tmp_path / "tok")
  data_config.build_tokenizer(config, recipes.llava_config(config.model), tokenizer_root)

  out = run_workers(tmp_path, tokenizer_root)

  rows = [read_rows(out / f"metrics.process{i}.jsonl") for i in range(PROCESSES)]
  assert [r["step"] for r in rows[0]] == list(range(1, STEPS + 1))
  for a, b in zip(rows[0], rows[1], strict=True):
    for key in DETERMINISTIC:
      assert a[key] == b[key], (a["step"], key)  # replicated metrics: one value, seen by both processes
    assert a["data/samples"] == b["data/samples"] == a["step"] * config.train.global_batch_size // PROCESSES
  losses = [r["loss"] for r in rows[0]]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  params = [dict(np.load(out / f"params.process{i}.npz")) for i in range(PROCESSES)]
  assert params[0].keys() == params[1].keys()
  for k in params[0]:
    np.testing.assert_array_equal(params[0][k], params[1][k], err_msg=k)
  # the run checkpointed (orbax across both processes) with each host's iterator state, and exported its params
  workdir = tmp_path / "workdir"
  assert sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == [2, 3]
  assert (workdir / loop.PARAMS_DIR).is_dir()
  with open(workdir / "checkpoints" / "3" / "data" / "metadata") as f:
    data_item = json.load(f)
  assert data_item["kind"] == "per_process" and len(data_item["value"]) == PROCESSES
  assert [s["value"]["samples_seen"] for s in data_item["value"]] == [STEPS * config.train.global_batch_size // PROCESSES] * PROCESSES
  for i in range(PROCESSES):  # a restore hands each process its own iterator state, not process 0's
    assert json.loads((out / f"probe.process{i}.json").read_text()) == {"host": i}

  # One process, 8 devices, the same config: the same global batches (rows in another order).
  single = loop.train(config, str(tmp_path / "single"), tokenizer_workdir=tokenizer_root)
  ref_rows = read_metrics(str(tmp_path / "single"))
  for a, r in zip(rows[0], ref_rows, strict=True):
    assert a["tokens"] == r["tokens"] and a["input_tokens"] == r["input_tokens"] and a["correct"] == r["correct"]
    np.testing.assert_allclose(a["loss"], r["loss"], rtol=1e-6)
    np.testing.assert_allclose(a["grad_norm"], r["grad_norm"], rtol=1e-5)
  ref = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(single.state.full_params()).items()}
  assert ref.keys() == params[0].keys()
  for k in ref:
    np.testing.assert_allclose(params[0][k], ref[k], rtol=0, atol=1e-6, err_msg=k)
