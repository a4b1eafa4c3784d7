"""The recipe tables of docs/scaling.md, from the TPU compiler: `python -m llava_jax.scale.table [--out=...]`.

For every (recipe, TPU slice) it runs the plan (`plan.plan`, backend 'tpu': libtpu's deviceless compiler) and for
every (model, slice) the serving plan (`serve.plan_serving_process`), appending one JSON line per result to
`--out` (rows already there are skipped, so an interrupted run resumes), then prints the markdown tables
(`--render_only` prints them from the file). Needs libtpu (`pip install -e '.[dev]'`); minutes per 7B / 13B
compile on a CPU, so run it in the background: `nice python -m llava_jax.scale.table &`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import List, Optional

from absl import app, flags

from llava_jax import config_files
from llava_jax.scale.hardware import GIB
from llava_jax.scale.results import DOCS, append_row, read_rows


@dataclasses.dataclass(frozen=True)
class Recipe:
  config: str            # 'configs/v15_stage2.py:7b'
  label: str
  mean_tokens: int       # assumed mean tokens per sample of the recipe's data (the packed-rows column)
  samples: Optional[int] = None  # data-set size when the plan cannot look it up by the config's name


# Mean tokens per sample (estimates, see docs/scaling.md): stage 1 rows are 576 image tokens + a short caption
# and the 'plain' template (≈ 600); stage 2 (mix665k: multi-turn instructions, short VQA answers, text-only
# ShareGPT) ≈ 1,000, which is what the published 8×A100 times correspond to at 30 % MFU.
RECIPES = (
    Recipe("configs/v15_stage2.py:7b", "v1.5 stage 2, 7B", 1000),
    Recipe("configs/v15_stage2.py:13b", "v1.5 stage 2, 13B", 1000),
    Recipe("configs/v15_stage1.py:7b", "v1.5 stage 1, 7B", 600),
    Recipe("configs/v15_stage1.py:13b", "v1.5 stage 1, 13B", 600),
    Recipe("configs/llama32_1b.py:stage2", "LLaMA-3.2-1B stage 2 (mix665k)", 1000, samples=665_298),
)
SLICES = ("v5e-32", "v5p-16", "v4-16", "v6e-16")
SERVE_MODELS = (("configs/v15_stage2.py:7b", "v1.5 7B"), ("configs/v15_stage2.py:13b", "v1.5 13B"),
                ("configs/llama32_1b.py:stage2", "LLaMA-3.2-1B"))

_OUT = flags.DEFINE_string("out", os.path.join(DOCS, "scaling_tpu.jsonl"), "JSON lines: one per result.")
_SLICES = flags.DEFINE_list("slices", list(SLICES), "TPU slices (Cloud TPU types).")
_ONLY = flags.DEFINE_list("only", [], "Only these recipes (config[:arg]); default: all.")
_SERVE = flags.DEFINE_bool("serve", True, "Also the serving plans.")
_TRAIN = flags.DEFINE_bool("train", True, "The training plans.")
_MFU = flags.DEFINE_float("mfu", 0.4, "MFU for step times.")
_CONTEXT = flags.DEFINE_integer("serve_context", 4096, "Serving: tokens of context per row.")
_SERVE_PROBE = flags.DEFINE_integer("serve_probe", 8, "Serving: rows per chip of the second measured batch (after 1).")
_SERVE_CHECKS = flags.DEFINE_integer("serve_checks", 2, "Serving: compiles after the 1- and 2-row ones in the search "
                                     "for the largest batch (each a 7B/13B compile of minutes).")
_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Only print the tables from --out.")


def changes(base, chosen) -> str:
  """What the search changed from the recipe (candidate → candidate), as words for the table."""
  out = []
  if chosen.attention_impl != base.attention_impl:
    out.append(f"{chosen.attention_impl} attention")
  if chosen.chunked_loss and not base.chunked_loss:
    out.append("chunked loss")
  if chosen.remat_policy != base.remat_policy:
    out.append(f"remat {chosen.remat_policy}")
  if chosen.micro_batches != base.micro_batches:
    out.append(f"{chosen.micro_batches} micro-batches")
  if tuple(chosen.mesh) != tuple(base.mesh):
    out.append("mesh {}x{}x{}".format(*chosen.mesh))
  return ", ".join(out) or "as configured"


def train_row(recipe: Recipe, slice_name: str, mfu: float) -> dict:
  from llava_jax.scale.plan import plan
  t0 = time.time()
  p = plan(config_files.load(recipe.config), slice_name, recipe=recipe.config, mfu=mfu, backend="tpu",
           mean_tokens=recipe.mean_tokens, samples=recipe.samples, log=lambda s: print(s, flush=True))
  row = dict(kind="train", recipe=recipe.config, label=recipe.label, slice=slice_name, fits=p.fits,
             problem=p.problem, devices=p.topology.num_devices, budget=p.budget_bytes, mean_tokens=recipe.mean_tokens,
             trials=[dict(label=tr.candidate.label(), total=tr.total, error=tr.memory.error,
                          seconds=tr.memory.compile_seconds) for tr in p.trials],
             seconds=time.time() - t0)
  if p.trials:
    best = p.chosen or min((tr for tr in p.trials if not tr.memory.error), key=lambda tr: tr.total, default=None)
    if best is not None:
      m = best.memory
      row.update(changes=changes(p.trials[0].candidate, best.candidate), total=best.total,
                 state=m.params + m.frozen + m.optimizer, temporaries=m.temporaries,
                 free=1.0 - best.total / p.topology.chip.memory_bytes)
  if p.chosen is not None:
    row.update(step_seconds=p.chosen.step_seconds, hours=p.wall_clock_hours(),
               packed_hours=p.packed_wall_clock_hours(recipe.mean_tokens),
               packed_steps=p.packed_steps(recipe.mean_tokens),
               steps=p.steps, mesh=list(p.chosen.candidate.mesh))
  return row


def serve_row(config_path: str, label: str, slice_name: str, context: int) -> dict:
  from llava_jax import recipes
  from llava_jax.scale.hardware import get_topology
  from llava_jax.scale.plan import DEFAULT_HEADROOM
  from llava_jax.scale.serve import kv_bytes_per_token, plan_serving_process
  topo = get_topology(slice_name)
  config = config_files.load(config_path)
  config.model.runtime.param_dtype = "bfloat16"  # served weights in bf16
  config.model.runtime.attention_impl = "chunked"  # prefill of a 4k prompt without [B, H, T, T] scores
  t0 = time.time()
  sp = plan_serving_process(config, topo.num_devices, topo.chip.memory_bytes * (1 - DEFAULT_HEADROOM), backend="tpu",
                            tpu_topology=topo.tpu_topology(), context=context, max_checks=_SERVE_CHECKS.value,
                            probe_rows=_SERVE_PROBE.value,
                            log=lambda s: print(s, flush=True))
  model_config = recipes.llava_config(config.model)
  return dict(kind="serve", recipe=config_path, label=label, slice=slice_name, devices=topo.num_devices,
              context=context, params=sp.params_per_device, kv_per_token=kv_bytes_per_token(model_config),
              kv_per_row=sp.kv_per_row_per_device, max_rows=sp.max_rows_per_device,
              peak=sp.checked.peak if sp.checked else None, budget=sp.budget_bytes,
              measures=[(m.rows_per_device, m.prefill.total, m.decode.total) for m in sp.measures],
              seconds=time.time() - t0)


def _hours(h: Optional[float]) -> str:
  if h is None:
    return ""
  return f"{h * 60:.0f} min" if h < 2 else f"{h:.1f} h"


def render(rows: List[dict]) -> str:
  """The markdown tables (training, then serving) from the JSON rows."""
  from llava_jax.scale.hardware import get_topology
  lines = ["| recipe | slice (chips) | fits with | GiB / chip (state + temp.) | free | s / step | wall clock, rows "
           "padded to 2048 | packed rows (mean tokens) |", "|---|---|---|---|---|---|---|---|"]
  for r in (r for r in rows if r["kind"] == "train"):
    topo = get_topology(r["slice"])
    where = f"{r['slice']} ({r['devices']} × {topo.chip.name}, {topo.chip.memory_bytes / GIB:.0f} GiB)"
    if r.get("problem"):
      lines.append(f"| {r['label']} | {where} | PROBLEM: {r['problem']} | | | | | |")
    elif not r["fits"]:
      best = f" (best: {r['changes']}, {r['total'] / GIB:.1f} GiB > {r['budget'] / GIB:.1f})" if r.get("total") else ""
      lines.append(f"| {r['label']} | {where} | **nothing fits**{best} | | | | | |")
    else:
      lines.append(f"| {r['label']} | {where} | {r['changes']} | {r['total'] / GIB:.1f} ({r['state'] / GIB:.1f} + "
                   f"{r['temporaries'] / GIB:.1f}) | {r['free']:.0%} | {r['step_seconds']:.2f} | "
                   f"{_hours(r['hours'])} | "
                   f"{_hours(r['packed_hours'])} ({r['mean_tokens']}) |")
  serve = [r for r in rows if r["kind"] == "serve"]
  if serve:
    lines += ["", "| model (bf16 weights) | slice (chips) | params GiB / chip | KV cache per 4k row | largest batch at "
              f"{serve[0]['context']} tokens: rows / chip (in all) | GiB / chip at that batch |",
              "|---|---|---|---|---|---|"]
    for r in serve:
      topo = get_topology(r["slice"])
      lines.append(f"| {r['label']} | {r['slice']} ({r['devices']} × {topo.chip.name}) | {r['params'] / GIB:.2f} | "
                   f"{r['kv_per_token'] * r['context'] / GIB:.2f} GiB ({r['kv_per_token'] // 1024} KiB / token) | "
                   f"{r['max_rows']} ({r['max_rows'] * r['devices']}) | "
                   + (f"{r['peak'] / GIB:.1f} of {r['budget'] / GIB:.1f} |" if r.get("peak") else "|"))
  return "\n".join(lines)


def main(argv):
  del argv
  rows = read_rows(_OUT.value)
  if not _RENDER_ONLY.value:
    from llava_jax.scale import tpu
    if not tpu.libtpu_available():
      sys.exit("llava_jax.scale.table needs libtpu: pip install -e '.[dev]'")
    import jax
    jax.config.update("jax_platforms", "cpu")  # this process only counts; the compiles run in child processes
    done = {(r["kind"], r["recipe"], r["slice"]) for r in rows}
    todo = []
    if _TRAIN.value:
      todo += [("train", rec, s) for rec in RECIPES for s in _SLICES.value]
    if _SERVE.value:
      todo += [("serve", m, s) for m in SERVE_MODELS for s in _SLICES.value]
    for kind, what, s in todo:
      path = what.config if kind == "train" else what[0]
      if (kind, path, s) in done or (_ONLY.value and path not in _ONLY.value):
        continue
      print(f"== {kind} {path} on {s}", flush=True)
      try:
        row = train_row(what, s, _MFU.value) if kind == "train" else serve_row(what[0], what[1], s, _CONTEXT.value)
      except Exception as e:  # noqa: BLE001 — one failed row must not lose the others
        print(f"   failed: {type(e).__name__}: {e}", flush=True)
        continue
      rows.append(append_row(_OUT.value, row))
  print(render(rows))


if __name__ == "__main__":
  app.run(main)
