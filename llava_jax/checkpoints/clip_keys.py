"""Key table for the CLIP vision tower: HF `CLIPVisionModel` tensors ⇄ `CLIPVisionTransformer` params.

`embeddings.position_ids` (a non-persistent buffer in old checkpoints) is not a parameter and is not listed.
"""
from __future__ import annotations

from typing import List, Tuple

from llava_jax.checkpoints.table import KeySpec, conv_to_flax, conv_to_torch, transpose
from llava_jax.config import VisionConfig


def _norm(hf: str, path: Tuple[str, ...], layer=None) -> List[KeySpec]:
  return [KeySpec(f"{hf}.weight", path + ("scale",), layer), KeySpec(f"{hf}.bias", path + ("bias",), layer)]


def _linear(hf: str, path: Tuple[str, ...], layer) -> List[KeySpec]:
  return [KeySpec(f"{hf}.weight", path + ("kernel",), layer, transpose, transpose),
          KeySpec(f"{hf}.bias", path + ("bias",), layer)]


def clip_key_specs(config: VisionConfig, prefix: str = "vision_model.",
                   path_prefix: Tuple[str, ...] = ("vision_tower",)) -> List[KeySpec]:
  """Every tensor of a CLIPVisionModel with `config.num_hidden_layers` layers, in checkpoint order.

  prefix: key prefix of the vision model in the checkpoint ('vision_model.' for CLIPVisionModel,
    'vision_tower.vision_model.' inside llava-hf, ...). path_prefix: where the tower sits in our param tree.
  """
  p, root = prefix, tuple(path_prefix)
  emb = root + ("embeddings",)
  specs = [
      KeySpec(f"{p}embeddings.class_embedding", emb + ("class_embedding",)),
      KeySpec(f"{p}embeddings.patch_embedding.weight", emb + ("patch_embedding", "kernel"), None,
              conv_to_flax, conv_to_torch),
      KeySpec(f"{p}embeddings.position_embedding.weight", emb + ("position_embedding", "embedding")),
  ]
  specs += _norm(f"{p}pre_layrnorm", root + ("pre_layrnorm",))
  layers = root + ("encoder", "layers")
  for i in range(config.num_hidden_layers):
    hf = f"{p}encoder.layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      specs += _linear(hf + f"self_attn.{name}", layers + ("self_attn", name), i)
    specs += _norm(hf + "layer_norm1", layers + ("layer_norm1",), i)
    specs += _linear(hf + "mlp.fc1", layers + ("mlp", "fc1"), i)
    specs += _linear(hf + "mlp.fc2", layers + ("mlp", "fc2"), i)
    specs += _norm(hf + "layer_norm2", layers + ("layer_norm2",), i)
  specs += _norm(f"{p}post_layernorm", root + ("post_layernorm",))
  return specs
