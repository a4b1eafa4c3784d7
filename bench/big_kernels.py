"""Matmul ceilings at llava-v1.5-7b's decoder shapes: what XLA:CPU's and PyTorch's kernels reach on this CPU.

The 7b rows time whole models; these time the matmul that dominates them, in the dtypes each side's model runs,
so a model row's ratio can be read against what the kernels underneath allow:

  gemv  x [1, d] · W [d, f], d = 4096, f = 11008 (gate / up_proj): one decode token, bound by reading W
  gemm  x [T, d] · W [d, f], T = the prefill's tokens (BOS + text + 576 image tokens): bound by arithmetic

llava_jax (`kernels_jax`, its own process): the decoder's own modules, jitted — `nn.Dense(dtype=param_dtype=
bfloat16)` as `llama._dense` builds it for the bf16 rows, `QuantDense` (int8 / int4: dequantize to bfloat16,
then the dot) for the quantized rows, and a float32 Dense for comparison. PyTorch (`kernels_torch`):
`F.linear` in bfloat16 (transformers bf16) and torch's dynamic int8 Linear (float32 activations, the
`torch_int8` row). Each kernel is warmed up, then timed `REPS` times; the median is reported.
"""
from __future__ import annotations

import time
from typing import Callable, Dict

import numpy as np

from bench import big_ckpt

REPS = 9
D_IN_OUT = lambda s: (s.t_hidden, s.t_mlp)  # noqa: E731 — the MLP's gate / up_proj: the largest decoder matmuls


def prefill_tokens(s: big_ckpt.BigShapes, prompt_text: int) -> int:
  return 1 + prompt_text + s.num_patches


def _median_s(fn: Callable[[], object], reps: int = REPS) -> float:
  fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _entry(seconds: float, weight_bytes: int, m: int, d: int, f: int) -> dict:
  return dict(median_s=seconds, weight_bytes=weight_bytes, m=m, d=d, f=f, flops=2 * m * d * f,
              weight_gb_s=weight_bytes / seconds / 1e9, gflop_s=2 * m * d * f / seconds / 1e9)


def measure_jax(a: dict) -> Dict[str, dict]:
  """{kernel name: timing} for llava_jax's decoder Dense layers (bf16, int8, int4, float32) at the 7B shapes."""
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  from llava_jax.models import quant
  s = big_ckpt.SHAPES[a["shapes"]]
  d, f = D_IN_OUT(s)
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((d, f), dtype=np.float32) * 0.02)
  layers = {"bf16": (nn.Dense(f, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
                     {"kernel": jnp.asarray(w, jnp.bfloat16)}),
            "f32": (nn.Dense(f, use_bias=False, dtype=jnp.float32), {"kernel": jnp.asarray(w)})}
  for mode in ("int8", "int4"):
    layers[mode] = (quant.QuantDense(f, mode=mode, axes=(None, None), dtype=jnp.bfloat16),
                    {k: jnp.asarray(v) for k, v in quant.quantize_kernel(w, mode).items()})
  out = {}
  for m, kind in ((1, "gemv"), (prefill_tokens(s, int(a["prompt_text"])), "gemm")):
    x32 = jnp.asarray(rng.standard_normal((m, d), dtype=np.float32))
    for name, (layer, params) in layers.items():
      if kind == "gemm" and name != "bf16":
        continue
      x = x32.astype(jnp.float32 if name == "f32" else jnp.bfloat16)
      fn = jax.jit(lambda p, x, layer=layer: layer.apply({"params": p}, x))
      nbytes = sum(int(v.nbytes) for v in params.values())
      out[f"{kind}_{name}"] = _entry(_median_s(lambda: fn(params, x).block_until_ready()), nbytes, m, d, f)
  return out


def measure_torch(a: dict) -> Dict[str, dict]:
  """{kernel name: timing} for PyTorch's bf16 F.linear and dynamic int8 Linear at the 7B shapes."""
  import torch
  from bench import big, torch_side
  torch_side.set_threads(int(a["threads"]))
  s = big_ckpt.SHAPES[a["shapes"]]
  d, f = D_IN_OUT(s)
  gen = torch.Generator().manual_seed(0)
  w = torch.randn(f, d, generator=gen) * 0.02  # nn.Linear's [out, in]
  w_bf16 = w.to(torch.bfloat16)
  linear = torch.nn.Linear(d, f, bias=False)
  with torch.no_grad():
    linear.weight.copy_(w)
  int8 = big.dynamic_int8_linear(linear)  # the torch_int8 row's own Linear
  out = {}
  with torch.inference_mode():
    for m, kind in ((1, "gemv"), (prefill_tokens(s, int(a["prompt_text"])), "gemm")):
      x = torch.randn(m, d, generator=gen)
      xb = x.to(torch.bfloat16)
      out[f"{kind}_bf16"] = _entry(_median_s(lambda: torch.nn.functional.linear(xb, w_bf16)), 2 * d * f, m, d, f)
      if kind == "gemv":
        out[f"{kind}_int8"] = _entry(_median_s(lambda: int8(x)), d * f, m, d, f)
  return out
