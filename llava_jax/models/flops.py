"""Analytical FLOPs of a training step: the one FLOP model of the training metrics (MFU), the plan and bench/.

XLA's `cost_analysis()` counts the body of a `scan` (our layer stack, micro-batch loop and loss chunks) once,
so FLOPs are counted here from the architecture. Conventions (as MaxText / PaLM's MFU): a matmul [m, k] × [k, n]
is 2·m·k·n FLOPs; attention is counted as the full T×T square (no causal discount); the backward pass of a
trained matmul costs 2× its forward (activation and weight gradients), of a frozen one 1× (activation gradient
only, needed when something upstream trains), of the weightless attention core 2×. LoRA: the base matmuls are
frozen (plan: `decoder_trainable` False when only adapters train), the adapters trained (3×). Model FLOPs (for MFU) do
not include rematerialization; hardware FLOPs add what remat / chunked kernels recompute.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from flax import traverse_util

from llava_jax.config import LlavaConfig, projector_depth

@dataclasses.dataclass(frozen=True)
class LayerFlops:
  """Forward FLOPs per token of one decoder layer, split by kind: [projections, mlp, attention core]."""
  qkv: float       # q, k, v projections
  out: float       # o projection
  mlp: float       # gate, up, down
  attn: float      # scores + probabilities × values (weightless)

  @property
  def total(self) -> float:
    return self.qkv + self.out + self.mlp + self.attn


def decoder_layer_flops(config: LlavaConfig, seq_len: int) -> LayerFlops:
  t = config.text
  hd = t.resolved_head_dim
  return LayerFlops(qkv=2.0 * t.hidden_size * hd * (t.num_attention_heads + 2 * t.num_key_value_heads),
                    out=2.0 * t.hidden_size * hd * t.num_attention_heads,
                    mlp=2.0 * 3 * t.hidden_size * t.intermediate_size,
                    attn=2.0 * 2 * seq_len * t.num_attention_heads * hd)


def head_flops(config: LlavaConfig) -> float:
  """LM head forward FLOPs per token."""
  return 2.0 * config.text.hidden_size * config.text.vocab_size


def vision_layers_run(config: LlavaConfig) -> int:
  """CLIP blocks the model runs: up to `vision_feature_layer` (hidden_states[-2] → L − 1 blocks; the tower stops
  there, scanned or not)."""
  layer, n = config.vision_feature_layer, config.vision.num_hidden_layers
  layer = max(layer) if isinstance(layer, (tuple, list)) else layer  # several feature layers: the deepest
  return n + 1 + layer if layer < 0 else layer


def vision_flops_per_image(config: LlavaConfig) -> float:
  """CLIP forward FLOPs per image: patch embedding + the blocks run (`vision_layers_run`); forward only (frozen)."""
  v = config.vision
  tokens = v.num_positions
  patch = 2.0 * v.num_patches * v.patch_size ** 2 * v.num_channels * v.hidden_size
  per_token = 2.0 * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
  attn = 2.0 * 2 * tokens * v.hidden_size
  return patch + vision_layers_run(config) * tokens * (per_token + attn)


def projector_flops_per_token(config: LlavaConfig) -> float:
  """Projector forward FLOPs per image token."""
  depth = projector_depth(config.projector_type)
  return 2.0 * config.projector_in_features * config.text.hidden_size + (depth - 1) * 2.0 * config.text.hidden_size ** 2


ADAPTED = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def lora_flops_per_token(config: LlavaConfig) -> float:
  """Forward FLOPs per token of every decoder layer's LoRA adapters (x·A·B: 2·r·(in + out) per targeted linear,
  `models.lora.is_target` on the scanned module paths); 0 without `runtime.lora`."""
  lora = config.runtime.lora
  if lora is None:
    return 0.0
  from llava_jax.models.lora import is_target
  t = config.text
  hd, d, f = t.resolved_head_dim, t.hidden_size, t.intermediate_size
  q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
  dims = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, f),
          "up_proj": (d, f), "down_proj": (f, d)}
  per_layer = sum(2.0 * lora.rank * sum(dims[name]) for block, name in ADAPTED
                  if is_target(lora, ("language_model", "layers", block, name)))
  return t.num_hidden_layers * per_layer


def recompute_layer_flops(layer: LayerFlops, remat_policy: str, attention_impl: str) -> float:
  """Forward FLOPs per token and layer that the backward pass recomputes.

  'full' recomputes the layer; 'save_attn_out' all but the o projection; 'dots_no_batch' the batched matmuls
  (the attention core); 'dots' / 'none' nothing. A 'chunked' attention kernel recomputes its core once more
  (per-block checkpoint); cudnn's flash kernel also recomputes scores in its backward.
  """
  extra = {"full": layer.total, "save_attn_out": layer.total - layer.out, "dots_no_batch": layer.attn,
           "dots": 0.0, "none": 0.0}[remat_policy]
  if attention_impl in ("chunked", "cudnn"):
    extra += layer.attn
  return extra


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one training step over the global batch."""
  model: float            # useful FLOPs (MFU numerator)
  hardware: float         # model + recomputation
  tokens: int             # tokens processed (global batch × sequence length)
  images: int

  @property
  def recompute_factor(self) -> float:
    return self.hardware / self.model if self.model else 1.0


