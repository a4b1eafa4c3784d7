"""Tokenizers: load the language model's (transformers), or train a small LLaMA-style one for the demo.

A trained tokenizer follows LLaMA's conventions (SentencePiece BPE with byte fallback; unk 0, bos 1, eos 2;
BOS added, no EOS) and is wrapped by transformers' LlamaTokenizer, so the data path treats it exactly like
a real Vicuna tokenizer.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

from llava_jax.errors import MissingFileError


def load_tokenizer(path: str, *, add_bos_token: bool = True):
  """transformers tokenizer from a local directory (tokenizer.json / tokenizer.model / config files).

  LLaVA's LLaMA tokenizers pad with unk (id 0) and pad on the right; a tokenizer without a pad token gets
  unk as pad, as the reference sets it for v1 templates.
  """
  if not os.path.isdir(path):
    raise MissingFileError(f"tokenizer directory {path!r} does not exist")
  cls = _tokenizer_class(path)
  tok = cls.from_pretrained(path, add_bos_token=add_bos_token, padding_side="right")
  if tok.pad_token is None and tok.unk_token is not None:
    tok.pad_token = tok.unk_token
  return tok


def _tokenizer_class(path: str):
  """LlamaTokenizer for LLaMA/Vicuna tokenizers, else the generic fast tokenizer.

  (transformers' AutoTokenizer would import torch when it is installed; the runtime never needs it.)
  """
  import json
  from transformers import LlamaTokenizer, PreTrainedTokenizerFast
  cfg_path = os.path.join(path, "tokenizer_config.json")
  name = ""
  if os.path.exists(cfg_path):
    with open(cfg_path, encoding="utf-8") as f:
      name = json.load(f).get("tokenizer_class") or ""
  if "llama" in name.lower() and "llama3" not in name.lower():
    return LlamaTokenizer
  if not name and os.path.exists(os.path.join(path, "tokenizer.model")):
    return LlamaTokenizer
  return PreTrainedTokenizerFast


def train_tokenizer(texts: Iterable[str], out_dir: str, *, vocab_size: int,
                    extra_symbols: Optional[Iterable[str]] = None):
  """Train a SentencePiece BPE model on `texts` into `out_dir` and return it as a LlamaTokenizer.

  vocab_size: number of pieces (the model's embedding may be larger, e.g. + 1 row for the image placeholder).
  """
  import sentencepiece as spm
  from transformers import LlamaTokenizer
  os.makedirs(out_dir, exist_ok=True)
  prefix = os.path.join(out_dir, "tokenizer")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(texts)), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
      byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      user_defined_symbols=list(extra_symbols or []), hard_vocab_limit=False, minloglevel=2)
  tok = LlamaTokenizer.from_pretrained(out_dir, add_bos_token=True, padding_side="right")
  tok.pad_token = tok.unk_token
  tok.save_pretrained(out_dir)
  return tok
