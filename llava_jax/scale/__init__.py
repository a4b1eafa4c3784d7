"""Scaling: memory / throughput planning for real topologies without the hardware.

`plan(config, '8xA100-80G')` → Plan (`.render()`, `.fits`, `.chosen`); topologies in `hardware`; analytic
FLOPs in `flops`; the ahead-of-time compile and memory read-out of the train step in `memory`, of generate's
prefill / decode (serving) in `serve`; libtpu's compile-only TPU devices and tiled layouts in `tpu`; the
docs' recipe tables in `table`. See docs/scaling.md.
"""
from llava_jax.scale.hardware import CHIPS, TOPOLOGIES, Chip, Topology, get_topology
from llava_jax.scale.plan import Plan, Trial, plan
from llava_jax.scale.plan_report import render

__all__ = ["CHIPS", "TOPOLOGIES", "Chip", "Topology", "get_topology", "Plan", "Trial", "plan", "render"]
