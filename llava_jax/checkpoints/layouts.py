"""Which checkpoint is this, what config does it describe, and under which key prefixes are its tensors?

Three kinds of input (see `load_pretrained`):
  llava-hf     config.json `model_type: llava` with `text_config` / `vision_config`; tensors in one of the
               layouts seen in practice — hub (`language_model.model.*`, `vision_tower.vision_model.*`),
               transformers-5 `save_pretrained` (`language_model.model.*`, `vision_tower.embeddings.*`), or
               in-memory (`model.language_model.*`, `model.vision_tower.[vision_model.]*`, `lm_head.weight`).
  original     liuhaotian/llava-* (`LlavaLlamaForCausalLM`, `mm_*` config keys): LLaMA keys +
               `model.mm_projector[.0/.2/...]`, vision tower in a separate CLIP directory or in the checkpoint
               under `model.vision_tower.vision_tower.vision_model.*`.
  llama        a plain LLaMA/Vicuna directory + a CLIP directory (+ an optional stage-1 projector file).

Each kind becomes a list of `Source`s: a tensor reader plus the `KeySpec` rows (from the model families' key
tables, with the prefixes found in that checkpoint) it must fill, and a predicate for harmless extras.
HF config defaults are written out here (not read from transformers, which would import torch at runtime).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from llava_jax.checkpoints.clip_keys import clip_key_specs
from llava_jax.checkpoints.llama_keys import llama_key_specs
from llava_jax.checkpoints.projector_keys import projector_key_specs
from llava_jax.checkpoints.reader import TensorReader, has_weights
from llava_jax.checkpoints.table import KeySpec
from llava_jax.checkpoints.hf_configs import HF_LLAVA_VISION_DEFAULTS, text_config_from_hf, vision_config_from_hf
from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.errors import MissingFileError

ORIGINAL_IMAGE_TOKEN_INDEX = -200  # IMAGE_TOKEN_INDEX of the original LLaVA code
ORIGINAL_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}

# Candidate prefixes, in order of preference; the first whose anchor tensor exists wins.
LLAVA_HF_TEXT = ("language_model.model.", "model.language_model.")
LLAVA_HF_HEAD = ("language_model.lm_head.weight", "lm_head.weight")
LLAVA_HF_VISION = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
                   "model.vision_tower.")
LLAVA_HF_PROJECTOR = ("multi_modal_projector.", "model.multi_modal_projector.")
CLIP_VISION = ("vision_model.", "")  # hub CLIPVisionModel / CLIPModel, transformers-5 CLIPVisionModel
ORIGINAL_VISION = ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_tower.")
ORIGINAL_PROJECTOR = ("model.mm_projector", "mm_projector")

_HARMLESS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|position_ids)$")
_CLIP_TEXT_TOWER = re.compile(r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)")


@dataclasses.dataclass
class Source:
  """One checkpoint (directory or file) and the rows it must provide."""
  name: str
  reader: TensorReader
  specs: List[KeySpec]
  skip: Callable[[str], bool] = lambda key: False


@dataclasses.dataclass
class LoadPlan:
  config: LlavaConfig
  sources: List[Source]
  init_projector: bool = False  # no projector weights anywhere: initialize it (stage-1 starting point)


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def read_config(path: str) -> dict:
  """config.json of a checkpoint directory (or of the directory a weights file sits in)."""
  d = path if os.path.isdir(path) else os.path.dirname(path)
  cfg = os.path.join(d, "config.json")
  if not os.path.isfile(cfg):
    raise MissingFileError(f"{d!r} has no config.json; expected a llava-hf, original LLaVA or LLaMA checkpoint "
                            "directory")
  return read_json(cfg)


def checkpoint_kind(cfg: dict) -> str:
  """'llava_hf' | 'original' | 'llama' from a config.json dict."""
  arch = set(cfg.get("architectures") or ())
  mt = cfg.get("model_type")
  if mt == "llava" and ("text_config" in cfg or "vision_config" in cfg or "LlavaForConditionalGeneration" in arch):
    return "llava_hf"
  if (mt in ("llava", "llava_llama") or "LlavaLlamaForCausalLM" in arch
      or any(k.startswith("mm_") for k in cfg)):
    return "original"
  if mt == "llama" or "LlamaForCausalLM" in arch:
    return "llama"
  raise ValueError(f"unsupported checkpoint config (model_type={mt!r}, architectures={sorted(arch)}): expected "
                   "llava-hf (model_type 'llava' with text_config), original LLaVA (LlavaLlamaForCausalLM) or "
                   "LLaMA (with vision_tower=<CLIP directory>)")


# ---------------------------------------------------------------------------------------------------------
# Configs


def llava_hf_config(cfg: dict, projector_depth_found: int) -> LlavaConfig:
  """llava-hf config.json → LlavaConfig; the projector depth comes from the weights (linear_1..linear_N)."""
  act = cfg.get("projector_hidden_act", "gelu")
  if act not in ("gelu", "linear"):
    raise ValueError(f"projector_hidden_act {act!r} is not supported (LLaVA uses exact 'gelu'; 'linear' is read as "
                     "export_hf's form of the paper's linear projector)")
  text_dict = dict(cfg.get("text_config") or {})
  if cfg.get("tie_word_embeddings"):
    text_dict["tie_word_embeddings"] = True
  vision = (vision_config_from_hf(cfg["vision_config"]) if cfg.get("vision_config")
            else VisionConfig(**_vision_kw(HF_LLAVA_VISION_DEFAULTS)))
  depth = projector_depth_found or 2
  if act == "linear" and depth != 2:
    raise ValueError(f"projector_hidden_act 'linear' is read only as llava-hf's form of the 'linear' projector "
                     f"(linear_1, then linear_2 = identity with zero bias, as export_hf writes it), but the "
                     f"checkpoint has {depth} projector layers")
  return LlavaConfig(
      vision=vision, text=text_config_from_hf(text_dict),
      projector_type="linear" if depth == 1 or act == "linear" else f"mlp{depth}x_gelu",
      projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
      image_token_index=int(cfg.get("image_token_index", cfg.get("image_token_id", 32000))),
      vision_feature_layer=_feature_layer(cfg.get("vision_feature_layer", -2)),
      vision_feature_select_strategy=cfg.get("vision_feature_select_strategy", "default"))


def _vision_kw(d: dict) -> dict:
  return {f.name: d[f.name] for f in dataclasses.fields(VisionConfig) if f.name in d}


def _feature_layer(v):
  return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else int(v)


def original_config(cfg: dict, vision: VisionConfig, projector_type: str) -> LlavaConfig:
  """Original LLaVA config.json (a LlamaConfig plus mm_* keys) → LlavaConfig (image token -200)."""
  feature = cfg.get("mm_vision_select_feature", "patch")
  if feature not in ORIGINAL_SELECT_FEATURE:
    raise ValueError(f"mm_vision_select_feature {feature!r} is not supported (expected 'patch' or 'cls_patch')")
  text_dict = {k: v for k, v in cfg.items() if not k.startswith("mm_")}
  text_dict["model_type"] = "llama"
  config = LlavaConfig(
      vision=vision, text=text_config_from_hf(text_dict), projector_type=projector_type, projector_bias=True,
      image_token_index=ORIGINAL_IMAGE_TOKEN_INDEX,
      vision_feature_layer=_feature_layer(cfg.get("mm_vision_select_layer", -2)),
      vision_feature_select_strategy=ORIGINAL_SELECT_FEATURE[feature])
  mm_hidden = cfg.get("mm_hidden_size")
  if mm_hidden is not None and mm_hidden != config.projector_in_features:
    raise ValueError(f"config mm_hidden_size={mm_hidden} but the vision tower gives {config.projector_in_features} "
                     f"features (hidden {vision.hidden_size} × {len(config.vision_feature_layers)} layer(s))")
  return config


def original_llava_options(path: str) -> dict:
  """Preprocessing / prompting options an original LLaVA config.json carries (not part of the model):
  image_aspect_ratio ('square' | 'pad'), mm_use_im_start_end, mm_use_im_patch_token, tokenizer_model_max_length,
  mm_vision_tower (the CLIP checkpoint name)."""
  cfg = read_config(path)
  return {"image_aspect_ratio": cfg.get("image_aspect_ratio", "square"),
          "mm_use_im_start_end": bool(cfg.get("mm_use_im_start_end", False)),
          "mm_use_im_patch_token": bool(cfg.get("mm_use_im_patch_token", False)),
          "tokenizer_model_max_length": cfg.get("tokenizer_model_max_length"),
          "mm_vision_tower": cfg.get("mm_vision_tower")}


def vision_config_from_shapes(reader: TensorReader, prefix: str) -> VisionConfig:
  """Infer a CLIP config from tensor shapes (for a tower stored inside an original LLaVA checkpoint).

  Heads are not visible in shapes: CLIP ViT-B/L use head_dim 64, so heads = hidden // 64. Pass
  vision_tower=<directory with the CLIP config.json> to state it instead.
  """
  hidden = reader.shape(f"{prefix}embeddings.class_embedding")[0]
  _, channels, patch, _ = reader.shape(f"{prefix}embeddings.patch_embedding.weight")
  positions = reader.shape(f"{prefix}embeddings.position_embedding.weight")[0]
  side = math.isqrt(positions - 1)
  pat = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
  layers = {int(m.group(1)) for k in reader.keys() for m in [pat.match(k)] if m}
  inter = reader.shape(f"{prefix}encoder.layers.0.mlp.fc1.weight")[0]
  if hidden % 64 or side * side != positions - 1:
    raise ValueError(f"cannot infer the vision tower config from shapes (hidden {hidden}, {positions} positions); "
                     "pass vision_tower=<directory holding the CLIP config.json>")
  return VisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=len(layers),
                      num_attention_heads=hidden // 64, image_size=side * patch, patch_size=patch,
                      num_channels=channels)


# ---------------------------------------------------------------------------------------------------------
# Prefix detection


def detect_prefix(keys: Iterable[str], candidates: Sequence[str], anchor: str) -> Optional[str]:
  """First candidate prefix p with `p + anchor` among `keys`, else None."""
  keys = set(keys)
  for p in candidates:
    if p + anchor in keys:
      return p
  return None


def original_projector(keys: Iterable[str], prefix: str) -> Optional[str]:
  """Projector type held under an original-LLaVA prefix (`model.mm_projector`): 'linear', 'mlpNx_gelu' or None."""
  keys = set(keys)
  if f"{prefix}.weight" in keys:
    return "linear"
  pat = re.compile(re.escape(prefix) + r"\.(\d+)\.weight$")
  idx = sorted(int(m.group(1)) for k in keys for m in [pat.match(k)] if m)
  if not idx:
    return None
  if idx != list(range(0, 2 * len(idx), 2)):
    raise ValueError(f"projector layers {prefix}.{idx} are not the nn.Sequential indices 0, 2, 4, ... of "
                     "an mlpNx_gelu projector")
  return f"mlp{len(idx)}x_gelu"


def hf_projector_depth(keys: Iterable[str], prefix: str) -> int:
  pat = re.compile(re.escape(prefix) + r"linear_(\d+)\.weight$")
  return len({int(m.group(1)) for k in keys for m in [pat.match(k)] if m})


def _harmless(key: str) -> bool:
  return bool(_HARMLESS.search(key))


def _clip_skip(key: str) -> bool:
  return _harmless(key) or bool(_CLIP_TEXT_TOWER.match(key))


def _tied_skip(config: TextConfig, head_key: str, base=_harmless):
  if config.tie_word_embeddings:
    return lambda k: base(k) or k == head_key
  return base


# ---------------------------------------------------------------------------------------------------------
# Plans


def _vocab_from_checkpoint(text: TextConfig, reader: TensorReader, embed_key: str) -> TextConfig:
  """Vocabulary size as the checkpoint's embedding table has it (e.g. rows added for <im_start>/<im_end>)."""
  if embed_key in reader:
    rows = reader.shape(embed_key)[0]
    if rows != text.vocab_size:
      text = dataclasses.replace(text, vocab_size=rows)
  return text


