"""Tokenizers: load the language model's (transformers), train a small LLaMA-style one for the demo, and
encode text exactly as SentencePiece does.

A trained tokenizer follows LLaMA's conventions (SentencePiece BPE with byte fallback, identity normalization,
no whitespace collapsing, split digits; unk 0, bos 1, eos 2; BOS added, no EOS) and is wrapped by transformers'
LlamaTokenizer, so the data path treats it exactly like a real Vicuna tokenizer.

Directories may be local or etils.epath URLs (gs://bucket/run/tokenizer): transformers reads and writes local
files, so a URL directory is copied through a local temporary directory.

Why `encode_with_offsets` does not just call the transformers tokenizer: transformers 5's LlamaTokenizer
pre-tokenizes with `Metaspace(prepend_scheme='first')`, which skips SentencePiece's dummy-prefix `▁` when the text
already starts with a space (`" ASSISTANT"` → `['▁ASSISTANT']`, SentencePiece: `['▁', '▁ASSISTANT']`) and adds
none after a special token (`"</s>USER"` → `'US'`, SentencePiece on the piece: `'▁US'`). The reference trained and
evaluated with transformers' slow (SentencePiece) LlamaTokenizer in its legacy mode (LLaVA pins transformers
4.31, `use_fast=False`): split the text at special / added tokens, `sp_model.encode` each piece on its own. LLaMA /
Vicuna / LLaVA checkpoints saw those ids, so that is the rule here for every SentencePiece-style tokenizer: with
its tokenizer.model, SentencePiece itself; with only a tokenizer.json (Metaspace + BPE, as transformers 5 saves
it), that BPE model applied the SentencePiece way.
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import shutil
import tempfile
from typing import Iterable, List, Optional, Tuple

import numpy as np
from etils import epath

from llava_jax.errors import MissingFileError
from llava_jax.paths import is_url

logger = logging.getLogger(__name__)
_WARNED = set()


def _local_dir(path) -> str:
  """A local directory holding the files of `path`: itself when local; for a URL a copy that lives as long as
  the process, because the loaded tokenizer keeps reading it (`encode_with_offsets` encodes with its
  `tokenizer.model`)."""
  if not is_url(path):
    return os.fspath(path)
  tmp = _process_scratch_dir()
  _copy_files(epath.Path(path), epath.Path(tmp))
  return tmp


def _process_scratch_dir() -> str:
  """A new local temporary directory removed when the process exits."""
  tmp = tempfile.mkdtemp(prefix="llava_jax_tokenizer_")
  atexit.register(shutil.rmtree, tmp, ignore_errors=True)
  return tmp


def _copy_files(src: epath.Path, dst: epath.Path) -> None:
  dst.mkdir(parents=True, exist_ok=True)
  for f in src.iterdir():
    if f.is_file():
      (dst / f.name).write_bytes(f.read_bytes())


def load_tokenizer(path, *, add_bos_token: bool = True):
  """transformers tokenizer from a directory, local or URL (tokenizer.json / tokenizer.model / config files).

  LLaVA's LLaMA tokenizers pad with unk (id 0) and pad on the right; a tokenizer without a pad token gets
  unk as pad, as the reference sets it for v1 templates.
  """
  if not epath.Path(path).is_dir():
    raise MissingFileError(f"tokenizer directory {os.fspath(path)!r} does not exist")
  return _load_local(_local_dir(path), add_bos_token)


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
  if is_url(out_dir):  # trained locally (the returned tokenizer reads its files), then copied to the URL
    tmp = _process_scratch_dir()
    tok = _train_local(texts, tmp, vocab_size, extra_symbols)
    _copy_files(epath.Path(tmp), epath.Path(out_dir))
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
      # LLaMA's normalizer spec: text is kept as is (no NFKC, spaces not collapsed or stripped), digits split.
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
      allow_whitespace_only_pieces=True, user_defined_symbols=list(extra_symbols or []), hard_vocab_limit=False,
      minloglevel=2)
  tok = LlamaTokenizer.from_pretrained(out_dir, add_bos_token=True, padding_side="right")
  tok.pad_token = tok.unk_token
  tok.save_pretrained(out_dir)
  return tok


# ----------------------------------------------------------------------------------------------- encoding

@functools.lru_cache(maxsize=8)
def _load_sentencepiece(path: str):
  import sentencepiece as spm
  return spm.SentencePieceProcessor(model_file=path)


def sentencepiece_model(tokenizer):
  """The SentencePiece processor behind a LLaMA-style transformers tokenizer (its `vocab_file`, a
  `tokenizer.model`), or None when it has none (a tokenizer.json-only directory, LLaMA-3's BPE, ...)."""
  path = getattr(tokenizer, "vocab_file", None)
  if not isinstance(path, str) or not path.endswith(".model") or not os.path.isfile(path):
    return None
  sp = _load_sentencepiece(os.path.abspath(path))
  for name, sp_id in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())):
    tid = getattr(tokenizer, f"{name}_token_id", None)
    if sp_id >= 0 and tid is not None and tid != sp_id:
      raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: its {name} id {tid} differs from its "
                       f"SentencePiece model's ({sp_id}, {path}); the vocabularies do not match")
  return sp


def _added_token_pattern(tokenizer) -> Optional[re.Pattern]:
  """Regex matching the tokenizer's special and added tokens ('<s>', '</s>', '<image>', '<|im_end|>', ...),
  longest first, or None when it has none."""
  tokens = sorted((t for t in tokenizer.added_tokens_encoder if t), key=len, reverse=True)
  return re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None


