"""The training progress bar: it counts FINISHED steps, and says that the first step compiles.

jax dispatches a step asynchronously: `step_fn` returns as soon as the work is queued, long before the device
has done it. Counting at dispatch put the bar one step (a whole compilation, for the first) ahead of the device.
Here the bar advances to step s-1 once step s is dispatched and step s-1's outputs are ready (one step stays in
flight, so the host keeps preparing the next batch while the device computes), and to the last step on `close`.

In a Jupyter kernel (a notebook, Colab) the bar is one display output updated in place: tqdm's carriage-return
refreshes on the kernel's non-terminal stderr would otherwise pile up in the saved notebook, one copy per refresh.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional

import jax


NOTEBOOK_REFRESH_S = 1.0  # at most one display update per second in a notebook
NOTEBOOK_COLUMNS = 110


class DisplayLine:
  """A file-like target for tqdm that shows the last line written as ONE notebook output, updated in place
  (an IPython display handle), instead of appending each `\\r`-refresh to the cell's stderr text."""

  def __init__(self, handle):
    self._handle = handle
    self._shown = False
    self.last = ""

  def write(self, text: str) -> None:
    line = text.replace("\r", "").strip("\n").rstrip()
    if not line or line == self.last:
      return
    self.last = line
    bundle = {"text/plain": line}
    if self._shown:
      self._handle.update(bundle, raw=True)
    else:
      self._handle.display(bundle, raw=True)
      self._shown = True

  def flush(self) -> None:
    pass


def notebook_display_line() -> Optional[DisplayLine]:
  """A DisplayLine when running inside a Jupyter kernel (IPython with a kernel attached), else None."""
  if "IPython" not in sys.modules:  # a kernel has imported it long before; elsewhere, do not import it
    return None
  from IPython import get_ipython
  from IPython.display import DisplayHandle
  shell = get_ipython()
  if shell is None or getattr(shell, "kernel", None) is None:
    return None
  return DisplayLine(DisplayHandle())


def make_bar(start: int, total: int):
  """A tqdm bar on process 0 (disabled elsewhere): on the terminal's stderr, or one updating notebook line."""
  from tqdm import tqdm
  disable = jax.process_index() != 0
  line = None if disable else notebook_display_line()
  if line is not None:
    return tqdm(total=total, initial=start, desc="train", file=line, ncols=NOTEBOOK_COLUMNS,
                mininterval=NOTEBOOK_REFRESH_S, ascii=False)
  return tqdm(total=total, initial=start, desc="train", disable=disable, dynamic_ncols=True)


class StepProgress:
  """`dispatched(step, outputs)` after each step call; `finished(step)` when the host already waited for it
  (e.g. fetched its metrics); `close()` at the end."""

  def __init__(self, start: int, total: int, say: Callable[[str], None]):
    self.bar = make_bar(start, total)
    self._say = say
    self._pending: Optional[tuple] = None  # (step, outputs) dispatched, maybe not finished
    self._first = True
    self._started = time.perf_counter()

  def before_first(self) -> None:
    """Tell the user why the first step takes long (tracing + XLA compilation of the whole step)."""
    self._say("compiling the train step (the first step includes XLA compilation; later steps are fast) ...")
    self._started = time.perf_counter()

  def dispatched(self, step: int, outputs: Any) -> None:
    """outputs: the step's metrics (never the donated state: a later step deletes its buffers)."""
    if self._first:  # wait for it: its time is the compile time, worth a line
      self._first = False
      jax.block_until_ready(outputs)
      self._say(f"first step compiled and ran in {time.perf_counter() - self._started:.1f} s")
      self.finished(step)
      return
    if self._pending is not None:
      prev_step, prev = self._pending
      jax.block_until_ready(prev)
      self.finished(prev_step)
    self._pending = (step, outputs)

  def finished(self, step: int) -> None:
    if self._pending is not None and self._pending[0] <= step:
      self._pending = None
    if step > self.bar.n:
      self.bar.update(step - self.bar.n)

  def set_postfix(self, **kwargs) -> None:
    self.bar.set_postfix(**kwargs)

  def close(self) -> None:
    if self._pending is not None:
      step, outputs = self._pending
      jax.block_until_ready(outputs)
      self.finished(step)
    self.bar.close()
