"""Checkpoint failures and leftovers, and what the training loop tells the user (configs/tiny.py, 8 CPU devices):
a save that fails in the background stops the run at the next step with a message naming the step and the
cause; half-written saves of a killed run are removed on start; the first step says it compiles; the progress
bar counts steps the device has finished, not steps dispatched.
"""
import errno
import os
import time

import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from llava_jax.train import checkpointing, loop, progress as progress_lib
from tests.train.test_loop import _checkpoint_steps, tiny_config, tokenizer_root  # noqa: F401 (fixture)

SAVE_WAIT_S = 120  # upper bound for a background save to finish (a bound, not a timing assertion)


def test_partial_saves_of_a_killed_run_are_removed_on_start(tmp_path):
  """`<step>.orbax-checkpoint-tmp-*` folders (a save interrupted by a kill) are deleted when the run starts again;
  finished checkpoints and other files stay."""
  root = tmp_path / "checkpoints"
  leftover = root / "4.orbax-checkpoint-tmp-1733212345"
  (leftover / "state").mkdir(parents=True)
  (leftover / "state" / "d").write_bytes(b"x" * 100)
  (root / "2.orbax-checkpoint-tmp-17").mkdir()
  (root / "notes.txt").write_text("mine")
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  try:
    assert sorted(os.listdir(root)) == ["notes.txt"]
    assert sorted(ckpt.removed_partial) == ["2.orbax-checkpoint-tmp-17", "4.orbax-checkpoint-tmp-1733212345"]
    assert ckpt.latest_step() is None
  finally:
    ckpt.close()


def test_a_failed_background_save_stops_the_run_at_the_next_step(tmp_path, tokenizer_root, monkeypatch):
  """The step-2 save fails in orbax's background writer (ENOSPC, as on a full disk). Once that write has failed,
  the very next step raises CheckpointSaveError naming step 2, the directory and the cause — instead of training
  on to the step-4 save and reporting it there (two checkpoint intervals of work lost)."""
  real_save_fn = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def failing_save_fn(self, x, directory):
    if f"{os.sep}checkpoints{os.sep}2." in os.fspath(directory):
      raise OSError(errno.ENOSPC, "No space left on device", os.fspath(directory))
    return await real_save_fn(self, x, directory)

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", failing_save_fn)
  checkpointers = []
  real_init = checkpointing.Checkpointer.__init__

  def recording_init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    checkpointers.append(self)

  monkeypatch.setattr(checkpointing.Checkpointer, "__init__", recording_init)
  real_make_train_step, calls = loop.make_train_step, []

  def make_step(*args, **kwargs):
    step_fn = real_make_train_step(*args, **kwargs)

    def step(state, batch):
      calls.append(1)
      if len(calls) == 3:  # let the step-2 save finish (and fail) in the background first
        deadline = time.monotonic() + SAVE_WAIT_S
        while checkpointers[0].manager.is_saving_in_progress() and time.monotonic() < deadline:
          time.sleep(0.05)
      return step_fn(state, batch)
    return step

  monkeypatch.setattr(loop, "make_train_step", make_step)
  workdir = str(tmp_path / "run")
  with pytest.raises(checkpointing.CheckpointSaveError) as err:
    loop.train(tiny_config(num_steps=8), workdir, tokenizer_workdir=tokenizer_root)
  message = str(err.value)
  assert "step 2" in message and "No space left on device" in message, message
  assert os.path.join(workdir, "checkpoints") in message
  assert len(calls) == 3  # stopped right after the failure: step 4 never ran
  assert _checkpoint_steps(workdir) == []


class RecordingBar:
  """Stands in for tqdm: records the count after every update."""

  def __init__(self, start, total):
    self.n, self.total, self.counts = start, total, []

  def update(self, k):
    self.n += k
    self.counts.append(self.n)

  def set_postfix(self, **kwargs):
    pass

  def close(self):
    pass


class Finished:
  """A metrics leaf whose `block_until_ready` (what jax.block_until_ready calls) marks its step finished."""

  def __init__(self, step, finished):
    self.step, self.finished = step, finished

  def block_until_ready(self):
    self.finished.add(self.step)
    return self

  def __float__(self):
    self.finished.add(self.step)  # fetching the value waits for the step too
    return 0.0


def test_progress_counts_finished_steps_and_the_first_step_says_it_compiles(tmp_path, tokenizer_root,
                                                                             monkeypatch, capsys):
  """log_every > num_steps (nothing fetched every step): at every update the bar's count is a step whose outputs
  the host has waited for, the count ends at num_steps, and "compiling" is printed before the first step runs."""
  bars, finished, order = [], set(), []
  monkeypatch.setattr(progress_lib, "make_bar", lambda start, total: bars.append(RecordingBar(start, total))
                      or bars[-1])
  real_make_train_step = loop.make_train_step

  def make_step(*args, **kwargs):
    step_fn, calls = real_make_train_step(*args, **kwargs), []

    def step(state, batch):
      calls.append(1)
      order.append(("step", len(calls), "compiling" in capsys.readouterr().out))
      state, m = step_fn(state, batch)
      return state, {**m, "probe": Finished(len(calls), finished)}
    return step

  monkeypatch.setattr(loop, "make_train_step", make_step)
  real_update = RecordingBar.update

  def checked_update(self, k):
    real_update(self, k)
    assert self.n in finished, f"the bar shows step {self.n} but only steps {sorted(finished)} have finished"

  monkeypatch.setattr(RecordingBar, "update", checked_update)
  result = loop.train(tiny_config(num_steps=5, log_every=1000, checkpoint_every=1000), str(tmp_path / "run"),
                      tokenizer_workdir=tokenizer_root)
  assert result.steps == 5
  (bar,) = bars
  assert bar.counts and bar.counts[-1] == 5 and bar.counts == sorted(bar.counts)
  assert order[0] == ("step", 1, True)  # said before the first step was called
