"""Tokenizers: load the language model's (transformers), or train a small LLaMA-style one for the demo.

A trained tokenizer follows LLaMA's conventions (SentencePiece BPE with byte fallback; unk 0, bos 1, eos 2;
BOS added, no EOS) and is wrapped by transformers' LlamaTokenizer, so the data path treats it exactly like
a real Vicuna tokenizer.

Directories may be local or etils.epath URLs (gs://bucket/run/tokenizer): transformers reads and writes local
files, so a URL directory is copied through a local temporary directory.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterable, Iterator, Optional

from etils import epath

from llava_jax.errors import MissingFileError


def _is_url(path) -> bool:
  return "://" in os.fspath(path)


@contextlib.contextmanager
def _local_copy(path) -> Iterator[str]:
  """A local directory holding the files of `path` (itself when local)."""
  if not _is_url(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix="llava_jax_tokenizer_") as tmp:
    for f in epath.Path(path).iterdir():
      if f.is_file():
        (epath.Path(tmp) / f.name).write_bytes(f.read_bytes())
    yield tmp


def load_tokenizer(path, *, add_bos_token: bool = True):
  """transformers tokenizer from a directory, local or URL (tokenizer.json / tokenizer.model / config files).

  LLaVA's LLaMA tokenizers pad with unk (id 0) and pad on the right; a tokenizer without a pad token gets
  unk as pad, as the reference sets it for v1 templates.
  """
  if not epath.Path(path).is_dir():
    raise MissingFileError(f"tokenizer directory {os.fspath(path)!r} does not exist")
  with _local_copy(path) as local:
    return _load_local(local, add_bos_token)


def _load_local(path: str, add_bos_token: bool):
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


def train_tokenizer(texts: Iterable[str], out_dir, *, vocab_size: int,
                    extra_symbols: Optional[Iterable[str]] = None):
  """Train a SentencePiece BPE model on `texts` into `out_dir` (local or URL) and return it as a LlamaTokenizer.

  vocab_size: number of pieces (the model's embedding may be larger, e.g. + 1 row for the image placeholder).
  """
  if _is_url(out_dir):
    with tempfile.TemporaryDirectory(prefix="llava_jax_tokenizer_") as tmp:
      tok = _train_local(texts, tmp, vocab_size, extra_symbols)
      out = epath.Path(out_dir)
      out.mkdir(parents=True, exist_ok=True)
      for f in epath.Path(tmp).iterdir():
        (out / f.name).write_bytes(f.read_bytes())
      return tok
  return _train_local(texts, os.fspath(out_dir), vocab_size, extra_symbols)


def _train_local(texts, out_dir: str, vocab_size: int, extra_symbols):
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
