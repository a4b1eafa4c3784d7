"""params → a llava-hf directory (`LlavaForConditionalGeneration`): safetensors weights in the hub key layout
(`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.vision_model.*`,
`multi_modal_projector.linear_{1,2}.*`, which transformers 4.x and 5.x both load), config.json, and the
tokenizer files when a tokenizer is given.

The paper's 'linear' projector is exported exactly in llava-hf's fixed two-layer form: linear_1 = our Dense,
`projector_hidden_act='linear'` (transformers' identity activation), linear_2 = the identity matrix with zero
bias; loading such a directory collapses it back to 'linear' (checkpoints/hf.py).

Tensors are produced one param leaf at a time and written in shards of at most `max_shard_bytes`
(`model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from llava_jax.checkpoints.clip_keys import clip_key_specs
from llava_jax.checkpoints.llama_keys import llama_key_specs
from llava_jax.checkpoints.projector_keys import projector_key_specs
from llava_jax.checkpoints.reader import SAFE_INDEX, SAFE_SINGLE, SAFETENSORS_DTYPES
from llava_jax.checkpoints.table import KeySpec, export_tensors, get_in
from llava_jax.config import LlavaConfig, dtype_name
from llava_jax.errors import MissingFileError
from llava_jax.models.lora import merge_lora
from llava_jax.models.quant import dequantize_params

HUB_TEXT_PREFIX = "language_model.model."
HUB_HEAD_KEY = "language_model.lm_head.weight"
HUB_VISION_PREFIX = "vision_tower.vision_model."
HUB_PROJECTOR_PREFIX = "multi_modal_projector."
# llava-hf's projector is always linear_1 → act → linear_2; ours maps onto it as:
HF_PROJECTOR_ACT = {"mlp2x_gelu": "gelu",  # exact (erf) GELU, as LLaVA v1.5
                    "linear": "linear"}  # identity act, linear_2 = I with zero bias (identity_linear_2)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def llava_hf_key_specs(config: LlavaConfig) -> List[KeySpec]:
  """Every tensor of the llava-hf hub layout that comes from a param, as key-table rows (for a 'linear'
  projector that is all but linear_2, which `identity_linear_2` adds)."""
  return (clip_key_specs(config.vision, prefix=HUB_VISION_PREFIX)
          + projector_key_specs(config, style="hf", prefix=HUB_PROJECTOR_PREFIX)
          + llama_key_specs(config.text, prefix=HUB_TEXT_PREFIX, lm_head_key=HUB_HEAD_KEY))


def llava_hf_config_dict(config: LlavaConfig, dtype: str) -> Dict[str, Any]:
  """config.json that transformers' `LlavaConfig` reads back to the same architecture."""
  v, t = config.vision, config.text
  text = {
      "model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
      "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
      "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
      "head_dim": t.resolved_head_dim, "max_position_embeddings": t.max_position_embeddings,
      "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
      "rope_scaling": None if t.rope_scaling is None else {
          "rope_type": t.rope_scaling.rope_type, "factor": t.rope_scaling.factor,
          "low_freq_factor": t.rope_scaling.low_freq_factor, "high_freq_factor": t.rope_scaling.high_freq_factor,
          "original_max_position_embeddings": t.rope_scaling.original_max_position_embeddings},
      "tie_word_embeddings": t.tie_word_embeddings, "hidden_act": t.hidden_act, "attention_bias": False,
      "mlp_bias": False, "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
      "pad_token_id": t.pad_token_id,
  }
  vision = {
      "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
      "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
      "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": v.num_channels,
      "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
  }
  layer = config.vision_feature_layer
  return {
      "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
      "text_config": text, "vision_config": vision,
      "image_token_index": config.image_token_index, "image_seq_length": config.num_image_tokens,
      "projector_hidden_act": HF_PROJECTOR_ACT[config.projector_type],
      "multimodal_projector_bias": config.projector_bias,
      "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
      "vision_feature_select_strategy": config.vision_feature_select_strategy,
      "tie_word_embeddings": t.tie_word_embeddings, "torch_dtype": dtype,
  }


