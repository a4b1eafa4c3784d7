"""Command-line entry: `python -m llava_jax.main --config=configs/<recipe>.py[:arg] [--config.a.b=v] --mode=...`.

Modes:
  train    train (and resume) in --workdir; the README's main command runs configs/demo.py this way
  eval     evaluate a workdir's latest checkpoint (or --checkpoint) on the config's eval data
  inspect  print samples with the supervised spans marked and write --inspect_out JSON lines
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file (configs/*.py[:arg]).",
                                          lock_config=False)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "inspect", "chat", "serve", "plan"], "What to run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plots (default: ./workdir/<config name>).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A checkpoint to evaluate / chat with / serve (workdir or exported dir).")
_INSPECT_OUT = flags.DEFINE_string("inspect_out", None, "inspect mode: JSON-lines output file.")
_INSPECT_LIMIT = flags.DEFINE_integer("inspect_limit", 8, "inspect mode: number of samples.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (auto on TPU pods / SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("workdir", name)


def maybe_initialize_distributed() -> None:
  """jax.distributed for multi-host runs: explicit flags, or auto-detection on TPU pods and SLURM."""
  import jax
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif os.environ.get("SLURM_NTASKS", "1") != "1" or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO; --verbosity=0 shows it
  maybe_initialize_distributed()
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
  mode = _MODE.value
  if mode == "train":
    from llava_jax.train.loop import train_and_evaluate
    train_and_evaluate(config, workdir)
  elif mode == "eval":
    from llava_jax.train.loop import evaluate_checkpoint
    evaluate_checkpoint(config, workdir, checkpoint=_CHECKPOINT.value)
  elif mode == "inspect":
    from llava_jax.data.from_config import inspect_from_config
    inspect_from_config(config, out_path=_INSPECT_OUT.value, limit=_INSPECT_LIMIT.value, workdir=workdir)
  else:
    raise app.UsageError(f"--mode={mode} is not available yet")


if __name__ == "__main__":
  app.run(main)