def _clip_source(vision_dir: str, allow_pickle: bool, name: str = "vision tower") -> Tuple[VisionConfig, Optional[Source]]:
  cfg = read_config(vision_dir)
  vision = vision_config_from_hf(cfg)
  if not has_weights(vision_dir):
    return vision, None  # config only: the weights must be in the main checkpoint
  reader = TensorReader(vision_dir, allow_pickle=allow_pickle)
  prefix = detect_prefix(reader.keys(), CLIP_VISION, "embeddings.class_embedding")
  prefix = CLIP_VISION[0] if prefix is None else prefix
  return vision, Source(f"{name} ({vision_dir})", reader, clip_key_specs(vision, prefix=prefix), _clip_skip)


def plan_llava_hf(path: str, cfg: dict, allow_pickle: bool) -> LoadPlan:
  reader = TensorReader(path, allow_pickle=allow_pickle)
  keys = reader.keys()
  text_p = detect_prefix(keys, LLAVA_HF_TEXT, "embed_tokens.weight") or LLAVA_HF_TEXT[0]
  head = next((h for h in LLAVA_HF_HEAD if h in reader), LLAVA_HF_HEAD[LLAVA_HF_TEXT.index(text_p)])
  vision_p = detect_prefix(keys, LLAVA_HF_VISION, "embeddings.class_embedding") or LLAVA_HF_VISION[0]
  proj_p = detect_prefix(keys, LLAVA_HF_PROJECTOR, "linear_1.weight") or LLAVA_HF_PROJECTOR[0]
  config = llava_hf_config(cfg, hf_projector_depth(keys, proj_p))
  config = config.replace(text=_vocab_from_checkpoint(config.text, reader, f"{text_p}embed_tokens.weight"))
  specs = (clip_key_specs(config.vision, prefix=vision_p)
           + projector_key_specs(config, style="hf", prefix=proj_p)
           + llama_key_specs(config.text, prefix=text_p, lm_head_key=head))
  skip = _tied_skip(config.text, head)
  if cfg.get("projector_hidden_act") == "linear":  # export_hf's form of 'linear': linear_2 is a no-op, dropped
    identity = _identity_linear_2_keys(path, reader, proj_p, config.projector_bias)
    base_skip = skip
    skip = lambda k: base_skip(k) or k in identity
  return LoadPlan(config, [Source(f"checkpoint ({path})", reader, specs, skip)])


