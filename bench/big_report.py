"""Rows, PASS/FAIL against issue 13's targets, and markdown for the 7B-shaped group (bench/big.py).

Ratios are oriented so that > 1 means llava_jax is better (a latency ratio is reference / ours), except the
import row, which is our peak RSS over the bf16 parameter bytes (≤ target is met). A row whose side did not
run has no ratio and says which side is missing.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from bench import big, big_ckpt, big_kernels

LABELS = {"ours_bf16": "llava_jax bf16", "ours_int8": "llava_jax int8", "ours_int4": "llava_jax int4",
          "ours_nf4": "llava_jax nf4", "hf_bf16": "transformers bf16",
          "torch_int8": "transformers + torch dynamic int8"}


def _row(key, label, unit, ours, ref, ref_label, ratio, target, lower_is_better=False, note=""):
  met = None
  if target is not None and ratio is not None:
    met = bool(ratio <= target) if lower_is_better else bool(ratio >= target)
  return dict(key=key, label=label, unit=unit, ours=ours, reference=ref, reference_label=ref_label, ratio=ratio,
              target=target, target_op="≤" if lower_is_better else "≥", met=met, note=note)


def _div(a, b):
  return None if a is None or not b else a / b


def _tps(r: Optional[dict]) -> Optional[float]:
  return None if not r or not r.get("decode_step_s") else 1.0 / r["decode_step_s"]


def _gib(x) -> Optional[float]:
  return None if x is None else x / 2 ** 30


def build(s: big_ckpt.BigShapes, ckpt: dict, results: Dict[str, dict], skipped: Dict[str, str], loads: list) -> dict:
  rows: List[dict] = []
  bf16 = ckpt["total_bytes"]
  for name in ("ours_bf16", "hf_bf16", "torch_int8", "ours_int8", "ours_int4", "ours_nf4"):
    r = results.get(name)
    if r is None:
      continue
    ratio = r["import_peak_delta"] / bf16
    ours = name.startswith("ours")
    target = big.TARGET_IMPORT if name == "ours_bf16" else None
    rows.append(_row(f"import_rss_{name}", f"import peak RSS, {LABELS[name]}", "GiB", _gib(r["import_peak_delta"]),
                     _gib(bf16), "bf16 params", ratio, target, lower_is_better=True,
                     note=("" if ours else "from_pretrained memory-maps the shards: file pages count in RSS "
                           "once touched")))
  for name, ref_name in big.PAIRS.items():
    r, ref = results.get(name), results.get(ref_name)
    if r is None and name not in skipped:  # not requested
      continue
    missing = [LABELS[n] for n, x in ((name, r), (ref_name, ref)) if x is None]
    failed = [f"{LABELS[n]} failed after loading: {x['error']}" for n, x in ((name, r), (ref_name, ref))
              if x is not None and x.get("error")]
    note = "; ".join(([f"not measured: {', '.join(missing)}"] if missing else []) + failed)
    ttft, ref_ttft = (r or {}).get("ttft_s"), (ref or {}).get("ttft_s")
    rows.append(_row(f"ttft_{name}", f"time to first token, {LABELS[name]} vs {LABELS[ref_name]}", "s", ttft,
                     ref_ttft, LABELS[ref_name], _div(ref_ttft, ttft), big.TARGET_VS_HF, note=note))
    rows.append(_row(f"decode_{name}", f"decode batch 1, {LABELS[name]} vs {LABELS[ref_name]}", "tokens/s",
                     _tps(r), _tps(ref), LABELS[ref_name], _div(_tps(r), _tps(ref)), big.TARGET_VS_HF, note=note))
  for name, target in (("ours_int8", big.TARGET_INT8), ("ours_int4", None), ("ours_nf4", None)):
    if name in results and "ours_bf16" in results:
      rows.append(_row(f"decode_{name}_over_bf16", f"decode batch 1, {LABELS[name]} vs llava_jax bf16", "tokens/s",
                       _tps(results[name]), _tps(results["ours_bf16"]), LABELS["ours_bf16"],
                       _div(_tps(results[name]), _tps(results["ours_bf16"])), target))
  sanity = {}
  if results.get("ours_bf16", {}).get("tokens") and results.get("hf_bf16", {}).get("tokens"):
    a, b = results["ours_bf16"]["tokens"], results["hf_bf16"]["tokens"]
    sanity["greedy_tokens_equal_bf16"] = sum(int(x == y) for x, y in zip(a, b)) / max(len(a), 1)
  loads = list(loads) + [x for r in results.values() for x in (r.get("loadavg_before"), r.get("loadavg_after")) if x]
  return dict(shapes=s.name, checkpoint=ckpt, rows=rows, sanity=sanity, skipped=skipped, loadavg_samples=loads,
              rows_missing=[r for r in big.ROWS if r not in results], kernels=kernel_rows(results.get(big.KERNELS)))


# (label, our kernel, reference side, reference kernel): bench/big_kernels.py's names
KERNEL_PAIRS = (("decode GEMV, bf16 weights", "gemv_bf16", "torch", "gemv_bf16"),
                ("decode GEMV, int8 weights (torch: dynamic int8)", "gemv_int8", "torch", "gemv_int8"),
                ("decode GEMV, int4 weights vs torch bf16", "gemv_int4", "torch", "gemv_bf16"),
                ("decode GEMV, float32 weights vs torch bf16", "gemv_f32", "torch", "gemv_bf16"),
                ("decode GEMV, llava_jax int8 vs llava_jax bf16", "gemv_int8", "jax", "gemv_bf16"),
                ("prefill GEMM, bf16", "gemm_bf16", "torch", "gemm_bf16"))


def kernel_rows(k: Optional[dict]) -> List[dict]:
  """The matmul ceilings as rows: times, the rate that bounds each (weight GB/s for a GEMV, GFLOP/s for the
  GEMM), reference time / our time (> 1: our kernel is faster), and our time under the system malloc when the
  run preloaded tcmalloc (`system_ms`)."""
  if not k:
    return []
  rows = []
  for label, ours, side, ref in KERNEL_PAIRS:
    a, b = k["jax"].get(ours), k[side].get(ref)
    if a is None or b is None:
      continue
    rate = "gflop_s" if ours.startswith("gemm") else "weight_gb_s"
    system = (k.get("jax_system_malloc") or {}).get(ours)
    rows.append(dict(label=label, m=a["m"], d=a["d"], f=a["f"], ours_ms=a["median_s"] * 1e3,
                     ref_ms=b["median_s"] * 1e3, system_ms=None if system is None else system["median_s"] * 1e3,
                     rate_unit="GFLOP/s" if rate == "gflop_s" else "GB/s of weights", ours_rate=a[rate],
                     ref_rate=b[rate], ratio=b["median_s"] / a["median_s"],
                     reference=("llava_jax " if side == "jax" else "PyTorch ") + ref.split("_", 1)[1]))
  return rows


def kernel_markdown(rows: List[dict], k: dict) -> List[str]:
  if not rows:
    return []
  g = k.get("git") or {}
  shape = f"W {rows[0]['d']} × {rows[0]['f']}"
  out = ["", f"#### Matmul ceilings: the decoder's gate / up_proj alone (x · W, {shape})", "",
         f"`bench/big_kernels.py`, commit `{str(g.get('commit', '?'))[:12]}`, {k.get('allocator', 'system malloc')}: "
         f"llava_jax's own Dense / QuantDense jitted, PyTorch's F.linear / dynamic int8 Linear, median of "
         f"{big_kernels.REPS} calls. The decoder's matmuls are most of a 7B model's time per token, so these "
         "ratios bound the model rows' above. The last column is our kernel again under the system malloc "
         "(llava_jax/allocator.py).", "",
         "| kernel | rows of x | llava_jax ms | reference | reference ms | llava_jax rate | reference rate | "
         "reference time / ours | llava_jax ms, system malloc |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    out.append(f"| {r['label']} | {r['m']} | {_fmt(r['ours_ms'])} | {r['reference']} | {_fmt(r['ref_ms'])} | "
               f"{_fmt(r['ours_rate'])} {r['rate_unit']} | {_fmt(r['ref_rate'])} {r['rate_unit']} | "
               f"{r['ratio']:.2f}× | {_fmt(r.get('system_ms'))} |")
  return out


def _fmt(x) -> str:
  if x is None:
    return "–"
  if abs(x) >= 100:
    return f"{x:,.0f}"
  if abs(x) >= 1:
    return f"{x:.2f}"
  return f"{x:.3g}"


def markdown(rep: dict, meta: dict, results: Dict[str, dict]) -> str:
  ck = rep["checkpoint"]
  one_minute = [x[0] for x in rep["loadavg_samples"]]
  git = meta.get("git", {})
  lines = [f"### llava_jax vs transformers on llava-v1.5-7b shapes (random weights) — {meta['date']}", "",
           f"{meta['machine'].get('cpu', '?')}, {meta['threads']} threads, CPU affinity {meta['affinity']}, "
           f"{meta.get('allocator', 'system malloc')} in every row; "
           f"report written at commit `{git.get('commit', '?')[:12]}`{' (dirty tree)' if git.get('dirty') else ''} "
           f"(each row's own commit below). Checkpoint: "
           f"{ck['tensors']} bf16 tensors, {ck['total_bytes'] / 2 ** 30:.2f} GiB in {ck['shards']} shards "
           f"(transformers-5 llava-hf layout, `bench/big_ckpt.py`). Prompt: 1 image ({meta['image_size']} px, "
           f"{meta['image_tokens']} tokens) + "
           f"{meta['prompt_text']} text tokens; greedy decode of {meta['new_tokens']} new tokens; one timed run per "
           f"row after a warm-up, rows in separate processes one after another (no alternation: two 7B "
           f"models do not fit in memory). 1-min load average {min(one_minute):.2f}–{max(one_minute):.2f}.", "",
           "| benchmark | unit | llava_jax | reference | ratio | target | result |",
           "|---|---|---:|---:|---:|---:|:---:|"]
  for r in rep["rows"]:
    target = "–" if r["target"] is None else f"{r['target_op']} {r['target']:g}"
    result = "–" if r["met"] is None else ("PASS" if r["met"] else "**FAIL**")
    ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}×"
    lines.append(f"| {r['label']} | {r['unit']} | {_fmt(r['ours'])} | {_fmt(r['reference'])} | {ratio} | "
                 f"{target} | {result} |")
  notes = [f"- {r['label']}: {r['note']}" for r in rep["rows"] if r["note"]]
  for name, r in results.items():
    if name not in LABELS:  # the kernels entry: its own table
      continue
    g = r.get("git") or {}
    bits = [f"commit `{str(g.get('commit', '?'))[:12]}`{' (dirty)' if g.get('dirty') else ''}",
            f"load {r['load_s']:.0f} s"]
    if r.get("warmup_s") is not None:
      bits.append(f"warm-up {r['warmup_s']:.0f} s")
    if r.get("peak_rss"):
      bits.append(f"peak RSS over the whole run {r['peak_rss'] / 2 ** 30:.1f} GiB")
    bits.append(f"load average {r['loadavg_before'][0]:.1f} → {r['loadavg_after'][0]:.1f}")
    if r.get("quantize_s") is not None:
      bits.append(f"quantize_dynamic {r['quantize_s']:.0f} s")
    if r.get("recompiled"):
      bits.append("**the timed run recompiled**")
    notes.append(f"- {LABELS[name]}: " + ", ".join(bits))
  if "greedy_tokens_equal_bf16" in rep["sanity"]:
    notes.append(f"- greedy tokens equal, llava_jax bf16 vs transformers bf16: "
                 f"{rep['sanity']['greedy_tokens_equal_bf16'] * 100:.0f} % (random weights, bf16 rounding differs)")
  for name, why in rep["skipped"].items():
    notes.append(f"- **not measured: {LABELS.get(name, name)}**: {why}")
  missing = [LABELS[n] for n in rep["rows_missing"] if n not in rep["skipped"]]
  if missing:
    notes.append(f"- rows not in this report: {', '.join(missing)}")
  kernels = kernel_markdown(rep.get("kernels") or [], results.get(big.KERNELS) or {})
  return "\n".join(lines + [""] + notes + kernels) + "\n"