def check_exportable(config: LlavaConfig) -> None:
  """llava-hf can express only part of what we run; say what does not fit."""
  if config.projector_type not in HF_PROJECTOR_ACT:
    raise ValueError(f"projector_type {config.projector_type!r} cannot be exported to llava-hf: "
                     "LlavaForConditionalGeneration's projector is exactly linear_1 → act → linear_2, which holds "
                     "'mlp2x_gelu' and 'linear' (identity act and linear_2) only")
  if not 0 <= config.image_token_index < config.text.vocab_size:
    raise ValueError(f"image_token_index {config.image_token_index} is outside the vocabulary "
                     f"[0, {config.text.vocab_size}); llava-hf looks the placeholder up in the embedding table. "
                     "Add an <image> token (grow embed_tokens / lm_head) and set config.image_token_index first")


def identity_linear_2(config: LlavaConfig, dtype) -> Iterator[Tuple[str, np.ndarray]]:
  """The llava-hf tensors that make linear_2 a no-op for a 'linear' projector: weight = I [D, D] and, with
  projector bias, bias = 0 [D] (D = text hidden size), in `dtype`. Nothing for other projectors."""
  if config.projector_type != "linear":
    return
  d = config.text.hidden_size
  yield f"{HUB_PROJECTOR_PREFIX}linear_2.weight", np.eye(d, dtype=dtype)
  if config.projector_bias:
    yield f"{HUB_PROJECTOR_PREFIX}linear_2.bias", np.zeros((d,), dtype)


def write_safetensors(path: str, tensors: List[Tuple[str, np.ndarray]], metadata: Optional[dict] = None) -> int:
  """Write (name, array) pairs as a safetensors file (any numpy / ml_dtypes dtype safetensors knows); returns
  the bytes of tensor data."""
  arrays = dict(tensors)
  return write_safetensors_streamed(path, [(n, a.shape, a.dtype) for n, a in tensors], arrays.__getitem__,
                                    metadata)


def write_safetensors_streamed(path: str, specs: Sequence[Tuple[str, Sequence[int], Any]],
                               produce: Callable[[str], np.ndarray], metadata: Optional[dict] = None) -> int:
  """Write a safetensors file whose tensors are made one at a time: `specs` (name, shape, dtype) make the header,
  then `produce(name)` gives each array as it is written (host memory holds one tensor at a time, so a
  multi-GB shard of generated weights needs no more). Returns the bytes of tensor data."""
  header: Dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, shape, dtype in specs:
    code = _DTYPE_CODES.get(np.dtype(dtype))
    if code is None:
      raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors code")
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for name, shape, dtype in specs:
      arr = produce(name)
      if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ValueError(f"tensor {name!r}: produced {arr.dtype}{list(arr.shape)}, header says {dtype}{list(shape)}")
      f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)  # little-endian hosts (x86, ARM, TPU VMs)
  return offset


