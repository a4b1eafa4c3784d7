"""Turn the children's raw results into the report: ratios against targets, a markdown table and a PNG chart.

Every ratio is ours / reference oriented so that > 1 means llava_jax is better (for a latency that is
reference latency / our latency). Targets come from issue 8 (issue 13 keeps them, as PASS/FAIL rows); every
report names the git commit it measured (and whether the tree had uncommitted changes).
"""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional

from bench import common

# metric key → (label, unit, target ratio or None, "higher" | "lower" is better for the target)
TARGETS = {
    "train_tokens_per_s": 1.5,
    "prefill_speedup": 1.3,
    "decode_b1_tokens_per_s": 3.0,
    "decode_b8_tokens_per_s": 3.0,
    "train_mfu": 0.60,
    "ckpt_staging_over_largest_shard": 1.3,
}


def _row(key, label, unit, ours, ref, ratio, target=None, lower_is_better=False, note=""):
  met = None
  if target is not None and ratio is not None:
    met = bool(ratio <= target) if lower_is_better else bool(ratio >= target)
  return dict(key=key, label=label, unit=unit, ours=ours, reference=ref, ratio=ratio, target=target,
              target_op="≤" if lower_is_better else "≥", met=met, note=note)


def _get(d, *path):
  for k in path:
    if d is None:
      return None
    d = d.get(k) if isinstance(d, dict) else None
  return d


def _div(a, b):
  return None if a is None or b in (None, 0) else a / b


def _median(bench: dict, key: str = "s") -> float:
  return bench["summary"][key]["median"]


def decode_step(bench: dict) -> Dict[str, float]:
  """Seconds per decode step: per repetition (t(N) − t(1)) / (N − 1), then the median. If timing noise makes
  that non-positive (tiny quick-mode models only), t(N) / N is used instead, an upper bound, and flagged."""
  n = bench["info"]["new_tokens"]
  per = [(r["full_s"] - r["first_s"]) / (n - 1) for r in bench["reps"]]
  step = statistics.median(per)
  if step > 0:
    return dict(step_s=step, method="difference")
  return dict(step_s=statistics.median(r["full_s"] for r in bench["reps"]) / n, method="upper_bound")


def matmul_peak(side: dict) -> Optional[float]:
  rates = [b["info"]["flop"] / _median(b) for name, b in side["benches"].items() if name.startswith("matmul_")]
  return max(rates) if rates else None