def _char_spans(text: str, byte_spans, shift: int = 0) -> List[Tuple[int, int]]:
  """UTF-8 byte spans into `text` → character spans, minus `shift` characters (clipped at 0)."""
  char_starts = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])  # byte offset of each char, then the end
  out = []
  for begin, end in byte_spans:
    b = int(np.searchsorted(char_starts, begin, side="right")) - 1
    e = max(b, int(np.searchsorted(char_starts, end, side="left")))
    out.append((max(b - shift, 0), max(e - shift, 0)))
  return out


def _sentencepiece_encoder(sp):
  """piece → (`sp.encode(piece)` ids, their character spans in the piece; SentencePiece reports byte spans)."""
  def encode(piece: str):
    proto = sp.encode(piece, return_type="proto")
    return [int(p.id) for p in proto.pieces], _char_spans(piece, [(p.begin, p.end) for p in proto.pieces])
  return encode


def _metaspace_bpe_encoder(tokenizer):
  """For a LLaMA tokenizer known only by its tokenizer.json (transformers 5 saves no tokenizer.model): its BPE
  model applied to `'▁' + piece.replace(' ', '▁')`, which is SentencePiece's own encoding of the piece (dummy
  prefix included, whatever the piece starts with), or None when the tokenizer is not of that kind."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None or backend.normalizer is not None:
    return None
  pre, model = backend.pre_tokenizer, backend.model
  if type(pre).__name__ != "Metaspace" or type(model).__name__ != "BPE" or getattr(pre, "split", True):
    return None
  rep, prefix = pre.replacement, (pre.replacement if pre.prepend_scheme != "never" else "")

  def encode(piece: str):
    text = prefix + piece.replace(" ", rep)
    toks = model.tokenize(text)
    return [int(t.id) for t in toks], _char_spans(text, [t.offsets for t in toks], shift=len(prefix))
  return encode


def _piece_encoder(tokenizer):
  """piece → (ids, char spans) as SentencePiece encodes it, or None when the tokenizer is not SentencePiece-like."""
  sp = sentencepiece_model(tokenizer)
  if sp is not None:
    return _sentencepiece_encoder(sp)
  encoder = _metaspace_bpe_encoder(tokenizer)
  if encoder is None and "llama" in type(tokenizer).__name__.lower() and type(tokenizer).__name__ not in _WARNED:
    _WARNED.add(type(tokenizer).__name__)
    logger.warning("%s %r has neither a SentencePiece tokenizer.model nor a Metaspace BPE tokenizer.json: using "
                   "its transformers encoding, whose ids may differ from LLaMA's where a piece starts with a space",
                   type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""))
  return encoder


def encode_with_offsets(tokenizer, text: str, *, add_special_tokens: bool = True) -> Tuple[List[int], np.ndarray]:
  """`text` → (ids [n], character offsets int64 [n, 2]) as LLaMA's SentencePiece tokenizer encodes it.

  BOS (if the tokenizer adds one), then the text split at special / added tokens, each of those one id and every
  other piece encoded on its own as SentencePiece does (with its dummy-prefix `▁`; see module doc) — by the
  tokenizer's `tokenizer.model`, else by its tokenizer.json's BPE model applied the SentencePiece way — then EOS
  (if the tokenizer adds one). Other tokenizers (LLaMA-3, ChatML BPE): their transformers ids and offset mapping.
  Special tokens added by the tokenizer get the zero-width span of where they sit.
  """
  encode_piece = _piece_encoder(tokenizer)
  if encode_piece is None:
    return _hf_encode_with_offsets(tokenizer, text, add_special_tokens)
  ids: List[int] = []
  spans: List[Tuple[int, int]] = []
  if add_special_tokens and getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
    ids.append(int(tokenizer.bos_token_id))
    spans.append((0, 0))
  pattern, pos = _added_token_pattern(tokenizer), 0
  matches = list(pattern.finditer(text)) if pattern is not None else []
  for m in matches + [None]:
    end = m.start() if m is not None else len(text)
    if end > pos:
      piece_ids, piece_spans = encode_piece(text[pos:end])
      ids += piece_ids
      spans += [(pos + b, pos + e) for b, e in piece_spans]
    if m is not None:
      ids.append(int(tokenizer.added_tokens_encoder[m.group()]))
      spans.append((m.start(), m.end()))
      pos = m.end()
  if add_special_tokens and getattr(tokenizer, "add_eos_token", False) and tokenizer.eos_token_id is not None:
    ids.append(int(tokenizer.eos_token_id))
    spans.append((len(text), len(text)))
  return ids, np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def _hf_encode_with_offsets(tokenizer, text: str, add_special_tokens: bool) -> Tuple[List[int], np.ndarray]:
  try:
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
  except NotImplementedError as e:  # slow (python) tokenizers have no offsets
    raise TypeError("encoding needs a SentencePiece model or a tokenizer with an offset mapping (a "
                    f"tokenizers-backed 'fast' HF tokenizer); got {type(tokenizer).__name__}") from e
  ids = [int(i) for i in enc["input_ids"]]
  offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
  if len(ids) != offsets.shape[0]:
    raise ValueError("tokenizer returned offsets that do not match its ids")
  return ids, offsets


def encode_text(tokenizer, text: str, *, add_special_tokens: bool = True) -> List[int]:
  """Token ids of `text` by the rule of `encode_with_offsets` (use this, not `tokenizer(text)`, for LLaMA ids)."""
  return encode_with_offsets(tokenizer, text, add_special_tokens=add_special_tokens)[0]