def _identity_linear_2_keys(path: str, reader: TensorReader, prefix: str, bias: bool) -> frozenset:
  """The keys of linear_2 after checking it is exactly the identity (weight) with zero bias; else ValueError."""
  keys = [f"{prefix}linear_2.weight"] + ([f"{prefix}linear_2.bias"] if bias else [])
  for key in keys:
    if key not in reader:
      why = f"{key} is missing"
    else:
      value = np.asarray(reader.get(key), np.float32)
      want = np.eye(value.shape[0], dtype=np.float32) if key.endswith("weight") else np.zeros_like(value)
      why = None if value.shape == want.shape and np.array_equal(value, want) else (
          f"{key} is not {'the identity' if key.endswith('weight') else 'zero'}")
    if why is not None:
      raise ValueError(f"{path}: projector_hidden_act 'linear' is read only as llava-hf's form of the 'linear' "
                       f"projector (linear_1, then linear_2 = identity with zero bias, as export_hf writes it), but "
                       f"{why}; two Dense layers without an activation are not a LLaVA projector")
  return frozenset(keys)


def plan_original(path: str, cfg: dict, vision_tower: Optional[str], allow_pickle: bool) -> LoadPlan:
  reader = TensorReader(path, allow_pickle=allow_pickle)
  keys = reader.keys()
  sources = []
  vision_in_ckpt = detect_prefix(keys, ORIGINAL_VISION, "embeddings.class_embedding")
  vision_source = None
  if vision_tower is not None:
    vision, vision_source = _clip_source(vision_tower, allow_pickle)
  elif vision_in_ckpt is not None:
    vision = vision_config_from_shapes(reader, vision_in_ckpt)
  else:
    raise ValueError(f"{path} holds no vision tower weights (original LLaVA releases do not); pass "
                     f"vision_tower=<local CLIP directory> (config names mm_vision_tower="
                     f"{cfg.get('mm_vision_tower')!r})")
  proj_p = detect_prefix(keys, ORIGINAL_PROJECTOR, ".weight") or detect_prefix(keys, ORIGINAL_PROJECTOR, ".0.weight")
  proj_p = ORIGINAL_PROJECTOR[0] if proj_p is None else proj_p
  found = original_projector(keys, proj_p)
  stated = cfg.get("mm_projector_type")
  if stated is not None and found is not None and stated != found:
    raise ValueError(f"config mm_projector_type={stated!r} but the weights under {proj_p} form a {found!r} projector")
  config = original_config(cfg, vision, stated or found or "linear")
  config = config.replace(text=_vocab_from_checkpoint(config.text, reader, "model.embed_tokens.weight"))
  specs = projector_key_specs(config, style="original", prefix=proj_p) + llama_key_specs(config.text)
  skip = _tied_skip(config.text, "lm_head.weight")
  if vision_source is not None:
    sources.append(vision_source)
    base_skip = skip
    skip = lambda k: base_skip(k) or k.startswith("model.vision_tower.")  # the separate CLIP wins, as in the original
  else:
    specs = clip_key_specs(vision, prefix=vision_in_ckpt) + specs
  return LoadPlan(config, [Source(f"checkpoint ({path})", reader, specs, skip)] + sources)


