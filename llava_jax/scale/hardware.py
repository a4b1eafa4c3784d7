"""Accelerators and topologies the memory / throughput plan targets (peaks and memory per chip; sources in
docs/scaling.md).

A topology is a number of identical chips (one JAX device each) on some hosts. Names:
  GPUs  '<n>x<chip>'   e.g. '8xA100-80G', '8xA100-40G', '8xH100', '16xH100' (8 GPUs per host)
  TPUs  Cloud TPU accelerator types: 'v4-32', 'v5p-64' (v4 / v5p count TensorCores: 2 per chip, one JAX device
        per chip), 'v5e-256' / 'v5litepod-256', 'v6e-64' (count chips)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator: dense bf16 peak (FLOP/s) and memory (bytes) per JAX device."""
  name: str
  platform: str          # 'gpu' | 'tpu'
  peak_flops: float      # dense bf16 matmul peak, FLOP/s
  memory_bytes: int      # HBM per chip
  source: str


CHIPS = {
    "A100-80G": Chip("A100-80G", "gpu", 312e12, 80 * GIB, "NVIDIA A100 datasheet: BF16 tensor core 312 TFLOPS "
                     "dense (624 with sparsity), 80 GB HBM2e"),
    "A100-40G": Chip("A100-40G", "gpu", 312e12, 40 * GIB, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense, 40 GB HBM2"),
    "H100": Chip("H100", "gpu", 989e12, 80 * GIB, "NVIDIA H100 datasheet (SXM): BF16 1,979 TFLOPS with sparsity "
                 "= 989 dense, 80 GB HBM3"),
    "v4": Chip("v4", "tpu", 275e12, 32 * GIB, "cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, 32 GiB HBM2 per chip"),
    "v5p": Chip("v5p", "tpu", 459e12, 95 * GIB, "cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 95 GB HBM2e per "
                "chip"),
    "v5e": Chip("v5e", "tpu", 197e12, 16 * GIB, "cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 16 GB HBM2 per chip"),
    "v6e": Chip("v6e", "tpu", 918e12, 32 * GIB, "cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 32 GB HBM per chip"),
}

# TPU accelerator type → (chip, cores per chip in the type's number, chips per host)
_TPU_FAMILIES = {"v4": ("v4", 2, 4), "v5p": ("v5p", 2, 4), "v5e": ("v5e", 1, 8), "v5litepod": ("v5e", 1, 8),
                 "v6e": ("v6e", 1, 8)}
# libtpu topology strings for deviceless ahead-of-time compiles (llava_jax.scale.memory, backend 'tpu')
_TPU_SHAPES = {
    ("v4", 4): "2x2x1", ("v4", 8): "2x2x2", ("v4", 16): "2x2x4", ("v4", 32): "2x4x4", ("v4", 64): "4x4x4",
    ("v5p", 4): "2x2x1", ("v5p", 8): "2x2x2", ("v5p", 32): "2x4x4", ("v5p", 64): "4x4x4", ("v5p", 128): "4x4x8",
    ("v5e", 1): "1x1", ("v5e", 4): "2x2", ("v5e", 8): "2x4", ("v5e", 16): "4x4", ("v5e", 32): "4x8",
    ("v5e", 64): "8x8", ("v5e", 128): "8x16", ("v5e", 256): "16x16",
    ("v6e", 1): "1x1", ("v6e", 4): "2x2", ("v6e", 8): "2x4", ("v6e", 16): "4x4", ("v6e", 32): "4x8",
    ("v6e", 64): "8x8", ("v6e", 128): "8x16", ("v6e", 256): "16x16",
}
GPUS_PER_HOST = 8

TOPOLOGIES = ("8xA100-80G", "8xA100-40G", "8xH100", "v4-32", "v5p-64", "v5e-256")


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  chip: Chip
  num_devices: int
  num_hosts: int

  @property
  def platform(self) -> str:
    return self.chip.platform

  @property
  def peak_flops(self) -> float:
    """All devices together, FLOP/s."""
    return self.chip.peak_flops * self.num_devices

  def tpu_topology(self) -> Optional[str]:
    """libtpu topology string ('v5p:2x4x4') for a deviceless compile, or None (GPU / unknown shape)."""
    if self.platform != "tpu":
      return None
    shape = _TPU_SHAPES.get((self.chip.name, self.num_devices))
    return None if shape is None else f"{self.chip.name}:{shape}"


def get_topology(name: str) -> Topology:
  """Parse a topology name (see module doc). Raises ValueError listing the accepted forms."""
  text = name.strip()
  m = re.fullmatch(r"(\d+)\s*x\s*([A-Za-z0-9-]+)", text)
  if m:
    n, chip = int(m.group(1)), m.group(2)
    key = {k.lower(): k for k in CHIPS if CHIPS[k].platform == "gpu"}.get(chip.lower())
    if key is None or n < 1:
      raise ValueError(f"topology {name!r}: unknown GPU {chip!r}; known: "
                       f"{sorted(k for k, c in CHIPS.items() if c.platform == 'gpu')}")
    return Topology(f"{n}x{key}", CHIPS[key], n, max(1, -(-n // GPUS_PER_HOST)))
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text.lower())
  if m:
    chip, per_chip, per_host = _TPU_FAMILIES[m.group(1)]
    count = int(m.group(2))
    if count < 1 or count % per_chip:
      raise ValueError(f"topology {name!r}: {m.group(1)} accelerator types count TensorCores ({per_chip} per chip)")
    n = count // per_chip
    return Topology(text.lower(), CHIPS[chip], n, max(1, -(-n // per_host)))
  raise ValueError(f"unknown topology {name!r}: use '<n>x<GPU>' with GPU in "
                   f"{sorted(k for k, c in CHIPS.items() if c.platform == 'gpu')} (e.g. '8xA100-80G') or a Cloud TPU "
                   f"type such as 'v4-32', 'v5p-64', 'v5e-256'; presets: {', '.join(TOPOLOGIES)}")
