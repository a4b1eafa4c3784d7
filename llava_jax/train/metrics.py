"""Telling the user what happens: JSON-lines metrics, TensorBoard event files, a loss-curve PNG, MFU.

TensorBoard files are written with tensorboardX (no TensorFlow needed). Only process 0 writes.

The workdir may be local or any etils.epath URL (gs://bucket/run, ...): every file goes through `epath`. Object
stores cannot append, so there metrics.jsonl is rewritten whole (at most every REMOTE_FLUSH_S seconds, at each
checkpoint and at the end) and TensorBoard event files are streamed through `epath.Path.open`.
"""
from __future__ import annotations

import io
import json
import os
import time
from typing import Dict, List, Optional

import jax
from etils import epath

from llava_jax.paths import is_url

REMOTE_FLUSH_S = 60.0



class _EpathRecordWriterFactory:
  """tensorboardX record writers for URL logdirs, through etils.epath (the store the checkpoints use)."""

  def open(self, path):
    return epath.Path(path).open("wb")

  def directory_check(self, path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _tensorboard(logdir):
  """A tensorboardX SummaryWriter on `logdir` (local or URL), or None without tensorboardX."""
  try:
    from tensorboardX import SummaryWriter, record_writer
  except ImportError:  # optional: JSON lines are always written
    return None
  if is_url(logdir):
    record_writer.register_writer_factory(os.fspath(logdir).split(":", 1)[0], _EpathRecordWriterFactory())
  return SummaryWriter(os.fspath(logdir))


class MetricsWriter:
  """Appends `{"step": s, **metrics}` to <workdir>/metrics.jsonl and TensorBoard scalars to <workdir>/tb/."""

  def __init__(self, workdir, enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._tb = None
    self._remote_rows: Optional[List[str]] = None  # URL workdirs: the whole file, rewritten by flush()
    self._dirty, self._flushed_at = False, time.monotonic()
    if self.enabled:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      if is_url(self.path):
        self._remote_rows = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
      self._tb = _tensorboard(epath.Path(workdir) / "tb")

  def write(self, step: int, metrics: Dict[str, float], prefix: str = "train") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": prefix, **{k: float(v) for k, v in metrics.items()}}
    if self._remote_rows is None:
      with self.path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    else:
      self._remote_rows.append(json.dumps(row))
      self._dirty = True
      if time.monotonic() - self._flushed_at > REMOTE_FLUSH_S:
        self.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))

  def write_text(self, step: int, name: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(name, text, int(step))

  def flush(self) -> None:
    """Make everything written so far visible in the workdir (a no-op for local files, appended at once)."""
    if self._remote_rows is not None and self._dirty:
      self.path.write_text("".join(r + "\n" for r in self._remote_rows), encoding="utf-8")
      self._dirty, self._flushed_at = False, time.monotonic()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self.flush()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir, split: str = "train") -> List[dict]:
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if r.get("split") == split]


def plot_loss_curve(workdir, out_name: str = "loss.png") -> Optional[str]:
  """PNG of loss vs step for every run recorded in metrics.jsonl (train, and eval if present)."""
  rows = read_metrics(workdir, "train")
  if not rows or jax.process_index() != 0:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  ax.plot([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r], label="train loss")
  evals = [r for r in read_metrics(workdir, "eval") if "loss" in r]
  if evals:
    ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (supervised tokens)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png")
  plt.close(fig)
  path = epath.Path(workdir) / out_name
  path.write_bytes(png.getvalue())
  return os.fspath(path)


# Peak dense throughput per chip (FLOP/s) for MFU, bf16 unless noted; sources in docs/scaling.md.
PEAK_FLOPS = {
    "A100": 312e12, "H100": 989e12, "TPU v4": 275e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v6 lite": 918e12,
}


def device_peak_flops(device=None) -> Optional[float]:
  """The chip's peak from PEAK_FLOPS by device_kind substring, or None (e.g. CPU: MFU is not reported)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None
