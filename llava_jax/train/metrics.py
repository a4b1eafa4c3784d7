"""Telling the user what happens: JSON-lines metrics, TensorBoard event files, a loss-curve PNG, MFU.

TensorBoard files are written with tensorboardX (no TensorFlow needed). Only process 0 writes.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import jax


class MetricsWriter:
  """Appends `{"step": s, **metrics}` to <workdir>/metrics.jsonl and TensorBoard scalars to <workdir>/tb/."""

  def __init__(self, workdir: str, enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:  # optional: JSON lines are always written
        self._tb = None

  def write(self, step: int, metrics: Dict[str, float], prefix: str = "train") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": prefix, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))

  def write_text(self, step: int, name: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(name, text, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def read_metrics(workdir: str, split: str = "train") -> List[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r.get("split") == split]


def plot_loss_curve(workdir: str, out_name: str = "loss.png") -> Optional[str]:
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
  path = os.path.join(workdir, out_name)
  fig.savefig(path)
  plt.close(fig)
  return path


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


def train_flops_per_token(config, seq_len: int) -> float:
  """Model FLOPs per supervised-or-not token of a training step (forward + backward = 3 × forward).

  6·N_trainable-style count for the decoder: 2·(params in matmuls) per token forward plus attention
  2·2·L·T·d (scores and values, causal half not discounted, as MaxText counts). The frozen vision tower
  and the stage-1 frozen decoder still cost forward and activation-gradient FLOPs; this counts the
  decoder fully (3×) and ignores the vision tower (added by the caller per image when needed).
  """
  t = config.text
  hd = t.resolved_head_dim
  attn_proj = t.hidden_size * hd * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
  mlp = 3 * t.hidden_size * t.intermediate_size
  per_layer = 2 * (attn_proj + mlp) + 2 * 2 * seq_len * t.num_attention_heads * hd
  head = 2 * t.hidden_size * t.vocab_size
  return 3.0 * (t.num_hidden_layers * per_layer + head)
