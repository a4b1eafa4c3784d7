"""Model configuration: architecture (what a checkpoint fixes) and runtime options (how we run it).

Architecture configs mirror the HF ones field for field where they exist, so `from_hf_dict` is a rename.
Runtime options (dtypes, layer scan, remat, attention kernel) never change the maths, only how it is
computed; they live in `RuntimeOptions` and every module takes one.

All dataclasses are frozen and hashable: they are static arguments of jitted functions.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Tuple, Union

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
ATTENTION_IMPLS = ("xla", "dot_product", "cudnn", "chunked", "splash")
QUANTIZE_MODES = ("int8", "int4", "nf4")
PROJECTOR_TYPES_DOC = "'linear', 'mlp2x_gelu', 'mlp3x_gelu', ... ('mlp{N}x_gelu' generally)"


LORA_DEFAULT_TARGET = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# PEFT `modules_to_save` we can train fully next to the adapters: PEFT name → our param path under language_model
LORA_MODULES_TO_SAVE = {"lm_head": "lm_head/kernel", "embed_tokens": "embed_tokens/embedding"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the decoder's linear layers, as PEFT's `LoraConfig` (models/lora.py).

  y = x·W + dropout(x)·A·B · (alpha / r), A [in, r] kaiming-uniform, B [r, out] zeros (so a fresh adapter
  is the base model). rank: r (> 0). alpha: lora_alpha. dropout: on the adapter's input only (training steps
  that pass a 'dropout' rng). target: regex `re.fullmatch`ed against each decoder Dense's '/'-joined module path
  (e.g. 'language_model/layers/self_attn/q_proj'; 'layers_3' when layers are not scanned); the default is
  LLaVA's `find_all_linear_names` (every decoder linear but the lm_head). modules_to_save: PEFT's option of the
  same name, a subset of ('lm_head', 'embed_tokens') trained fully next to the adapters. Not in LLaVA's recipe,
  whose Vicuna already knows its vocabulary; for a base that has never produced the fine-tuning data's tokens.
  """
  rank: int = 128
  alpha: float = 256.0
  dropout: float = 0.05
  target: str = LORA_DEFAULT_TARGET
  modules_to_save: Tuple[str, ...] = ()

  def __post_init__(self):
    if int(self.rank) <= 0:
      raise ValueError(f"lora rank={self.rank} must be positive")
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"lora dropout={self.dropout} must be in [0, 1)")
    re.compile(self.target)
    object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
    unknown = [m for m in self.modules_to_save if m not in LORA_MODULES_TO_SAVE]
    if unknown:
      raise ValueError(f"lora modules_to_save={list(self.modules_to_save)}: {unknown} unknown; choose from "
                       f"{sorted(LORA_MODULES_TO_SAVE)}")

  @property
  def scale(self) -> float:
    """alpha / r, PEFT's `scaling` (without rslora)."""
    return float(self.alpha) / int(self.rank)


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
  """How the model is computed. None of these fields but `lora` and `quantize` changes the function computed (up
  to dtype rounding).

  dtype: compute dtype of matmuls and activations ('float32' | 'bfloat16'); norms, softmax and the loss
    always run in float32.
  param_dtype: dtype parameters are created / loaded in.
  scan_layers: stack each tower's layers with `nn.scan` (params get a leading [L] axis, compile is O(1) in L).
  remat_policy: one of REMAT_POLICIES; 'none' disables `nn.remat`.
  attention_impl: 'xla' (einsum + float32 softmax), 'dot_product' (`jax.nn.dot_product_attention`, XLA),
    'cudnn' (`jax.nn.dot_product_attention(implementation='cudnn')`, flash attention on GPU), 'chunked' ('xla'
    over blocks of queries, rematerialized: memory O(T·block) instead of O(T²), any backend), 'splash' (jax's
    Pallas TPU splash-attention kernel, `models/splash.py`: causal + segment-id masking in the kernel, no
    [T, T] mask or scores, sharded with `shard_map` under a mesh; interpret mode, exact but slow, when the
    target is not a TPU). 'splash' covers the LLaMA decoder without a KV cache (training, `__call__`); the
    KV-cache path (`extend`: prefill and decode) and CLIP's unmasked encoder attention use 'xla' for it.
  lora: LoRA adapters on the decoder's linear layers (`LoraConfig`, models/lora.py), None for none.
  quantize: weight-only quantization of the decoder's q/k/v/o/gate/up/down kernels (models/quant.py): None,
    'int8' (per-output-channel scales), 'int4' (groups of 64) or 'nf4' (bitsandbytes' NF4, blocks of 64).
    Embeddings, lm_head, norms, vision tower and projector stay in `param_dtype`.
  """
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"
  lora: Optional[LoraConfig] = None
  quantize: Optional[str] = None

  def __post_init__(self):
    if isinstance(self.lora, dict):
      object.__setattr__(self, "lora", LoraConfig(**self.lora))
    if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
      raise ValueError(f"quantize={self.quantize!r}; choose None or one of {QUANTIZE_MODES}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{name}={getattr(self, name)!r}; choose float32 or bfloat16")

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """CLIP vision transformer (HF `CLIPVisionConfig`). Defaults: ViT-L/14 at 224 px."""
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + 1

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency-dependent RoPE scaling (HF rope_type 'llama3')."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  rope_type: str = "llama3"


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """LLaMA / Vicuna decoder (HF `LlamaConfig`). Defaults: Vicuna-7B v1.5."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: Optional[int] = None
  max_position_embeddings: int = 4096
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"
  bos_token_id: int = 1
  eos_token_id: int = 2
  pad_token_id: Optional[int] = 0

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """The whole model: vision tower → projector → decoder.

  vision_feature_layer: index into CLIP hidden_states (0 = embeddings after pre_layrnorm, i = output of
    layer i; negative counts from the end, -2 = LLaVA's choice) or a tuple of them, concatenated on features.
  vision_feature_select_strategy: 'default' (= original 'patch', drops CLS) or 'full' (keeps it).
  image_token_index: id of the placeholder that image features overwrite. llava-hf: 32000; original LLaVA
    checkpoints use -200 (out of vocabulary; the embedding lookup never reads it).
  """
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  projector_type: str = "mlp2x_gelu"
  projector_bias: bool = True
  image_token_index: int = 32000
  vision_feature_layer: Union[int, Tuple[int, ...]] = -2
  vision_feature_select_strategy: str = "default"
  runtime: RuntimeOptions = RuntimeOptions()

  def __post_init__(self):
    if self.vision_feature_select_strategy not in ("default", "full"):
      raise ValueError(f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}; "
                       "choose 'default' (drop CLS, original 'patch') or 'full'")
    if isinstance(self.vision_feature_layer, list):
      object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
    projector_depth(self.projector_type)  # validates

  @property
  def num_image_tokens(self) -> int:
    """Feature vectors one image becomes (256 at 224 px, 576 at 336 px; +1 with 'full')."""
    return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

  @property
  def vision_feature_layers(self) -> Tuple[int, ...]:
    v = self.vision_feature_layer
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)

  @property
  def projector_in_features(self) -> int:
    return self.vision.hidden_size * len(self.vision_feature_layers)

  def replace(self, **kw) -> "LlavaConfig":
    return dataclasses.replace(self, **kw)

  def with_runtime(self, **kw) -> "LlavaConfig":
    return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **kw))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "LlavaConfig":
    d = dict(d)
    text = dict(d.pop("text", {}))
    if text.get("rope_scaling"):
      text["rope_scaling"] = RopeScaling(**text["rope_scaling"])
    vfl = d.pop("vision_feature_layer", -2)
    return cls(vision=VisionConfig(**d.pop("vision", {})), text=TextConfig(**text),
               runtime=RuntimeOptions(**d.pop("runtime", {})),
               vision_feature_layer=tuple(vfl) if isinstance(vfl, (list, tuple)) else vfl, **d)


def projector_depth(projector_type: str) -> int:
  """Number of Dense layers of a projector type: 'linear' → 1, 'mlp{N}x_gelu' → N."""
  if projector_type == "linear":
    return 1
  if projector_type.startswith("mlp") and projector_type.endswith("x_gelu"):
    n = projector_type[3:-len("x_gelu")]
    if n.isdigit() and int(n) >= 1:
      return int(n)
  raise ValueError(f"projector_type={projector_type!r}; expected {PROJECTOR_TYPES_DOC}")


def dtype_name(dtype: Any) -> str:
  return jnp.dtype(dtype).name