def plan_llama(path: str, cfg: dict, vision_tower: Optional[str], projector: Optional[str],
               projector_type: Optional[str], allow_pickle: bool) -> LoadPlan:
  if vision_tower is None:
    raise ValueError(f"{path} is a plain LLaMA checkpoint: pass vision_tower=<local CLIP directory> (and "
                     "optionally projector=<stage-1 mm_projector file>)")
  vision, vision_source = _clip_source(vision_tower, allow_pickle)
  if vision_source is None:
    raise ValueError(f"vision_tower={vision_tower!r} has a config.json but no weights")
  reader = TensorReader(path, allow_pickle=allow_pickle)
  proj_source_reader, proj_p = None, None
  if projector is not None:
    proj_source_reader = TensorReader(projector, allow_pickle=allow_pickle)
    pkeys = proj_source_reader.keys()
    proj_p = (detect_prefix(pkeys, ORIGINAL_PROJECTOR, ".weight")
              or detect_prefix(pkeys, ORIGINAL_PROJECTOR, ".0.weight"))
    if proj_p is None:
      raise ValueError(f"projector file {projector} holds no 'model.mm_projector.*' or 'mm_projector.*' tensors "
                       f"(found {_preview(pkeys)})")
    found = original_projector(pkeys, proj_p)
    if projector_type is not None and projector_type != found:
      raise ValueError(f"projector_type={projector_type!r} but {projector} holds a {found!r} projector")
    projector_type = found
  if projector_type is None:
    raise ValueError("a CLIP + LLaMA start without a projector file needs projector_type= ('linear' for the "
                     "paper, 'mlp2x_gelu' for v1.5): the projector is freshly initialized")
  text_dict = dict(cfg)
  text_dict["model_type"] = "llama"
  config = LlavaConfig(vision=vision, text=text_config_from_hf(text_dict), projector_type=projector_type,
                       projector_bias=True, image_token_index=ORIGINAL_IMAGE_TOKEN_INDEX)
  config = config.replace(text=_vocab_from_checkpoint(config.text, reader, "model.embed_tokens.weight"))
  sources = [Source(f"language model ({path})", reader, llama_key_specs(config.text),
                    _tied_skip(config.text, "lm_head.weight")), vision_source]
  if proj_source_reader is not None:
    sources.append(Source(f"projector ({projector})", proj_source_reader,
                          projector_key_specs(config, style="original", prefix=proj_p), _harmless))
  return LoadPlan(config, sources, init_projector=proj_source_reader is None)


