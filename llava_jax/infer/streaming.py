"""An answer's text as its tokens arrive: stops, limits, and streamed pieces that never need taking back.

`AnswerStream` takes one row's generated token ids chunk by chunk (from `generate`'s stream callback) and
says what text may be shown so far. Decoding a prefix of the tokens is not always a prefix of decoding them
all: SentencePiece byte-fallback tokens are decoded a run at a time (`<0x20><0x92>` gives two U+FFFD where
`<0x20>` alone gave a space), a multi-byte character split over tokens decodes as U+FFFD until complete, and
clean-up rules may drop a space before punctuation. So the streamed text stops before a trailing run of
byte tokens, trailing U+FFFD, trailing whitespace and any suffix that could begin a stop string; what is
held back comes with the next piece or at the end. The answer is the decoded text of the tokens without the
stop token, cut before the first stop string (leading whitespace removed when `strip`, as chat and the server
show it; `generate` keeps it); the pieces concatenate to it. Chat, the server's engine and `generate` all use it.
"""
from __future__ import annotations

import logging
import re
from typing import Iterable, List, Optional, Sequence

logger = logging.getLogger(__name__)

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_byte_ids_cache = {}


def byte_token_ids(tokenizer) -> frozenset:
  """Ids of SentencePiece byte-fallback pieces (`<0x00>` ... `<0xFF>`) of `tokenizer` (cached per tokenizer)."""
  key = id(tokenizer)
  if key not in _byte_ids_cache:
    _byte_ids_cache[key] = frozenset(i for piece, i in tokenizer.get_vocab().items() if _BYTE_PIECE.match(piece))
  return _byte_ids_cache[key]


def stable_text(tokenizer, answer_ids: Sequence[int], stop_strings: Sequence[str], byte_ids: frozenset, *,
                strip: bool) -> str:
  """The part of the decoded answer that later tokens cannot change: stops before a trailing run of byte
  tokens, trailing U+FFFD, trailing whitespace (when `strip`, leading whitespace is removed too) and any
  suffix that could begin a stop string."""
  ids = list(answer_ids)
  end = len(ids)
  while end and ids[end - 1] in byte_ids:  # a byte run decodes as a whole: wait until it ends
    end -= 1
  text = tokenizer.decode(ids[:end], skip_special_tokens=True)
  if strip:
    text = text.lstrip()
  while text and (text[-1] == "\ufffd" or (strip and text[-1].isspace())):  # an incomplete character;
    text = text[:-1]                                                          # whitespace may merge
  hold = 0
  for s in stop_strings:
    for n in range(min(len(s) - 1, len(text)), hold, -1):
      if text.endswith(s[:n]):
        hold = n
        break
  return text[:len(text) - hold]


class AnswerStream:
  """One answer. tokenizer: a transformers tokenizer, or None (tokens and stop ids only, no text); stop_ids:
  token ids that end the answer (kept in `tokens`, not in the text); stop_strings: texts that end it (the tokens
  up to the one completing the first stop are kept); max_tokens: token limit (then finish_reason 'length');
  strip: remove the answer's leading whitespace."""

  def __init__(self, tokenizer, stop_ids: Iterable[int] = (), stop_strings: Sequence[str] = (),
               max_tokens: Optional[int] = None, *, strip: bool = True):
    self.tokenizer = tokenizer
    self.stop_ids = frozenset(int(t) for t in stop_ids)
    self.stop_strings = tuple(s for s in stop_strings if s) if tokenizer is not None else ()
    self.max_tokens = max_tokens
    self.strip = bool(strip)
    self.byte_ids = byte_token_ids(tokenizer) if tokenizer is not None else frozenset()
    self.tokens: List[int] = []
    self.finish_reason: Optional[str] = None  # 'stop' | 'length' once finished
    self.sent = ""  # text handed out so far

  @property
  def finished(self) -> bool:
    return self.finish_reason is not None

  @property
  def text(self) -> str:
    """The answer so far (final once finished): the concatenation of every piece returned."""
    return self.sent

  def _decode(self, ids) -> str:
    text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
    return text.lstrip() if self.strip else text

  def _answer_ids(self, ids):
    return ids[:-1] if ids and ids[-1] in self.stop_ids else ids

  def _first_stop(self, text: str) -> int:
    hits = [text.find(s) for s in self.stop_strings if s in text]
    return min(hits) if hits else -1

  def add(self, token_ids: Iterable[int]) -> str:
    """Append generated ids (those after a stop or past the limit are ignored) → the new text to show."""
    if self.finished:
      return ""
    start = len(self.tokens)
    for tok in token_ids:
      if self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
        break
      self.tokens.append(int(tok))
      if int(tok) in self.stop_ids:
        self.finish_reason = "stop"
        break
    if not self.finished and self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
      self.finish_reason = "length"
    if self.tokenizer is None:
      return ""
    text = self._decode(self._answer_ids(self.tokens))
    cut = self._first_stop(text)
    if cut >= 0:
      for k in range(max(start, 1), len(self.tokens) + 1):  # the first token completing a stop string
        text_k = self._decode(self._answer_ids(self.tokens[:k]))
        cut_k = self._first_stop(text_k)
        if cut_k >= 0:
          self.tokens, text, cut = self.tokens[:k], text_k, cut_k
          break
      self.finish_reason = "stop"
      text = text[:cut]
    if self.finished:
      return self._take(text, final=True)
    return self._take(self._stable_text(), final=False)

  def finish(self) -> str:
    """End the answer here (generation ended without a stop: 'length') → the last text to show."""
    if self.finished:
      return ""
    self.finish_reason = "length"
    if self.tokenizer is None:
      return ""
    return self._take(self._decode(self._answer_ids(self.tokens)), final=True)

  def _stable_text(self) -> str:
    return stable_text(self.tokenizer, self._answer_ids(self.tokens), self.stop_strings, self.byte_ids,
                       strip=self.strip)

  def _take(self, visible: str, final: bool) -> str:
    if visible.startswith(self.sent):
      piece = visible[len(self.sent):]
    else:  # not expected after the hold-backs above; keep what was shown (the answer is what was streamed)
      if final:
        logger.warning("decoded answer %r does not extend the streamed text %r; keeping the streamed text",
                       visible, self.sent)
      piece = ""
    self.sent += piece
    return piece
