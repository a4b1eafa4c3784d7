"""Train-state checkpoints with orbax: params, optimizer state, step, RNG, data-iterator state, config.

Layout in the workdir:
  checkpoints/<step>/state/   the TrainState pytree (sharded arrays; restored directly onto target shardings)
  checkpoints/<step>/data/    every process's input-iterator state (JSON, one entry per process: hosts read different
                              shards), so a resumed run continues at the next batch
  checkpoints/<step>/config/  the run's config (JSON), for eval / chat / export without the config file
Saves are asynchronous; the manager keeps the newest `keep` checkpoints. A save that fails in the background
(disk full, no permission, a lost bucket) raises `CheckpointSaveError` at the first `check()` after it failed
(the loop checks after every step), not one save later. Half-written `<step>.orbax-checkpoint-tmp*` folders left
by a killed run are removed when a Checkpointer opens the directory.

The workdir may be any `etils.epath` path: local (relative or absolute) or a bucket URL such as `gs://b/run`
(never turned into a local path).

Preemption. SIGTERM (single process: `PreemptionFlag`; several processes: jax's preemption sync manager) makes
the loop save a checkpoint and stop; `llava_jax.main` then exits with `PREEMPTED_EXIT_CODE` = 75
(EX_TEMPFAIL, "try again"), so a scheduler that requeues failed jobs (SLURM --requeue, a resume loop) restarts
the run, which resumes from that checkpoint. A finished run exits 0.
"""
from __future__ import annotations

import base64
import json
import logging
import signal
import threading
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llava_jax.paths import resolve_dir

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: saved a checkpoint on SIGTERM, rerun to resume (see the module doc)
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix of a checkpoint still being written


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed; the run stops instead of training on without checkpoints."""



def remove_partial_saves(directory) -> list:
  """Delete `*.orbax-checkpoint-tmp*` entries (saves interrupted by a kill) under `directory` (primary process
  only: the directory is shared); returns their names."""
  directory = epath.Path(directory)
  if jax.process_index() != 0 or not directory.exists():
    return []
  removed = []
  for child in directory.iterdir():
    if TMP_MARKER in child.name:
      if child.is_dir():
        child.rmtree()
      else:
        child.unlink()
      removed.append(child.name)
  if removed:
    logger.warning("removed %d unfinished checkpoint save(s) left by an interrupted run in %s: %s", len(removed),
                   directory, ", ".join(sorted(removed)))
  return removed


def encode_iterator_state(state: Any) -> dict:
  """grain iterator state (dict or bytes) → JSON-safe dict."""
  if isinstance(state, (bytes, bytearray)):
    return {"kind": "bytes", "value": base64.b64encode(bytes(state)).decode("ascii")}
  return {"kind": "json", "value": state}


def decode_iterator_state(blob: dict) -> Any:
  if blob["kind"] == "bytes":
    return base64.b64decode(blob["value"])
  return blob["value"]


def gather_per_process(blob: Any) -> list:
  """[blob of process 0, blob of process 1, ...]: a JSON-able value from every process (an all-gather; every
  process must call it). orbax writes JSON items from the primary process only, so per-host iterator states
  are gathered first."""
  if jax.process_count() == 1:
    return [blob]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(blob).encode("utf-8"), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [json.loads(rows[i, :int(n)].tobytes().decode("utf-8")) for i, n in enumerate(lengths)]


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the three items above."""

  def __init__(self, workdir, *, keep: int = 3, save_every: int = 1, async_save: bool = True):
    self.directory = resolve_dir(workdir) / "checkpoints"
    self.removed_partial = remove_partial_saves(self.directory)
    self._pending: Optional[int] = None  # step of the last save not yet checked
    self._failed = False  # a CheckpointSaveError was raised
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_names=("state", "data", "config"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                             enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, *, data_state=None, config: Optional[dict] = None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is None:
      data = {"kind": "none"}
    else:
      data = {"kind": "per_process", "value": gather_per_process(encode_iterator_state(data_state))}
    items["data"] = ocp.args.JsonSave(data)
    items["config"] = ocp.args.JsonSave(config or {})
    self.check()
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # noqa: BLE001 - any failure of the write is reported the same way
      raise self._error(step, e) from e
    if saved:
      self._pending = step
    return saved

  def check(self) -> None:
    """Raise CheckpointSaveError if the last asynchronous save has finished and failed (never blocks while a
    save is still being written)."""
    if self._pending is None or self.manager.is_saving_in_progress():
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()  # finished: returns at once, or re-raises the writer's error
    except Exception as e:  # noqa: BLE001
      raise self._error(step, e) from e

  def _error(self, step: Optional[int], cause: BaseException) -> CheckpointSaveError:
    self._failed = True
    what = "the last checkpoint" if step is None else f"the checkpoint of step {step}"
    return CheckpointSaveError(f"saving {what} to {self.directory} failed: "
                               f"{type(cause).__name__}: {cause} (full disk / quota / permissions?); training "
                               "stopped so that no more work is lost. Free space or fix the directory and rerun: "
                               "the run resumes from its latest complete checkpoint")

  def restore(self, step: Optional[int], abstract_state):
    """Restore at `step` (None = latest) onto `abstract_state`'s shardings (a pytree of ShapeDtypeStruct with
    .sharding, e.g. from jax.eval_shape + the target mesh — it may differ from the mesh that saved).
    Returns (state, data_state or None, config dict)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    return restored["state"], self._this_process(restored["data"], step), restored["config"]

  def _this_process(self, data: dict, step: int):
    """This process's iterator state from the data item (None when absent or saved by another process count)."""
    kind = data.get("kind")
    if kind == "none":
      return None
    if kind != "per_process":  # a single state (checkpoints written before per-process states)
      return decode_iterator_state(data)
    states = data["value"]
    if len(states) != jax.process_count():
      logger.warning("checkpoint %d holds input-iterator states of %d processes but this run has %d: the data "
                     "shards differ, so the input pipeline starts from its beginning", step, len(states),
                     jax.process_count())
      return None
    return decode_iterator_state(states[jax.process_index()])

  def restore_config(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    """Block until the last save is written; raise CheckpointSaveError if it failed."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._error(step, e) from e

  def close(self) -> None:
    if not self._failed:
      try:
        self.wait()
      finally:
        self.manager.close()
      return
    try:  # the failure was already raised: release what can be released without raising it a second time
      self.manager.close()
    except Exception as e:  # noqa: BLE001
      logger.warning("closing the checkpointer after a failed save: %s", e)


class PreemptionFlag:
  """Set by SIGTERM (cloud preemption, SLURM time limit): the loop saves and exits at the next step.

  Single process only. With several processes each would see its own SIGTERM at its own step, and a process
  that stops to save while another runs the next step deadlocks both; there the handler is not installed and
  jax's preemption sync manager (started by `jax.distributed.initialize`) catches SIGTERM instead, so that
  `Checkpointer.reached_preemption(step)` turns True at the same step on every process.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def install(self) -> "PreemptionFlag":
    if jax.process_count() > 1:
      return self
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def _handler(self, signum, frame):
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