def build(results: Dict[str, dict], preset: common.Preset) -> dict:
  """results: 'jax' / 'torch' → {facts, benches: {name: {summary, reps, warmup, info}}} and the one-shot tasks'
  results by task name (missing parts are simply absent). Returns the report dict."""
  jx = (results.get("jax") or {}).get("benches")
  th = (results.get("torch") or {}).get("benches")
  rows: List[dict] = []
  derived: Dict[str, dict] = {}
  if jx and th:
    o, r = (x["train"]["info"]["tokens_per_step"] / _median(x["train"]) for x in (jx, th))
    rows.append(_row("train_tokens_per_s", "training step (fwd+bwd+AdamW)", "tokens/s", o, r, o / r,
                     TARGETS["train_tokens_per_s"]))
    o, r = _median(jx["prefill"]), _median(th["prefill"])
    rows.append(_row("prefill_speedup", f"prefill, image + prompt ({jx['prefill']['info']['prompt_tokens']} tokens)",
                     "s (time to first token)", o, r, r / o, TARGETS["prefill_speedup"],
                     note=f"PyTorch's bare forward (no generate): {_median(th['prefill_forward']):.4f} s, "
                          f"{_median(th['prefill_forward']) / o:.2f}× ours"))
    for b in preset.decode_batches:
      dj, dt = decode_step(jx[f"decode_b{b}"]), decode_step(th[f"decode_b{b}"])
      derived[f"decode_b{b}"] = dict(ours=dj, reference=dt)
      o, r = b / dj["step_s"], b / dt["step_s"]
      key = f"decode_b{b}_tokens_per_s"
      note = "" if dj["method"] == dt["method"] == "difference" else "upper-bound timing (noise > decode work)"
      rows.append(_row(key, f"decode with KV cache, batch {b}", "tokens/s", o, r, o / r, TARGETS.get(key), note=note))
    o, r = (x["vision"]["info"]["images"] / _median(x["vision"]) for x in (jx, th))
    rows.append(_row("vision_images_per_s", "vision tower (hidden_states[-2])", "images/s", o, r, o / r))
  do, dt = results.get("data_ours"), results.get("data_torch")
  if do and dt:
    rows.append(_row("data_samples_per_s", f"data pipeline, {do['workers']} worker processes", "samples/s",
                     do["samples_per_s"], dt["samples_per_s"], do["samples_per_s"] / dt["samples_per_s"],
                     note="reference: torch DataLoader running the same per-sample transform"))
  mfu = None
  if jx:
    flops = common.train_step_flops(preset, jx["train"]["info"]["logit_positions"])
    peak_j, peak_t = matmul_peak(results["jax"]), matmul_peak(results["torch"]) if th else None
    peak = max(x for x in (peak_j, peak_t) if x)
    # Each side is credited with the FLOPs it executes, counted alike: ours runs the lm_head and loss at the
    # supervised positions only ('total'), PyTorch's at every position ('reference_total'). The conventional
    # model-FLOPs count (lm_head everywhere) over our time is reported beside it (PaLM-style MFU).
    conventional = flops["conventional_total"]
    achieved = flops["total"] / _median(jx["train"])
    conventional_achieved = conventional / _median(jx["train"])
    ref_achieved = flops["reference_total"] / _median(th["train"]) if th else None
    mfu = dict(model_flops_per_step=flops, peak_flops=peak, peak_jax=peak_j, peak_torch=peak_t,
               achieved_flops=achieved, fraction=achieved / peak, reference_achieved_flops=ref_achieved,
               conventional_achieved_flops=conventional_achieved, conventional_fraction=conventional_achieved / peak,
               reference_fraction=_div(ref_achieved, peak), xla_cost_flops=jx["train"]["info"].get("xla_cost_flops"))
    rows.append(_row("train_mfu", "training step FLOP/s vs measured f32 matmul peak", "GFLOP/s",
                     achieved / 1e9, _div(ref_achieved, 1e9), achieved / peak, TARGETS["train_mfu"],
                     note=f"peak {peak / 1e9:.1f} GFLOP/s (best median rate over jax and torch GEMMs, square and "
                          f"the step's own shapes); FLOPs executed by each side (ours: lm_head and loss at "
                          f"supervised positions only); conventional MFU (lm_head at every position over our time) "
                          f"{mfu['conventional_fraction'] * 100:.0f} %; PyTorch column = its "
                          f"FLOP/s ({(mfu['reference_fraction'] or 0) * 100:.0f} % of peak)"))
  co, gen, ch = results.get("ckpt_ours"), results.get("ckpt_gen"), results.get("ckpt_hf")
  if co and gen:
    largest = gen["largest_shard_bytes"]
    hf_note = ""
    if ch:
      hf_note = (f"; transformers' from_pretrained peaks at {(ch['peak_rss'] - ch['baseline_rss']) / 2 ** 20:.0f} MiB "
                 f"over its baseline because it memory-maps the safetensors (its params are file pages, resident "
                 f"only once touched), so it has no comparable number")
    rows.append(_row("ckpt_staging_over_largest_shard",
                     f"checkpoint import staging memory ({gen['total_bytes'] / 2 ** 30:.2f} GiB, "
                     f"{gen['shards']} shards)", "MiB", co["staging_peak"] / 2 ** 20, None,
                     co["staging_peak"] / largest, TARGETS["ckpt_staging_over_largest_shard"], lower_is_better=True,
                     note=f"ratio = staging / largest shard ({largest / 2 ** 20:.0f} MiB); staging = max over the load "
                          f"of RSS − RSS before − bytes of params already placed (peak RSS "
                          f"{co['peak_rss'] / 2 ** 20:.0f} MiB for {co['param_bytes'] / 2 ** 20:.0f} MiB of params)"
                          + hf_note))
  sanity = {}
  if jx and th:
    lo, lr = jx["train"]["info"]["first_loss"], th["train"]["info"]["first_loss"]
    sanity["first_train_loss"] = dict(ours=lo, reference=lr, rel_diff=abs(lo - lr) / abs(lr))
    for b in preset.decode_batches:
      a, c = jx[f"decode_b{b}"]["info"]["tokens"], th[f"decode_b{b}"]["info"]["tokens"]
      same = sum(int(x == y) for ra, rc in zip(a, c) for x, y in zip(ra, rc))
      sanity[f"greedy_tokens_equal_b{b}"] = same / max(sum(len(ra) for ra in a), 1)
  return dict(rows=rows, mfu=mfu, sanity=sanity, derived=derived)


