"""LoRA adapters ⇄ PEFT's on-disk format (`adapter_config.json` + `adapter_model.safetensors`).

Export writes what `peft.PeftModel.save_pretrained` writes for transformers' `LlavaForConditionalGeneration`
(transformers 5 module names), so `peft.PeftModel.from_pretrained(LlavaForConditionalGeneration..., dir)` loads
it and computes our logits:
  base_model.model.model.language_model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight  [r, in]  = A[i]ᵀ
  base_model.model.model.language_model.layers.{i}.{self_attn|mlp}.{name}.lora_B.weight  [out, r] = B[i]ᵀ
with `target_modules` a regex over those module names restricted to the language model (a plain list such as
['q_proj', ...] would also put adapters on CLIP's q/k/v projections, which we never adapt). With
`LoraConfig.modules_to_save` the fully trained modules are written as PEFT writes them:
  base_model.model.lm_head.weight                              [V, D] = lm_head kernelᵀ
  base_model.model.model.language_model.embed_tokens.weight    [V, D]

Import reads such a directory onto our params: it accepts the transformers 4 layout
(`base_model.model.language_model.model.layers.…`), PEFT's adapter-name infix (`lora_A.default.weight`) and
adapters of a bare `LlamaForCausalLM` (`base_model.model.model.layers.…`). Layers an adapter does not cover get
A = B = 0 (no change), so `layers_to_transform` adapters load too. Anything PEFT can express but our LoRA cannot
(DoRA, rsLoRA, per-module rank / alpha patterns, biases, vision-tower adapters, modules_to_save other than the
lm_head and embed_tokens) is refused.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional, Tuple

import numpy as np

from llava_jax.checkpoints.table import get_in, set_in
from llava_jax.config import LORA_MODULES_TO_SAVE, LlavaConfig, LoraConfig
from llava_jax.errors import ConfigError, MissingFileError
from llava_jax.models.lora import LORA_A, LORA_B, adapter_paths, strip_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.language_model.layers."
_KEY = re.compile(r"base_model\.model\.(?P<pre>.*?)layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<name>\w+)"
                  r"\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight")
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")  # transformers 5, 4, bare Llama
# modules_to_save tensors: transformers 5 / 4 / bare Llama names (PEFT may keep a `modules_to_save.<adapter>.` infix)
_SAVED_KEY = re.compile(r"base_model\.model\.(?P<pre>model\.language_model\.|language_model\.model\.|language_model\.|"
                        r"model\.)?(?P<module>lm_head|embed_tokens)\.(?:modules_to_save\.[\w-]+\.)?weight")
PEFT_SAVED_KEYS = {"lm_head": "base_model.model.lm_head.weight",
                   "embed_tokens": "base_model.model.model.language_model.embed_tokens.weight"}


def _saved_module_path(module: str) -> Tuple[str, ...]:
  """Our param path of a modules_to_save module ('lm_head' → ('language_model', 'lm_head', 'kernel'))."""
  return ("language_model",) + tuple(LORA_MODULES_TO_SAVE[module].split("/"))


def _torch_layout(module: str, value: np.ndarray) -> np.ndarray:
  """A modules_to_save array between our layout and torch's (its own inverse): our lm_head kernel is [D, V],
  torch's weight [V, D]; embeddings are [V, D] in both."""
  return value.T if module == "lm_head" else value


def _adapter_modules(params) -> Dict[Tuple[str, str], bool]:
  """{(block, name): scanned} for every adapted decoder Dense, e.g. ('self_attn', 'q_proj')."""
  out = {}
  for path in adapter_paths(params):
    if path[0] != "language_model" or not path[1].startswith("layers") or len(path) != 4:
      raise ConfigError(f"adapter at {'/'.join(path)}: only decoder-layer adapters (language_model/layers/...) "
                       "have a PEFT name")
    out[(path[2], path[3])] = path[1] == "layers"
  return out


