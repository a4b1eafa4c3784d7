"""A randomly initialised checkpoint with llava-v1.5-7b's exact shapes, in the llava-hf layout transformers 5 saves.

`LLAVA_7B`: CLIP ViT-L/14 at 336 px (24 layers, hidden 1024, MLP 4096, 16 heads), mlp2x_gelu projector
(1024 → 4096 → 4096), LLaMA-7B (32 layers, hidden 4096, MLP 11008, 32 heads, vocabulary 32064, `<image>` =
32000): 7.06 G parameters, 14.1 GB in bfloat16. `TINY` has the same structure at toy size (the smoke test).

`ensure_checkpoint(shapes, dir)` writes, or reuses when its index validates:
  model-0000k-of-0000n.safetensors  bf16 shards of at most `shard_bytes` (the hub's 5 GB → 3 shards for 7B)
  model.safetensors.index.json      {"metadata": {"total_size"}, "weight_map"} as transformers writes it
  config.json, generation_config.json, preprocessor_config.json (CLIPImageProcessor, 336 px)
  tokenizer.model + tokenizer_config.json  a tiny SentencePiece model (ids < 300, all below `<image>`)
  bench_manifest.json               the shapes it was generated for (written last: a complete directory)

Keys are those `LlavaForConditionalGeneration.save_pretrained` writes in transformers 5 (its legacy layout:
`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.embeddings.*`, `multi_modal_projector.*`),
not the in-memory names (`model.language_model.*`); tests/test_bench.py checks the key set against a real save.

Generation is streamed: each shard's header is known from the shapes, then tensors are made one at a time
(random bfloat16 bit patterns of small magnitude, RMS/LayerNorm weights near 1) and written straight to the
file, so the generator holds one tensor (≤ 263 MB) at a time. (safetensors' numpy API has no bfloat16, hence
the writer here; the format is the 8-byte header length, the JSON header, the raw little-endian data.)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import List, Tuple

import ml_dtypes
import numpy as np

from bench import common
from llava_jax.checkpoints.export import write_safetensors_streamed

INDEX = "model.safetensors.index.json"
MANIFEST = "bench_manifest.json"
SAVED_VISION_PREFIX = "vision_tower."  # transformers 5 saves CLIP without the hub's `vision_model.` level
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclasses.dataclass(frozen=True)
class BigShapes(common.ModelShapes):
  """A checkpoint's shapes: the model's dimensions plus what only the checkpoint states."""
  projection_dim: int
  max_positions: int
  shard_bytes: int


LLAVA_7B = BigShapes("7b", v_hidden=1024, v_mlp=4096, v_layers=24, v_heads=16, image_size=336, patch=14,
                     projection_dim=768, t_hidden=4096, t_mlp=11008, t_layers=32, t_heads=32, t_kv_heads=32,
                     vocab=32064, image_token=32000, max_positions=4096, shard_bytes=5_000_000_000)
TINY = BigShapes("tiny", v_hidden=32, v_mlp=64, v_layers=2, v_heads=4, image_size=28, patch=14, projection_dim=32,
                 t_hidden=64, t_mlp=128, t_layers=2, t_heads=4, t_kv_heads=4, vocab=576, image_token=512,
                 max_positions=1024, shard_bytes=120_000)
SHAPES = {"7b": LLAVA_7B, "tiny": TINY}


def hf_config(s: BigShapes) -> dict:
  """config.json of llava-hf/llava-1.5-7b-hf's architecture for these shapes (bfloat16)."""
  text = dict(model_type="llama", vocab_size=s.vocab, hidden_size=s.t_hidden, intermediate_size=s.t_mlp,
              num_hidden_layers=s.t_layers, num_attention_heads=s.t_heads, num_key_value_heads=s.t_kv_heads,
              max_position_embeddings=s.max_positions, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None, torch_dtype="bfloat16")
  vision = dict(model_type="clip_vision_model", hidden_size=s.v_hidden, intermediate_size=s.v_mlp,
                num_hidden_layers=s.v_layers, num_attention_heads=s.v_heads, image_size=s.image_size,
                patch_size=s.patch, projection_dim=s.projection_dim, hidden_act="quick_gelu", layer_norm_eps=1e-5)
  return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": text,
          "vision_config": vision, "image_token_index": s.image_token, "pad_token_id": s.image_token + 1,
          "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
          "image_seq_length": s.num_patches, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def tensor_plan(s: BigShapes) -> List[Tuple[str, Tuple[int, ...]]]:
  """(key, shape) of every tensor, in the order transformers writes them (vision, projector, text)."""
  from llava_jax.checkpoints.export import HUB_VISION_PREFIX, llava_hf_key_specs
  from llava_jax.checkpoints.hf_configs import text_config_from_hf, vision_config_from_hf
  from llava_jax.checkpoints.table import conv_to_torch, get_in, transpose, unscanned_path
  from llava_jax.config import LlavaConfig
  from llava_jax.models.llava import abstract_params
  c = hf_config(s)
  config = LlavaConfig(vision=vision_config_from_hf(c["vision_config"]), text=text_config_from_hf(c["text_config"]),
                       image_token_index=s.image_token)
  config = config.with_runtime(scan_layers=False)
  shapes, _ = abstract_params(config)
  plan = []
  for spec in llava_hf_key_specs(config):
    path = spec.path if spec.layer is None else unscanned_path(spec.path, spec.layer)
    shape = tuple(get_in(shapes, path).shape)
    if spec.to_hf is transpose:
      shape = shape[::-1]
    elif spec.to_hf is conv_to_torch:
      shape = tuple(shape[i] for i in (3, 2, 0, 1))
    key = spec.hf_key
    if key.startswith(HUB_VISION_PREFIX):
      key = SAVED_VISION_PREFIX + key[len(HUB_VISION_PREFIX):]
    plan.append((key, shape))
  return plan