def _fmt(x, unit=""):
  if x is None:
    return "–"
  if isinstance(x, float):
    if abs(x) >= 100:
      return f"{x:,.0f}"
    if abs(x) >= 1:
      return f"{x:.2f}"
    return f"{x:.4f}"
  return str(x)


def markdown(report: dict, meta: dict) -> str:
  lines = [f"### llava_jax vs transformers (PyTorch) — {meta['date']}", ""]
  lines.append(f"{meta['machine'].get('cpu', '?')}, {meta['threads']} threads on both sides (torch.set_num_threads, "
               f"OMP/MKL/OpenBLAS = {meta['threads']}, CPU affinity {meta['affinity']}; XLA's pool follows the "
               f"affinity), {meta.get('allocator', 'system malloc')} on both sides, float32, preset `{meta['preset']}`, "
               f"load average {meta['load_summary']}. "
               f"Each number is the median of several repetitions after warm-up.")
  git = meta.get("git") or {}
  lines += ["", f"Commit `{git.get('commit', 'unknown')}`" + (" (uncommitted changes in the tree)" if git.get("dirty")
                                                              else "") + "."]
  lines.append("")
  lines.append("| benchmark | unit | llava_jax | PyTorch | ratio | target | result |")
  lines.append("|---|---|---:|---:|---:|---:|:---:|")
  for r in report["rows"]:
    target = "–" if r["target"] is None else f"{r['target_op']} {r['target']:g}"
    met = "–" if r["met"] is None else ("PASS" if r["met"] else "**FAIL**")
    ratio = "–" if r["ratio"] is None else (f"{r['ratio'] * 100:.0f} %" if r["key"] == "train_mfu"
                                              else f"{r['ratio']:.2f}×")
    lines.append(f"| {r['label']} | {r['unit']} | {_fmt(r['ours'])} | {_fmt(r['reference'])} | {ratio} | "
                 f"{target} | {met} |")
  notes = [f"- {r['label']}: {r['note']}" for r in report["rows"] if r["note"]]
  san = report.get("sanity") or {}
  if "first_train_loss" in san:
    s = san["first_train_loss"]
    notes.append(f"- same weights: first training loss {s['ours']:.5f} (ours) vs {s['reference']:.5f} "
                 f"(PyTorch), relative difference {s['rel_diff']:.1e}; greedy tokens equal: " + ", ".join(
                     f"batch {k.rsplit('b', 1)[1]} {v * 100:.0f} %" for k, v in san.items()
                     if k.startswith("greedy")))
  if notes:
    lines += ["", *notes]
  return "\n".join(lines) + "\n"


def chart(report: dict, meta: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in report["rows"] if r["ratio"] is not None]
  fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 2.0))
  labels = [r["label"] for r in rows]
  ratios = [r["ratio"] for r in rows]
  colors = []
  for r in rows:
    colors.append("#999999" if r["met"] is None else ("#2a9d4b" if r["met"] else "#d1495b"))
  y = range(len(rows))[::-1]
  ax.barh(list(y), ratios, color=colors)
  for yi, r in zip(y, rows):
    if r["target"] is not None:
      ax.plot([r["target"], r["target"]], [yi - 0.4, yi + 0.4], color="black", lw=2)
    text = f"{r['ratio'] * 100:.0f} %" if r["key"] == "train_mfu" else f"{r['ratio']:.2f}×"
    ax.text(max(r["ratio"], r["target"] or 0), yi, "  " + text, va="center", fontsize=9)
  ax.axvline(1.0, color="#555555", lw=0.8, ls="--")
  ax.set_yticks(list(y))
  ax.set_yticklabels(labels, fontsize=9)
  ax.set_xlabel("ratio: llava_jax / PyTorch (> 1 is better); MFU: fraction of the matmul peak;\n"
                "checkpoint: staging memory / largest shard (< target is better)", fontsize=9)
  ax.set_title(f"llava_jax vs transformers' PyTorch LLaVA, {meta['date']}, {meta['threads']} CPU threads\n"
               f"black tick = target; green = met, red = missed, grey = no target", fontsize=10)
  ax.set_xlim(0, max(ratios + [t["target"] or 0 for t in rows]) * 1.25)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
