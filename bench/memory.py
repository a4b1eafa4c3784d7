"""Peak host memory while importing a multi-GB sharded safetensors checkpoint.

`generate_checkpoint` writes a random llava-hf checkpoint (hub key layout, float32, shards of at most
`ckpt_shard_bytes`) one shard at a time, so the generator never holds more than one shard.

`measure_ours` runs `load_pretrained` in this (child) process and samples /proc/self/status every few ms. On a
CPU-only machine the loaded params themselves live in host memory, so what is compared with the largest shard
is the loader's *staging* memory: at each sample, RSS − (RSS before loading) − (bytes of params already placed),
where placed bytes are counted by wrapping the loader's placement function. Its maximum is what an accelerator
host would need on top of nothing (the params go to device memory there). The raw peak RSS is reported too.

`measure_hf` does the same for transformers' `from_pretrained` (raw RSS increase vs the checkpoint size).
"""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np

from bench import common


class _Sampler:
  """Background thread sampling RSS every `period` s; `extra()` gives bytes to subtract at that instant."""

  def __init__(self, extra=lambda: 0, period: float = 0.002):
    self.extra, self.period = extra, period
    self.max_rss = 0
    self.max_staging = 0
    self.max_anon = 0
    self._stop = threading.Event()
    self.baseline = common.proc_status()["VmRSS"]
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      s = common.proc_status()
      self.max_rss = max(self.max_rss, s["VmRSS"])
      self.max_anon = max(self.max_anon, s.get("RssAnon", 0))
      self.max_staging = max(self.max_staging, s["VmRSS"] - self.baseline - self.extra())
      time.sleep(self.period)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    return False


def generate_checkpoint(p: common.Preset, out_dir: str, seed: int = 0) -> dict:
  """Random float32 llava-hf checkpoint for the preset's big config, sharded; returns sizes."""
  from llava_jax.checkpoints.export import llava_hf_key_specs, write_safetensors
  from llava_jax.checkpoints.table import conv_to_torch, transpose
  from llava_jax.checkpoints.hf_configs import text_config_from_hf, vision_config_from_hf
  from llava_jax.config import LlavaConfig
  os.makedirs(out_dir, exist_ok=True)
  c = common.hf_config_dict(p, big=True)
  config = LlavaConfig(vision=vision_config_from_hf(c["vision"]), text=text_config_from_hf(c["text"]),
                       image_token_index=c["image_token_index"])
  specs = llava_hf_key_specs(config)  # the hub layout of released llava-hf checkpoints
  from llava_jax.models.llava import abstract_params
  from llava_jax.checkpoints.table import get_in
  shapes, _ = abstract_params(config.with_runtime(scan_layers=False))
  rng = np.random.default_rng(seed)
  shards, current, size = [], [], 0

  def flush():
    nonlocal current, size
    name = f"model-{len(shards) + 1:05d}.tmp"
    write_safetensors(os.path.join(out_dir, name), current)
    shards.append((name, [k for k, _ in current], size))
    current, size = [], 0

  for s in specs:
    path = s.path if s.layer is None else tuple(f"layers_{s.layer}" if x == "layers" else x for x in s.path)
    flax_shape = tuple(get_in(shapes, path).shape)
    if s.to_hf is transpose:
      shape = flax_shape[::-1]
    elif s.to_hf is conv_to_torch:
      shape = tuple(flax_shape[i] for i in (3, 2, 0, 1))
    else:
      shape = flax_shape
    arr = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
    if size and size + arr.nbytes > p.ckpt_shard_bytes:
      flush()
    current.append((s.hf_key, arr))
    size += arr.nbytes
  flush()
  n = len(shards)
  weight_map, total, largest = {}, 0, 0
  for i, (tmp, keys, nbytes) in enumerate(shards):
    final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, final))
    weight_map.update({k: final for k in keys})
    total += nbytes
    largest = max(largest, os.path.getsize(os.path.join(out_dir, final)))
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  cfg = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
         "text_config": dict(model_type="llama", **c["text"]),
         "vision_config": dict(model_type="clip_vision_model", **c["vision"]),
         "image_token_index": c["image_token_index"], "vision_feature_layer": -2,
         "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu", "torch_dtype": "float32"}
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f, indent=1)
  return dict(dir=out_dir, shards=n, total_bytes=int(total), largest_shard_bytes=int(largest),
              tensors=len(weight_map))


def measure_ours(ckpt_dir: str) -> dict:
  import jax
  from llava_jax.checkpoints import hf
  placed = {"bytes": 0, "largest_leaf": 0}
  original = hf._place

  def counting_place(leaf, shardings, path):
    out = original(leaf, shardings, path)
    placed["bytes"] += int(leaf.nbytes)
    placed["largest_leaf"] = max(placed["largest_leaf"], int(leaf.nbytes))
    return out

  hf._place = counting_place
  jax.devices()  # backend start-up is part of the baseline, not of the loading
  try:
    t0 = time.perf_counter()
    with _Sampler(extra=lambda: placed["bytes"]) as s:
      config, params = hf.load_pretrained(ckpt_dir)
      jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
  finally:
    hf._place = original
  status = common.proc_status()
  param_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(params))
  return dict(seconds=seconds, baseline_rss=s.baseline, peak_rss=max(s.max_rss, status["VmHWM"]),
              peak_rss_sampled=s.max_rss, staging_peak=s.max_staging, param_bytes=param_bytes,
              largest_leaf_bytes=placed["largest_leaf"], final_rss=status["VmRSS"])


def measure_hf(ckpt_dir: str, threads: int) -> dict:
  import torch
  import transformers
  torch.set_num_threads(threads)
  t0 = time.perf_counter()
  with _Sampler() as s:
    model = transformers.LlavaForConditionalGeneration.from_pretrained(ckpt_dir, dtype=torch.float32)
  seconds = time.perf_counter() - t0
  status = common.proc_status()
  param_bytes = sum(x.numel() * x.element_size() for x in model.parameters())
  return dict(seconds=seconds, baseline_rss=s.baseline, peak_rss=max(s.max_rss, status["VmHWM"]),
              peak_rss_sampled=s.max_rss, param_bytes=int(param_bytes), final_rss=status["VmRSS"],
              transformers=transformers.__version__)