def peft_adapter_tensors(config: LlavaConfig, params) -> Dict[str, np.ndarray]:
  """Our adapters → {PEFT key: array} (torch Linear layout, [r, in] / [out, r])."""
  modules = _adapter_modules(params)
  if not modules:
    raise ConfigError("params hold no LoRA adapter (lora_a / lora_b leaves): was runtime.lora set?")
  out = {}
  for (block, name), scanned in sorted(modules.items()):
    for i in range(config.text.num_hidden_layers):
      base = ("language_model", "layers" if scanned else f"layers_{i}", block, name)
      for leaf, ab in ((LORA_A, "A"), (LORA_B, "B")):
        value = np.asarray(get_in(params, base + (leaf,)))
        value = value[i] if scanned else value
        out[f"{PEFT_PREFIX}{i}.{block}.{name}.lora_{ab}.weight"] = np.ascontiguousarray(value.T)
  for module in config.runtime.lora.modules_to_save if config.runtime.lora is not None else ():
    value = np.asarray(get_in(params, _saved_module_path(module)))
    out[PEFT_SAVED_KEYS[module]] = np.ascontiguousarray(_torch_layout(module, value))
  return out


def peft_adapter_config(lora: LoraConfig, names, base_model_name_or_path: Optional[str] = None) -> dict:
  """adapter_config.json for our LoRA: rank, alpha, dropout, target_modules as a regex over LLM module names."""
  names = sorted(set(names))
  return {
      "peft_type": "LORA", "task_type": None, "auto_mapping": {
          "base_model_class": "LlavaForConditionalGeneration",
          "parent_library": "transformers.models.llava.modeling_llava"},
      "base_model_name_or_path": base_model_name_or_path, "r": int(lora.rank), "lora_alpha": float(lora.alpha),
      "lora_dropout": float(lora.dropout),
      "target_modules": rf".*language_model.*\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(names)})",
      "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
      "use_rslora": False, "use_dora": False, "modules_to_save": list(lora.modules_to_save) or None,
      "layers_to_transform": None,
      "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
  }


def export_peft_adapter(config: LlavaConfig, params, out_dir: str, *, dtype=None,
                        base_model_name_or_path: Optional[str] = None) -> str:
  """Write our LoRA adapters as a PEFT adapter directory (see module doc). Returns out_dir.

  config.runtime.lora gives rank / alpha / dropout; dtype: of the written tensors (default: the params').
  """
  from safetensors.numpy import save_file
  lora = config.runtime.lora
  if lora is None:
    raise ConfigError("config.runtime.lora is None: there is no adapter to export")
  tensors = peft_adapter_tensors(config, params)
  if dtype is not None:
    tensors = {k: v.astype(np.dtype(dtype)) for k, v in tensors.items()}
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  names = {name for (_, name) in _adapter_modules(params)}
  with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
    json.dump(peft_adapter_config(lora, names, base_model_name_or_path), f, indent=2)
  return out_dir


def lora_config_from_peft(d: dict, names) -> LoraConfig:
  """adapter_config.json dict (+ the adapted module names found in the weights) → LoraConfig; refuses what our
  LoRA cannot compute."""
  if d.get("peft_type", "LORA") != "LORA":
    raise ConfigError(f"peft_type {d.get('peft_type')!r}: only LORA adapters can be imported")
  unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias") if d.get(k)]
  unsupported += [k for k in ("rank_pattern", "alpha_pattern") if d.get(k)]
  if d.get("bias", "none") != "none":
    unsupported.append(f"bias={d['bias']!r}")
  saved = tuple(d.get("modules_to_save") or ())
  if any(m not in LORA_MODULES_TO_SAVE for m in saved):
    unsupported.append(f"modules_to_save={list(saved)!r} (only {sorted(LORA_MODULES_TO_SAVE)})")
  if unsupported:
    raise ConfigError(f"PEFT adapter uses {unsupported}, which llava_jax's LoRA does not implement")
  target = rf".*/({'|'.join(sorted(set(names)))})"
  return LoraConfig(rank=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout", 0.0)),
                    target=target, modules_to_save=saved)