LOSS_ELEMENTWISE_PER_LOGIT = 7  # max, subtract, exp, sum; softmax = e / Σ, − onehot, × weight


def trainable_parts(trainable) -> Tuple[bool, bool]:
  """(decoder_trainable, projector_trainable) of a trainable param tree: LoRA adapters alone leave the decoder's
  base matmuls frozen (their FLOPs: `lora_flops_per_token`)."""
  decoder = any(not str(path[-1]).startswith("lora_")
                for path in traverse_util.flatten_dict(dict(trainable.get("language_model") or {})))
  return decoder, bool(trainable.get("multi_modal_projector"))


def step_flops(config: LlavaConfig, *, global_batch: int, seq_len: int, images: int, decoder_trainable: bool,
               projector_trainable: bool, remat_policy: Optional[str] = None, attention_impl: Optional[str] = None,
               chunked_loss: bool = False, logit_positions: Optional[int] = None,
               loss_elementwise: bool = True) -> StepFlops:
  """FLOPs of a step on `global_batch` rows of `seq_len` tokens holding `images` images (see module doc).

  logit_positions: positions the lm_head and loss run at (train/loss.py computes them at supervised positions
  only: its `logit_positions` metric); default every token. loss_elementwise: count the loss's
  LOSS_ELEMENTWISE_PER_LOGIT per logit (False: the usual model-FLOPs convention without it)."""
  rt = config.runtime
  remat_policy = remat_policy or rt.remat_policy
  attention_impl = attention_impl or rt.attention_impl
  tokens = int(global_batch) * int(seq_len)
  layer = decoder_layer_flops(config, seq_len)
  n_layers = config.text.num_hidden_layers
  weights = layer.qkv + layer.out + layer.mlp
  adapters = lora_flops_per_token(config)  # trained (3×) when the config has LoRA; the base as `decoder_trainable`
  upstream = decoder_trainable or projector_trainable or adapters > 0
  linear_mult = 3.0 if decoder_trainable else (2.0 if upstream else 1.0)
  attn_mult = 3.0 if upstream else 1.0
  decoder = tokens * (n_layers * (linear_mult * weights + attn_mult * layer.attn) + 3.0 * adapters)
  positions = tokens if logit_positions is None else int(logit_positions)
  head = positions * head_flops(config) * (3.0 if decoder_trainable else (2.0 if upstream else 1.0))
  if loss_elementwise:
    head += LOSS_ELEMENTWISE_PER_LOGIT * positions * config.text.vocab_size
  image_tokens = images * config.num_image_tokens
  projector = image_tokens * projector_flops_per_token(config) * (3.0 if projector_trainable else 1.0)
  vision = images * vision_flops_per_image(config)
  model = decoder + head + projector + vision
  recompute = (tokens * (n_layers * recompute_layer_flops(layer, remat_policy, attention_impl)
                         + (adapters if remat_policy in ("full", "save_attn_out") else 0.0)) if upstream else 0.0)
  if chunked_loss and upstream:
    recompute += positions * head_flops(config)
  return StepFlops(model=model, hardware=model + recompute, tokens=tokens, images=int(images))


