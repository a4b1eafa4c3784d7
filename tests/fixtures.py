"""Builders for test fixtures that need no downloads: tokenizer, tiny configs, real photos."""
import importlib.util
import os

import numpy as np

TOKENIZER_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "USER: What color is the square? ASSISTANT: The square is red.",
    "Human: What is in the image?###Assistant: A cat sitting on a couch.###",
    "[INST] <<SYS>> You are a helpful language and vision assistant. <</SYS>> describe [/INST]",
    "Question: Which of these states is farthest north? Context: N/A Options: (A) Utah (B) Maine",
    "The answer is A. There are three circles, a blue triangle and two green squares on the left.",
    "the quick brown fox jumps over the lazy dog 0123456789 ü é ñ 日本語 emoji",
]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg=None):
  """`configs/<name>.py`'s `get_config(arg)` (its `get_config()` when arg is None)."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def train_tiny_tokenizer(out_dir: str, vocab_size: int = 512) -> str:
  """The runtime's `train_tokenizer` (SentencePiece BPE, byte fallback, LLaMA's ids unk 0 / bos 1 / eos 2, pad =
  unk, right padding) on TOKENIZER_CORPUS into `out_dir` (once); returns out_dir."""
  from llava_jax.data.tokenizer import train_tokenizer
  if not os.path.exists(os.path.join(out_dir, "tokenizer.model")):
    train_tokenizer(TOKENIZER_CORPUS * 20, out_dir, vocab_size=vocab_size)
  return out_dir


REFERENCE_IMAGE_ID = -200  # the original LLaVA's IMAGE_TOKEN_INDEX


def reference_tokenize(tokenizer, text: str) -> list:
  """The reference's `tokenizer(text).input_ids` for a LLaMA tokenizer: transformers 4.31's slow LlamaTokenizer
  (LLaVA loads it with use_fast=False) in its legacy mode, re-expressed with sentencepiece itself: BOS, then the
  text cut at the special / added tokens, each of those its id and every piece in between `sp.encode(piece)`.
  A tokenizer without a SentencePiece model (no `vocab_file`) falls back to `tokenizer(text).input_ids`."""
  import sentencepiece as spm
  path = getattr(tokenizer, "vocab_file", None)
  if not path or not os.path.isfile(path):
    return list(tokenizer(text).input_ids)
  sp = spm.SentencePieceProcessor(model_file=path)
  specials = tokenizer.added_tokens_encoder
  ids = [tokenizer.bos_token_id] if tokenizer.add_bos_token else []
  piece, i = "", 0
  while i < len(text):
    hit = max((t for t in specials if text.startswith(t, i)), key=len, default=None)
    if hit is None:
      piece += text[i]
      i += 1
      continue
    ids += sp.encode(piece) if piece else []
    ids.append(specials[hit])
    piece, i = "", i + len(hit)
  return ids + (sp.encode(piece) if piece else [])


def tokenizer_image_token(tokenizer, prompt: str, image_token: int = REFERENCE_IMAGE_ID,
                          num_image_tokens: int = 1) -> list:
  """The reference's `tokenizer_image_token` (LLaVA llava/mm_utils.py) as the oracle for our token ids.

  Each chunk between `<image>`s is tokenized alone (by `reference_tokenize`); when the first chunk starts with
  BOS, that BOS is kept once at the front and the first token of every chunk is dropped; chunks are joined by the
  image id.
  `num_image_tokens` > 1 widens each image id to llava-hf's expanded run of `image_token` placeholders.
  Returns a list of ints [T].
  """
  chunks = [reference_tokenize(tokenizer, chunk) for chunk in prompt.split("<image>")]
  offset = int(bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id)
  ids = list(chunks[0][:offset])
  for j, chunk in enumerate(chunks):
    if j:
      ids += [image_token] * num_image_tokens
    ids += chunk[offset:]
  return ids


def photo(name: str = "astronaut") -> np.ndarray:
  """A real photo as uint8 [H, W, 3] from skimage (offline): astronaut, chelsea or coffee."""
  from skimage import data
  return getattr(data, name)()


# ---------------------------------------------------------------------------------------------------------
# Tiny transformers LLaVA models (PyTorch, float32) and their conversion to our config + params.

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   image_size=28, patch_size=7, projection_dim=32)
TINY_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_IMAGE_TOKEN = 127


def tiny_hf_llava(seed: int = 0, vision: dict | None = None, text: dict | None = None, **llava_kwargs):
  """A random transformers LlavaForConditionalGeneration (float32, eval mode).

  llava_kwargs go to transformers.LlavaConfig (vision_feature_layer, vision_feature_select_strategy,
  projector_hidden_act, image_token_index, ...). `projector_hidden_act='linear'` with linear_2 = identity
  is the reference for our 'linear' projector (set by `make_linear_projector`).
  """
  import torch
  import transformers
  torch.manual_seed(seed)
  kw = dict(image_token_index=TINY_IMAGE_TOKEN, vision_feature_layer=-2,
            vision_feature_select_strategy="default", projector_hidden_act="gelu")
  kw.update(llava_kwargs)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**{**TINY_VISION, **(vision or {})}),
      text_config=transformers.LlamaConfig(**{**TINY_TEXT, **(text or {})}), **kw)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  with torch.no_grad():  # non-trivial norms and biases so a wrong formula cannot hide behind ones/zeros
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias") or "class_embedding" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def make_linear_projector(model) -> None:
  """Turn the HF 2-layer projector into the paper's linear one: act = identity, linear_2 = I, bias 0."""
  import torch
  from transformers.activations import ACT2FN
  proj = model.model.multi_modal_projector
  proj.act = ACT2FN["linear"]
  with torch.no_grad():
    proj.linear_2.weight.copy_(torch.eye(proj.linear_2.weight.shape[0]))
    proj.linear_2.bias.zero_()


def llava_config_from_hf_model(model, projector_type: str = "mlp2x_gelu", **runtime):
  """Our LlavaConfig for a transformers Llava model (the test-side twin of the checkpoint loader's parser)."""
  from llava_jax.config import LlavaConfig, RuntimeOptions, text_config_from_hf, vision_config_from_hf
  c = model.config
  return LlavaConfig(
      vision=vision_config_from_hf(c.vision_config.to_dict()), text=text_config_from_hf(c.text_config.to_dict()),
      projector_type=projector_type, projector_bias=c.multimodal_projector_bias,
      image_token_index=c.image_token_index, vision_feature_layer=c.vision_feature_layer,
      vision_feature_select_strategy=c.vision_feature_select_strategy, runtime=RuntimeOptions(**runtime))


def llava_params_from_hf_model(model, config, dtype="float32"):
  """Params from a transformers Llava model's in-memory state dict, via our key tables."""
  from llava_jax.checkpoints.clip_keys import clip_key_specs
  from llava_jax.checkpoints.llama_keys import llama_key_specs
  from llava_jax.checkpoints.projector_keys import projector_key_specs
  from llava_jax.checkpoints.table import params_from_tensors
  state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  specs = (clip_key_specs(config.vision, prefix="model.vision_tower.")  # transformers 5: no vision_model.
           + projector_key_specs(config, style="hf", prefix="model.multi_modal_projector.")
           + llama_key_specs(config.text, prefix="model.language_model.", lm_head_key="lm_head.weight"))
  if config.projector_type == "linear":
    specs = [s for s in specs if "linear_2" not in s.hf_key]
  return params_from_tensors(specs, state.__getitem__, config.runtime.scan_layers, dtype)