def read_peft_adapter(adapter_dir: str) -> Tuple[dict, Dict[Tuple[int, str, str, str], np.ndarray],
                                                 Dict[str, np.ndarray]]:
  """(adapter_config dict, {(layer, block, name, 'A'|'B'): torch-layout array}, {'lm_head' | 'embed_tokens':
  torch-layout [V, D] array of a modules_to_save module}) of a PEFT directory."""
  from safetensors.numpy import load_file
  cfg_path, w_path = os.path.join(adapter_dir, ADAPTER_CONFIG), os.path.join(adapter_dir, ADAPTER_WEIGHTS)
  for p in (cfg_path, w_path):
    if not os.path.isfile(p):
      raise MissingFileError(f"{p} not found: a PEFT adapter directory holds {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS}")
  with open(cfg_path) as f:
    d = json.load(f)
  tensors, saved = {}, {}
  for key, value in load_file(w_path).items():
    s = _SAVED_KEY.fullmatch(key)
    if s is not None:
      saved[s["module"]] = value
      continue
    m = _KEY.fullmatch(key)
    if m is None or m["pre"] not in _TEXT_PREFIXES:
      raise ConfigError(f"adapter tensor {key!r} is not a LoRA weight of the language model's decoder layers "
                       f"(expected e.g. {PEFT_PREFIX}0.self_attn.q_proj.lora_A.weight)")
    tensors[(int(m["layer"]), m["block"], m["name"], m["ab"])] = value
  declared = set(d.get("modules_to_save") or ())
  if declared <= set(LORA_MODULES_TO_SAVE) and set(saved) != declared:  # unknown ones: lora_config_from_peft
    raise ConfigError(f"adapter_config.json lists modules_to_save={sorted(declared)} but the weights hold "
                      f"{sorted(saved)}")
  return d, tensors, saved


def import_peft_adapter(adapter_dir: str, config: LlavaConfig, params) -> Tuple[LlavaConfig, dict]:
  """A PEFT adapter onto our base params → (config with runtime.lora, params with lora_a / lora_b leaves).

  params: a base tree for `config` (any existing adapters are replaced). Shapes are checked against the kernels;
  arrays come back as numpy in the kernel's dtype (place them with the train state's shardings).
  """
  d, tensors, saved = read_peft_adapter(adapter_dir)
  names = {(block, name) for (_, block, name, _) in tensors}
  lora = lora_config_from_peft(d, [n for _, n in names])
  out = strip_lora(params)
  scanned = config.runtime.scan_layers
  num_layers, r = config.text.num_hidden_layers, lora.rank
  for block, name in sorted(names):
    layers = [("language_model", "layers" if scanned else f"layers_{i}", block, name) for i in range(num_layers)]
    kernel = get_in(out, layers[0] + ("kernel",))
    d_in, d_out = kernel.shape[-2:]
    a_rows, b_rows = [], []
    for i in range(num_layers):
      a, b = tensors.get((i, block, name, "A")), tensors.get((i, block, name, "B"))
      if (a is None) != (b is None):
        raise ConfigError(f"layer {i} {block}.{name}: adapter has only one of lora_A / lora_B")
      a = np.zeros((r, d_in), np.float32) if a is None else a
      b = np.zeros((d_out, r), np.float32) if b is None else b
      if a.shape != (r, d_in) or b.shape != (d_out, r):
        raise ConfigError(f"layer {i} {block}.{name}: lora_A {a.shape} / lora_B {b.shape} do not fit rank {r} "
                         f"and the kernel [{d_in}, {d_out}]")
      a_rows.append(a.T.astype(kernel.dtype))
      b_rows.append(b.T.astype(kernel.dtype))
    if scanned:
      set_in(out, layers[0] + (LORA_A,), np.stack(a_rows))
      set_in(out, layers[0] + (LORA_B,), np.stack(b_rows))
    else:
      for i, path in enumerate(layers):
        set_in(out, path + (LORA_A,), a_rows[i])
        set_in(out, path + (LORA_B,), b_rows[i])
  for module, value in saved.items():
    path = _saved_module_path(module)
    current = get_in(out, path)
    want = _torch_layout(module, current).shape
    if value.shape != want:
      raise ConfigError(f"modules_to_save {module}: {value.shape} does not fit the model's {want}")
    set_in(out, path, np.asarray(_torch_layout(module, value), current.dtype))
  extra = sorted({i for (i, *_) in tensors if i >= num_layers})
  if extra:
    raise ConfigError(f"adapter has layers {extra} but the model has {num_layers}")
  return config.with_runtime(lora=lora), out
