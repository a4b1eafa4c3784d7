"""The plan's text report (`--mode=plan`): topology, state split, every measured candidate, the chosen one, step
time and wall clock."""
from __future__ import annotations

from typing import TYPE_CHECKING

from llava_jax.scale.hardware import GIB

if TYPE_CHECKING:
  from llava_jax.scale.plan import Plan


def gib(x: float) -> str:
  """Bytes as GiB with 1 decimal above 10 GiB, 2 below."""
  return f"{x / GIB:.1f}" if x >= 10 * GIB else f"{x / GIB:.2f}"


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.3g} s"
  if seconds < 7200:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def state_line(p: Plan) -> str:
  """What the state per device is made of: why a set-up fits or does not before any activation."""
  m = p.state
  if m.error:
    return f"  state: could not be counted ({m.error})"
  return (f"  state per device: {gib(m.state)} GiB = frozen {gib(m.frozen)} ({p.frozen_params / 1e9:.2f} B params, "
          f"no gradient or optimizer state) + trainable {gib(m.params)} ({p.trainable_params / 1e9:.3f} B params) + "
          f"optimizer {gib(m.optimizer)} (of the trainable only); gradients of the trainable params come on top, "
          "inside the temporaries")


def render(p: Plan) -> str:
  """The plan as text for the terminal."""
  topo, chip = p.topology, p.topology.chip
  lines = [f"Plan for {p.recipe or 'the config'} on {topo.name}: {topo.num_devices} × {chip.name} "
           f"({gib(chip.memory_bytes)} GiB, {chip.peak_flops / 1e12:.0f} TFLOP/s bf16 each), {topo.num_hosts} "
           f"host{'s' if topo.num_hosts > 1 else ''}",
           f"  step: global batch {p.global_batch} rows × {p.seq_len} tokens, {p.images} image slots; "
           f"{p.rows_per_device} rows per device; trainable {p.trainable_params / 1e9:.2f} B params, frozen "
           f"{p.frozen_params / 1e9:.2f} B",
           f"  memory budget per device: {gib(p.budget_bytes)} GiB ({gib(chip.memory_bytes)} GiB − "
           f"{p.headroom:.0%} headroom); compiled on "
           + (f"simulated CPU devices, temporaries ×{p.temp_factor:g} (calibrated on the TPU compiler, "
              "docs/scaling.md)" if p.backend == "cpu" else "libtpu's TPU compiler (deviceless)")
           + (f"\n  FALLBACK: simulated CPU devices instead of the TPU compiler ({p.backend_note})"
              if p.backend_note else "")]
  if p.problem:
    lines.append(f"  PROBLEM: {p.problem}")
    return "\n".join(lines)
  if p.state is not None:
    lines.append(state_line(p))
  lines.append("")
  if p.state_exceeds_budget:
    lines.append(f"  NOTHING FITS on this topology: the state alone is {gib(p.state.state)} GiB per device, over the "
                 f"budget of {gib(p.budget_bytes)} GiB (nothing compiled: no activation, gradient or micro-batch "
                 "setting can change that).")
    lines.append("  Use more devices (FSDP shards the state over all of them), chips with more memory, or train less "
                 "(LoRA: model.runtime.lora with train.trainable=recipes.LORA_TRAINABLE; a quantized frozen base).")
    return "\n".join(lines)
  header = (f"  {'#':>2}  {'candidate':<94} {'frozen':>6} {'train':>6} {'opt':>6} {'temp':>6} {'total':>6}  fits  "
            "recompute")
  lines += [header + "   (GiB per device)", "  " + "-" * (len(header) - 2)]
  for i, tr in enumerate(p.trials, 1):
    m = tr.memory
    if m.error:
      lines.append(f"  {i:>2}  {tr.candidate.label():<94} error: {m.error}")
      continue
    mark = "<-" if tr is p.chosen else ""
    lines.append(f"  {i:>2}  {tr.candidate.label():<94} {gib(m.frozen):>6} {gib(m.params):>6} "
                 f"{gib(m.optimizer):>6} {gib(tr.temporaries):>6} {gib(tr.total):>6}  "
                 f"{'yes' if tr.fits else 'NO':<4}  ×{tr.flops.recompute_factor:.2f} {mark}")
  lines.append("")
  if p.chosen is None:
    best = min((tr for tr in p.trials if not tr.memory.error), key=lambda tr: tr.total, default=None)
    lines.append("  NOTHING FITS on this topology.")
    if best is not None:
      m = best.memory
      state = m.params + m.frozen + m.optimizer
      lines.append(f"  The smallest measured needs {gib(best.total)} GiB per device (budget {gib(p.budget_bytes)}); "
                   f"parameters + optimizer state alone are {gib(state)} GiB.")
      if state > p.budget_bytes:
        lines.append("  The state itself does not fit: use more devices (FSDP shards it over all of them) or "
                     "chips with more memory.")
      else:
        lines.append("  Use more devices or chips with more memory, or a shorter data.max_length.")
    return "\n".join(lines)
  c, m = p.chosen.candidate, p.chosen.memory
  free = 1.0 - p.chosen.total / chip.memory_bytes
  lines.append(f"  FITS: {c.label()}")
  lines.append(f"  {gib(p.chosen.total)} GiB per device, {free:.0%} of {gib(chip.memory_bytes)} GiB free.")
  if c.attention_impl in ("cudnn", "splash") and m.compiled_attention != c.attention_impl:
    lines.append(f"  (attention measured with the 'chunked' kernel; {c.attention_impl} flash attention needs no more "
                 "memory)")
  lines.append("  Run it with:")
  lines.append(f"    python -m llava_jax.main --config={p.recipe or 'configs/<recipe>.py'} \\\n      "
               + " \\\n      ".join(c.overrides()))
  if topo.platform == "gpu":
    lines.append("    (on GPU set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95: JAX preallocates 75 % of the memory by "
                 "default; launch/slurm_gpu.sbatch does)")
  f = p.chosen.flops
  lines.append("")
  lines.append(f"  FLOPs per step (analytic): {f.model:.3g} model, {f.hardware:.3g} with recomputation "
               f"(×{f.recompute_factor:.2f}); at MFU {p.mfu:.0%} of {topo.peak_flops / 1e15:.2f} PFLOP/s: "
               f"{_duration(p.chosen.step_seconds)} per step, "
               f"{f.tokens / p.chosen.step_seconds:,.0f} tokens/s")
  if p.steps:
    what = f"{p.dataset}, {p.samples:,} samples" if p.samples else "train.num_steps"
    lines.append(f"  Recipe: {what} → {p.steps:,} steps → {_duration(p.wall_clock_hours() * 3600)} with every row "
                 f"padded to {p.seq_len} tokens (upper bound)")
    if p.mean_tokens:
      lines.append(f"          {_duration(p.wall_clock_hours(p.mean_tokens) * 3600)} at {p.mean_tokens} tokens per row")
      if p.packed_steps(p.mean_tokens):
        lines.append(f"          {_duration(p.packed_wall_clock_hours(p.mean_tokens) * 3600)} with packed rows "
                     f"(data.packing=True: {p.seq_len / min(p.mean_tokens, p.seq_len):.1f} samples of "
                     f"{p.mean_tokens} tokens per row → {p.packed_steps(p.mean_tokens):,} steps)")
    if p.published_hours:
      lines.append(f"          published (PyTorch + DeepSpeed, 8×A100): ≈{p.published_hours:g} h")
  return "\n".join(lines)
