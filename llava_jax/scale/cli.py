"""`python -m llava_jax.main --mode=plan --config=configs/<recipe>.py[:arg] --plan.topology=<name> [--plan.*]`."""
from __future__ import annotations

import ml_collections

from llava_jax.scale.hardware import TOPOLOGIES, get_topology


def plan_flag_defaults() -> ml_collections.ConfigDict:
  """The `--plan.*` flags (an absl config dict)."""
  return ml_collections.ConfigDict(dict(
      topology="",        # '8xA100-80G', '8xA100-40G', '8xH100', 'v4-32', 'v5p-64', 'v5e-256', '<n>x<GPU>', ...
      mfu=0.4,            # model FLOPs utilization assumed for the step time
      headroom=0.10,      # fraction of each chip's memory kept free
      backend="auto",     # 'auto' (TPU compiler for TPU topologies when libtpu is installed) | 'cpu' | 'tpu'
      temp_factor=0.0,    # scale of simulated-CPU temporaries (0: the TPU-calibrated default; 1: raw CPU numbers)
      explore=False,      # also try remat policies that recompute less, at the fitting setting
      max_trials=10,      # most candidates compiled
      mean_tokens=0,      # also project the wall clock at this many tokens per row / packed (0: only padded rows)
      samples=0,          # data-set size for the wall clock (0: the recipe's published data set)
      serve=False,        # also plan serving: KV cache per device, largest batch at serve_context tokens per row
      serve_context=4096,  # prompt + new tokens per row
      serve_new=512,      # of which new tokens
      serve_max_rows=1024,  # most rows per device the serving search tries
      train=True,         # plan the training step (False with serve=True: serving only)
  ))


def run_plan(config, plan_config, config_path: str, out=print) -> int:
  """Plan and print. Returns the process exit code: 0 when a candidate fits, 3 when nothing does."""
  import jax
  from jax._src import xla_bridge
  from llava_jax.scale.plan import plan, resolve_backend
  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")  # this process only plans: the compiles run in a child process
  if not plan_config.topology:
    raise ValueError(f"--mode=plan needs --plan.topology (one of {', '.join(TOPOLOGIES)}, or '<n>x<GPU>' / a "
                     "Cloud TPU type)")
  if not plan_config.train and not plan_config.serve:
    raise ValueError("--plan.train=False needs --plan.serve=True (nothing to plan)")
  topo = get_topology(plan_config.topology)
  backend, note = resolve_backend(topo, plan_config.backend)
  where = ("libtpu's TPU compiler for " + str(topo.tpu_topology()) if backend == "tpu"
           else f"{topo.num_devices} simulated CPU devices" + (f" (FALLBACK: {note})" if note else ""))
  code = 0
  if plan_config.train:
    out(f"planning {config_path} on {topo.name}: compiling the train step on {where} "
        "(seconds to minutes per candidate)")
    result = plan(config, topo, recipe=config_path, mfu=float(plan_config.mfu), headroom=float(plan_config.headroom),
                  backend=plan_config.backend, temp_factor=float(plan_config.temp_factor) or None,
                  explore=bool(plan_config.explore), max_trials=int(plan_config.max_trials),
                  mean_tokens=int(plan_config.mean_tokens) or None, samples=int(plan_config.samples) or None,
                  log=out)
    out("")
    out(result.render())
    code = 0 if result.fits else 3
  if plan_config.serve:
    from llava_jax.scale.serve import plan_serving_process
    out("")
    out(f"planning serving of {config_path} on {topo.name}: compiling generate's prefill and decode on {where}")
    budget = topo.chip.memory_bytes * (1.0 - float(plan_config.headroom))
    sp = plan_serving_process(config, topo.num_devices, budget, backend=backend, tpu_topology=topo.tpu_topology(),
                              context=int(plan_config.serve_context), max_new=int(plan_config.serve_new),
                              max_rows=int(plan_config.serve_max_rows), log=out)
    out(sp.render())
    code = code or (0 if sp.max_rows_per_device else 3)
  return code
