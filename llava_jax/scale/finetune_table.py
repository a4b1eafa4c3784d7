"""What fits for fine-tuning v1.5-7B on one GPU or a small TPU slice: full fine-tune vs LoRA vs QLoRA.

`python -m llava_jax.scale.finetune_table [--out=docs/scaling_lora.jsonl] [--render_only]` plans each
(method, topology) with `plan.plan` — the training's own abstract state and train step, the TPU compiler for
TPU slices, the simulated CPU devices with calibrated temporaries (labelled) for GPUs — appending one JSON line
per result to `--out` (rows already there are skipped, so an interrupted run resumes), then prints the markdown
table of docs/scaling.md ("Fine-tuning 7B on one GPU or a v5e-8").

Each row is one probe, not the plan's whole search: the recipe with every memory saver on (the platform's fast
attention kernel, chunked vocabulary loss, full remat) at `--micro_rows` rows per device per micro-batch (1:
the least memory any setting of the step needs; the reference's LoRA runs 16). The state (frozen base,
trainable params, optimizer state) is counted first; when it alone exceeds the budget the row says so without
compiling. 7B compiles take 5-15 min of one CPU core each: run it niced in the background.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import List, Optional

from absl import app, flags

from llava_jax import config_files
from llava_jax.scale.hardware import GIB
from llava_jax.scale.results import DOCS, append_row, read_rows


@dataclasses.dataclass(frozen=True)
class Method:
  key: str               # the row's key in the JSON lines ('lora', 'qlora_nf4', ...)
  label: str
  config: str            # 'configs/v15_lora.py:7b'
  quantize: Optional[str] = None  # model.runtime.quantize of the frozen base (None: param_dtype)
  param_dtype: Optional[str] = None  # model.runtime.param_dtype (None: the recipe's, float32)


METHODS = (
    Method("full", "full fine-tune (LLM + projector)", "configs/v15_stage2.py:7b"),
    Method("lora", "LoRA r 128 (adapters + projector)", "configs/v15_lora.py:7b"),
    Method("lora_bf16", "LoRA r 128, bf16 params", "configs/v15_lora.py:7b", param_dtype="bfloat16"),
    Method("qlora_int8", "QLoRA, int8 base", "configs/v15_qlora.py:7b", "int8"),
    Method("qlora_nf4", "QLoRA, NF4 base", "configs/v15_qlora.py:7b", "nf4"),
)
TOPOLOGIES = ("1xA100-80G", "1xA100-40G", "v5e-8")


def define_flags() -> None:
  """The command's flags (defined when run as a program, so importing this module defines none: `scale.table`
  has flags of the same names)."""
  flags.DEFINE_string("out", os.path.join(DOCS, "scaling_lora.jsonl"), "JSON lines: one per result.")
  flags.DEFINE_list("methods", [m.key for m in METHODS], "Methods (keys of METHODS).")
  flags.DEFINE_list("topologies", list(TOPOLOGIES), "Topologies.")
  flags.DEFINE_integer("micro_rows", 1, "Rows per device per micro-batch of the probe.")
  flags.DEFINE_float("mfu", 0.4, "MFU for step times.")
  flags.DEFINE_bool("search", False, "When --micro_rows rows do not fit, bisect down to 1 row (more compiles).")
  flags.DEFINE_bool("render_only", False, "Only print the table from --out.")


def probe_config(method: Method, topology: str, micro_rows: int = 1):
  """The method's recipe with every memory saver on, at `micro_rows` rows per device per micro-batch.

  Returns (config, note): note is non-empty when the row cannot be planned (rows that do not split)."""
  from llava_jax import recipes
  from llava_jax.scale.hardware import get_topology
  from llava_jax.scale.plan import LOSS_CHUNK, fast_attention, resolve_mesh
  config = config_files.load(method.config)
  if method.quantize:
    recipes.with_quantize(config, method.quantize)
  topo = get_topology(topology)
  rt = config.model.runtime
  if method.param_dtype:
    rt.param_dtype = method.param_dtype
  rt.attention_impl = fast_attention(topo.platform, rt.dtype)
  rt.remat_policy = "full"
  config.train.chunked_loss = True if LOSS_CHUNK == 512 else LOSS_CHUNK
  text = recipes.llava_config(config.model).text
  gb = int(config.train.global_batch_size)
  d, f, _ = resolve_mesh(tuple(config.mesh), topo.num_devices, gb, text.num_attention_heads,
                         text.num_key_value_heads)
  rows = gb // (d * f)
  if rows % micro_rows:
    return config, f"{rows} rows per device do not split into micro-batches of {micro_rows}"
  config.train.micro_batches = rows // micro_rows
  return config, ""


def row(method: Method, topology: str, micro_rows: int, mfu: float, search: bool = False) -> dict:
  """Plan one (method, topology) probe → a JSON-able row. search: when `micro_rows` rows per micro-batch do not
  fit, the plan bisects the micro-batch ladder down to 1 row (a few more compiles) for the most that fit."""
  from llava_jax.scale.plan import plan
  out = dict(method=method.key, label=method.label, config=method.config, quantize=method.quantize,
             param_dtype=method.param_dtype, topology=topology, micro_rows=micro_rows, search=bool(search))
  config, note = probe_config(method, topology, micro_rows)
  if note:
    return dict(out, skipped=note)
  t0 = time.time()
  p = plan(config, topology, recipe=method.config, mfu=mfu, max_trials=6 if search else 1,
           log=lambda s: print(s, flush=True))
  out.update(backend=p.backend, backend_note=p.backend_note, temp_factor=p.temp_factor, budget=p.budget_bytes,
             memory=p.topology.chip.memory_bytes, devices=p.topology.num_devices, problem=p.problem, fits=p.fits,
             trainable_params=p.trainable_params, frozen_params=p.frozen_params, seconds=time.time() - t0,
             state_exceeds=p.state_exceeds_budget)
  if p.state is not None:
    out.update(frozen=p.state.frozen, trainable=p.state.params, optimizer=p.state.optimizer,
               state_error=p.state.error)
  if p.trials:
    measured = [tr for tr in p.trials if not tr.memory.error]
    tr = p.chosen or (min(measured, key=lambda t: t.total) if measured else p.trials[0])
    out.update(candidate=tr.candidate.label(), overrides=tr.candidate.overrides(), error=tr.memory.error,
               temporaries=tr.temporaries, total=tr.total, raw_temporaries=tr.memory.temporaries,
               compile_seconds=tr.memory.compile_seconds, step_seconds=tr.step_seconds,
               rows=p.rows_per_device // tr.candidate.micro_batches,
               trials=[dict(rows=p.rows_per_device // t.candidate.micro_batches, total=t.total, fits=t.fits,
                            error=t.memory.error, seconds=t.memory.compile_seconds) for t in p.trials])
  print(p.render(), flush=True)
  return out


def _gib(x) -> str:
  return f"{x / GIB:.1f}"


def _where(r: dict) -> str:
  if r.get("backend") == "tpu":
    return f"{r['topology']} (TPU compiler)"
  return f"{r['topology']} (simulated CPU, temp. ×{r.get('temp_factor', 1.25):g})"


def _rows(r: dict) -> int:
  return int(r.get("rows", r["micro_rows"]))


def _compiled(r: dict) -> list:
  """(rows per micro-batch, fits) of every compile a row made."""
  if r.get("trials"):
    return [(t["rows"], bool(t["fits"])) for t in r["trials"]]
  return [(_rows(r), bool(r.get("fits")))] if "total" in r or r.get("error") else []


def render(rows: List[dict], methods=METHODS, topologies=TOPOLOGIES) -> str:
  """The markdown table from the JSON rows: per (method, topology) the most rows per micro-batch compiled that fit
  (or, when none fits, the least-memory probe), and the fewest compiled that did not; the pairs without a row are
  listed as not planned yet."""
  lines = ["| method | topology | fits? | GiB / device: frozen + trainable + optimizer = state | temp. | total "
           "(budget) | rows / micro-batch |", "|---|---|---|---|---|---|---|"]
  missing = []
  for m in methods:
    for t in topologies:
      found = [r for r in rows if r["method"] == m.key and r["topology"] == t]
      if not found:
        missing.append(f"{m.label} on {t}")
        continue
      fitting = [r for r in found if r.get("fits")]
      r = max(fitting, key=_rows) if fitting else min(found, key=_rows)
      state = (f"{_gib(r['frozen'])} + {_gib(r['trainable'])} + {_gib(r['optimizer'])} = "
               f"{_gib(r['frozen'] + r['trainable'] + r['optimizer'])}" if r.get("frozen") is not None else "")
      budget = f"({_gib(r['budget'])})" if r.get("budget") else ""
      if r.get("problem"):
        lines.append(f"| {m.label} | {_where(r)} | PROBLEM: {r['problem']} | | | | |")
        continue
      if r.get("state_exceeds"):
        lines.append(f"| {m.label} | {_where(r)} | **no**: the state alone is over the budget (not compiled) | "
                     f"{state} | | {budget} | any |")
        continue
      failed = sorted(n for x in found for n, ok in _compiled(x) if not ok and n > _rows(r))
      rows_ = str(_rows(r)) + (f" ({failed[0]}: no)" if failed else "")
      if "RESOURCE_EXHAUSTED" in (r.get("error") or ""):  # the TPU compiler's own verdict: over the HBM
        need = re.search(r"temporaries \(([^)]*)\) exceeds available HBM \(([^)]*)\)", r["error"])
        why = f"HLO temporaries {need.group(1)} > {need.group(2)} of HBM" if need else "out of HBM"
        lines.append(f"| {m.label} | {_where(r)} | **no**: the TPU compiler refuses it ({why}) | {state} | | "
                     f"{budget} | {rows_} |")
      elif r.get("error"):
        lines.append(f"| {m.label} | {_where(r)} | compile error: {r['error'][:120]} | {state} | | {budget} | "
                     f"{rows_} |")
      else:
        lines.append(f"| {m.label} | {_where(r)} | {'**yes**' if r['fits'] else '**no**'} | {state} | "
                     f"{_gib(r['temporaries'])} | {_gib(r['total'])} {budget} | {rows_} |")
  text = "\n".join(lines)
  if missing:
    text += ("\n\nNot planned yet (`nice python -m llava_jax.scale.finetune_table` adds them): " + "; ".join(missing)
             + ".")
  return text


def main(argv):
  del argv
  F = flags.FLAGS
  rows = read_rows(F.out)
  if not F.render_only:
    import jax
    jax.config.update("jax_platforms", "cpu")  # this process only counts; the compiles run in child processes
    known = {m.key: m for m in METHODS}
    unknown = [k for k in F.methods if k not in known]
    if unknown:
      sys.exit(f"unknown methods {unknown}; known: {sorted(known)}")
    done = {(r["method"], r["topology"], r["micro_rows"], r.get("search", False)) for r in rows}
    for key in F.methods:
      for t in F.topologies:
        if (key, t, F.micro_rows, F.search) in done:
          continue
        print(f"== {key} on {t}, {F.micro_rows} row(s) per micro-batch", flush=True)
        try:
          r = row(known[key], t, F.micro_rows, F.mfu, F.search)
        except Exception as e:  # noqa: BLE001 — one failed row must not lose the others
          print(f"   failed: {type(e).__name__}: {e}", flush=True)
          continue
        if r.get("skipped"):
          print(f"   not planned: {r['skipped']}", flush=True)
          continue
        if (r.get("error") or "").startswith("the measuring process died"):  # the machine's failure, not a verdict
          print(f"   not recorded (a rerun retries it): {r['error']}", flush=True)
          continue
        rows.append(append_row(F.out, r))
  print(render(rows))


if __name__ == "__main__":
  define_flags()
  app.run(main)