def export_hf(config: LlavaConfig, params: dict, out_dir: str, tokenizer: Any = None, *,
              dtype: Any = None, max_shard_bytes: int = 5 * 1024 ** 3) -> str:
  """Write a llava-hf directory that `transformers.LlavaForConditionalGeneration.from_pretrained` loads.

  params: our param tree for `config` (scanned or not, as config.runtime.scan_layers says), any sharding. With
    `config.runtime.quantize` the quantized kernels are dequantized (`dequantize_params`) and with
    `config.runtime.lora` the adapters are then merged into their kernels: a QLoRA model exports as the plain
    float model W = deq(W_q) + (alpha / r)·A·B it computes (checkpoints/peft.py writes the adapter alone).
  tokenizer: a transformers tokenizer (saved with `save_pretrained`) or a directory to copy tokenizer files from.
  dtype: dtype of the written tensors (default: each param's own dtype).
  max_shard_bytes: shard size limit; above it the weights are split with a `model.safetensors.index.json`.
  Returns out_dir. Raises ValueError for configs llava-hf cannot express (see `check_exportable`).
  """
  check_exportable(config)
  if config.runtime.quantize is not None:  # a quantized base (QLoRA): exported dequantized, W = deq(W_q)
    params = dequantize_params(params, config.runtime.quantize, config.runtime.jnp_param_dtype)
    config = config.with_runtime(quantize=None)
  if config.runtime.lora is not None:  # LoRA: export the merged weights W + (alpha / r)·A·B as a plain model
    params = merge_lora(params, config.runtime.lora)
    config = config.with_runtime(lora=None)
  os.makedirs(out_dir, exist_ok=True)
  for name in os.listdir(out_dir):  # stale weights from an earlier export would shadow or mix with ours
    if name == SAFE_INDEX or (name.startswith("model") and name.endswith(".safetensors")):
      os.remove(os.path.join(out_dir, name))
  target = None if dtype is None else np.dtype(_np_dtype(dtype))
  shards: List[List[Tuple[str, np.ndarray]]] = [[]]
  tmp_names: List[str] = []
  size, total, seen_dtype = 0, 0, None

  def flush():
    name = f"model-{len(tmp_names) + 1:05d}.tmp"
    write_safetensors(os.path.join(out_dir, name), shards[-1])
    tmp_names.append(name)
    shards[-1] = []

  weight_map: Dict[str, int] = {}
  projector_dtype = get_in(params, ("multi_modal_projector", "linear_1", "kernel")).dtype
  tensors = itertools.chain(export_tensors(llava_hf_key_specs(config), params, config.runtime.scan_layers),
                            identity_linear_2(config, target or np.dtype(projector_dtype)))
  for key, arr in tensors:
    arr = np.asarray(arr) if target is None else np.asarray(arr).astype(target)
    seen_dtype = seen_dtype or arr.dtype
    if size and size + arr.nbytes > max_shard_bytes:
      flush()
      size = 0
    shards[-1].append((key, arr))
    weight_map[key] = len(tmp_names)
    size += arr.nbytes
    total += arr.nbytes
  flush()
  n = len(tmp_names)
  if n == 1:
    os.replace(os.path.join(out_dir, tmp_names[0]), os.path.join(out_dir, SAFE_SINGLE))
  else:
    final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, name in zip(tmp_names, final):
      os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, name))
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[i] for k, i in sorted(weight_map.items())}}
    with open(os.path.join(out_dir, SAFE_INDEX), "w") as f:
      json.dump(index, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(llava_hf_config_dict(config, dtype_name(seen_dtype or np.float32)), f, indent=2)
  if tokenizer is not None:
    _save_tokenizer(tokenizer, out_dir)
  return out_dir


def _save_tokenizer(tokenizer: Any, out_dir: str) -> None:
  if isinstance(tokenizer, (str, os.PathLike)):
    found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer, n))]
    if not found:
      raise MissingFileError(f"tokenizer directory {tokenizer!r} holds none of {TOKENIZER_FILES}")
    for n in found:
      shutil.copyfile(os.path.join(tokenizer, n), os.path.join(out_dir, n))
  elif hasattr(tokenizer, "save_pretrained"):
    tokenizer.save_pretrained(out_dir)
    sp_model = getattr(tokenizer, "vocab_file", None)  # transformers 5 saves no tokenizer.model; our ids need it
    if isinstance(sp_model, str) and sp_model.endswith(".model") and os.path.isfile(sp_model):
      shutil.copyfile(sp_model, os.path.join(out_dir, "tokenizer.model"))
  else:
    raise TypeError(f"tokenizer must be a transformers tokenizer or a directory, got {type(tokenizer).__name__}")


def _np_dtype(dtype):
  import ml_dtypes
  if isinstance(dtype, str) and hasattr(ml_dtypes, dtype):
    return getattr(ml_dtypes, dtype)
  return np.dtype(dtype_name(dtype))
