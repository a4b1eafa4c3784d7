"""Key table for HF `LlamaForCausalLM` checkpoints ⇄ the `language_model` param subtree.

Old checkpoints may also hold `model.layers.N.self_attn.rotary_emb.inv_freq` buffers; they are derived from
the config, not parameters, so they are not listed here and the loader skips them as extras.
"""
from __future__ import annotations

from typing import List, Sequence

from llava_jax.checkpoints.table import KeySpec, transpose
from llava_jax.config import TextConfig

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


def llama_key_specs(config: TextConfig, prefix: str = "model.", lm_head_key: str = "lm_head.weight",
                    path_prefix: Sequence[str] = ("language_model",)) -> List[KeySpec]:
  """One row per LlamaForCausalLM tensor: embeddings, per-layer attention / MLP / norms, final norm, lm_head.

  prefix: checkpoint prefix of the decoder body (`model.` for LlamaForCausalLM; e.g.
    `language_model.model.` for old llava-hf files). lm_head_key: the head's key (omitted when
    `config.tie_word_embeddings`). path_prefix: where the subtree sits in our params.
  Linear weights are transposed ([out, in] ⇄ [in, out]); embeddings and norm weights are copied.
  """
  root = tuple(path_prefix)
  specs = [KeySpec(f"{prefix}embed_tokens.weight", root + ("embed_tokens", "embedding"))]
  for i in range(config.num_hidden_layers):
    layer = f"{prefix}layers.{i}."
    for name in _ATTN:
      specs.append(KeySpec(f"{layer}self_attn.{name}.weight", root + ("layers", "self_attn", name, "kernel"),
                           layer=i, to_flax=transpose, to_hf=transpose))
    for name in _MLP:
      specs.append(KeySpec(f"{layer}mlp.{name}.weight", root + ("layers", "mlp", name, "kernel"),
                           layer=i, to_flax=transpose, to_hf=transpose))
    for name in _NORMS:
      specs.append(KeySpec(f"{layer}{name}.weight", root + ("layers", name, "scale"), layer=i))
  specs.append(KeySpec(f"{prefix}norm.weight", root + ("norm", "scale")))
  if not config.tie_word_embeddings:
    specs.append(KeySpec(lm_head_key, root + ("lm_head", "kernel"), to_flax=transpose, to_hf=transpose))
  return specs