def shard_plan(s: BigShapes) -> List[List[Tuple[str, Tuple[int, ...]]]]:
  """Tensors split in order into shards of at most `shard_bytes` (bf16), as save_pretrained shards."""
  shards, current, size = [], [], 0
  for key, shape in tensor_plan(s):
    nbytes = 2 * int(np.prod(shape))
    if current and size + nbytes > s.shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((key, shape))
    size += nbytes
  shards.append(current)
  return shards


def _random_bf16(rng: np.random.Generator, key: str, shape) -> np.ndarray:
  """Random bfloat16 bit patterns [shape] as uint16: norm weights in [1, 1.12), everything else ±[2⁻⁷, 2⁻⁶)."""
  n = int(np.prod(shape))
  bits = np.frombuffer(rng.bytes(2 * n), np.uint16).reshape(shape).copy()
  if "norm" in key and key.endswith(".weight"):
    return (bits & np.uint16(0x000F)) | np.uint16(0x3F80)
  return (bits & np.uint16(0x807F)) | np.uint16(0x3C00)


def _write_shard(path: str, tensors, rng) -> int:
  """One bf16 shard of random weights, each tensor generated as it is written (`export.write_safetensors_streamed`)."""
  shapes = dict(tensors)
  return write_safetensors_streamed(path, [(k, shape, ml_dtypes.bfloat16) for k, shape in tensors],
                                    lambda k: _random_bf16(rng, k, shapes[k]).view(ml_dtypes.bfloat16))


def shard_names(n: int) -> List[str]:
  return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def validate(s: BigShapes, out_dir: str) -> str:
  """'' if `out_dir` holds a complete checkpoint for `s` (manifest, index and every shard header and size),
  else why not."""
  from llava_jax.checkpoints.reader import read_safetensors_header
  try:
    with open(os.path.join(out_dir, MANIFEST)) as f:
      manifest = json.load(f)
    with open(os.path.join(out_dir, INDEX)) as f:
      index = json.load(f)
  except (OSError, ValueError) as e:
    return f"no complete checkpoint ({type(e).__name__}: {e})"
  if manifest.get("shapes") != dataclasses.asdict(s):
    return f"generated for other shapes: {manifest.get('shapes')}"
  shards = shard_plan(s)
  names = shard_names(len(shards))
  want_map = {k: name for name, tensors in zip(names, shards) for k, _ in tensors}
  if index.get("weight_map") != want_map:
    return "index weight_map differs from the tensor plan"
  for name, tensors in zip(names, shards):
    path = os.path.join(out_dir, name)
    try:
      header, start = read_safetensors_header(path)
    except (OSError, ValueError) as e:
      return f"{name}: {e}"
    if {k: tuple(v["shape"]) for k, v in header.items()} != dict(tensors):
      return f"{name}: header shapes differ from the plan"
    data = max(v["data_offsets"][1] for v in header.values())
    if os.path.getsize(path) != start + data:
      return f"{name}: size {os.path.getsize(path)} != {start + data} (truncated?)"
  return ""


def ensure_checkpoint(s: BigShapes, out_dir: str, seed: int = 0) -> dict:
  """Reuse `out_dir` when it validates, else (re)generate it; returns what it holds and how it got there."""
  reason = validate(s, out_dir)
  info = dict(dir=out_dir, shapes=s.name)
  if not reason:
    return dict(info, reused=True, **_sizes(out_dir))
  need = sum(2 * int(np.prod(shape)) for _, shape in tensor_plan(s))
  free = shutil.disk_usage(os.path.dirname(os.path.abspath(out_dir))).free
  if os.path.isdir(out_dir):
    shutil.rmtree(out_dir)
  if free < need * 1.05:
    raise RuntimeError(f"{out_dir}: needs {need / 2 ** 30:.1f} GiB on disk, {free / 2 ** 30:.1f} GiB free")
  os.makedirs(out_dir)
  rng = np.random.default_rng(seed)
  shards = shard_plan(s)
  names = shard_names(len(shards))
  total = 0
  for name, tensors in zip(names, shards):
    total += _write_shard(os.path.join(out_dir, name), tensors, rng)
  weight_map = {k: name for name, tensors in zip(names, shards) for k, _ in tensors}
  common.write_json(os.path.join(out_dir, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
  common.write_json(os.path.join(out_dir, "config.json"), hf_config(s))
  common.write_json(os.path.join(out_dir, "generation_config.json"),
                    {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": s.image_token + 1})
  common.write_json(os.path.join(out_dir, "preprocessor_config.json"), {
      "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": s.image_size},
      "resample": 3, "do_center_crop": True, "crop_size": {"height": s.image_size, "width": s.image_size},
      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
      "image_std": CLIP_STD, "do_convert_rgb": True})
  from bench import data_bench
  data_bench.make_tokenizer(None, out_dir)
  common.write_json(os.path.join(out_dir, MANIFEST), {"shapes": dataclasses.asdict(s), "seed": seed})
  reason = validate(s, out_dir)
  if reason:
    raise RuntimeError(f"generated checkpoint does not validate: {reason}")
  return dict(info, reused=False, **_sizes(out_dir))


def _sizes(out_dir: str) -> dict:
  with open(os.path.join(out_dir, INDEX)) as f:
    index = json.load(f)
  files = sorted(set(index["weight_map"].values()))
  return dict(shards=len(files), total_bytes=int(index["metadata"]["total_size"]), tensors=len(index["weight_map"]),
              largest_shard_bytes=max(os.path.getsize(os.path.join(out_dir, n)) for n in files))