def make_plan(path: str, *, vision_tower: Optional[str] = None, projector: Optional[str] = None,
              projector_type: Optional[str] = None, allow_pickle: bool = False) -> LoadPlan:
  """Read config.json(s) and tensor listings (no tensor data) and decide what goes where."""
  cfg = read_config(path)
  kind = checkpoint_kind(cfg)
  if kind != "llama" and projector is not None:
    raise ValueError(f"projector= is for a plain LLaMA checkpoint; {path} is a {kind} checkpoint with its own projector")
  if kind != "llama" and projector_type is not None:
    raise ValueError(f"projector_type= is for a plain LLaMA checkpoint; {path} states its own projector")
  if kind == "llava_hf":
    if vision_tower is not None:
      raise ValueError(f"vision_tower= is for original LLaVA or LLaMA checkpoints; {path} is a llava-hf checkpoint "
                       "with its own vision tower")
    return plan_llava_hf(path, cfg, allow_pickle)
  if kind == "original":
    return plan_original(path, cfg, vision_tower, allow_pickle)
  return plan_llama(path, cfg, vision_tower, projector, projector_type, allow_pickle)


# ---------------------------------------------------------------------------------------------------------
# Key checks


def _preview(keys: Sequence[str], limit: int = 12) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


class CheckpointKeyError(ValueError):
  """Checkpoint tensors that match no parameter, or parameters with no tensor."""


def check_keys(sources: Sequence[Source]) -> None:
  """Raise one CheckpointKeyError naming every unknown and missing key (lists truncated)."""
  problems = []
  for src in sources:
    present = set(src.reader.keys())
    wanted = {s.hf_key for s in src.specs}
    unknown = sorted(k for k in present - wanted if not src.skip(k))
    missing = sorted(wanted - present)
    if unknown:
      problems.append(f"{src.name}: {len(unknown)} unknown tensor(s): {_preview(unknown)}")
    if missing:
      problems.append(f"{src.name}: {len(missing)} missing tensor(s): {_preview(missing)}")
  if problems:
    raise CheckpointKeyError("checkpoint keys do not match the model:\n  " + "\n  ".join(problems))
