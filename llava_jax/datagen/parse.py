"""Teacher replies → LLaVA conversations, and the checks a generated sample must pass.

Parsing (formats in `datagen.prompts`): conversation / complex replies are split into blocks at lines holding
only '===' (surrounding blank lines and spaces ignored); each block starts with 'Question:' or 'Answer:'
(the text may follow on the same line); blocks must alternate question, answer, ... and end with an answer.
A detail reply is the description. `ReplyError(reason, message)` says why a reply is unusable.

Validation (`check_record`): the record is a LLaVA sample `{"id", "image", "conversations"}` whose turns pass
`data.conversation.normalize_turns` (roles alternate human, gpt, ...; start with human, end with gpt; no empty
turn; no `<image>` in an answer), with exactly one `<image>`, in the first human turn, at its start
('<image>\\n...') or end ('...\\n<image>'), and no answer that talks about the hidden context (captions,
bounding boxes, coordinates), which the paper's prompt forbids.
"""
from __future__ import annotations

import hashlib
import re
from typing import List, Optional, Sequence, Tuple

from llava_jax.data import conversation as conv_lib
from llava_jax.data.errors import SampleError

_SEPARATOR = re.compile(r"^\s*===+\s*$", re.MULTILINE)
_HEADER = re.compile(r"^\s*(Question|Answer)\s*:\s*", re.IGNORECASE)
_INNER_HEADER = re.compile(r"^\s*(Question|Answer)\s*:", re.IGNORECASE | re.MULTILINE)
LEAK_PATTERNS = (r"\bcaptions?\b", r"\bbounding box", r"\bcoordinates?\b", r"\bdescriptions? (provided|given)\b")


class ReplyError(ValueError):
  """A reply that cannot become a sample; `reason` is a short code counted in the summary."""

  def __init__(self, reason: str, message: str):
    super().__init__(f"[{reason}] {message}")
    self.reason = reason


def parse_qa(reply: str) -> List[Tuple[str, str]]:
  """'Question:/===/Answer:' blocks → [(question, answer), ...] (see the module docstring)."""
  if not isinstance(reply, str) or not reply.strip():
    raise ReplyError("empty_reply", "the reply is empty")
  blocks = [b.strip() for b in _SEPARATOR.split(reply) if b.strip()]
  turns = []
  for i, block in enumerate(blocks):
    m = _HEADER.match(block)
    if not m:
      raise ReplyError("bad_format", f"block {i + 1} does not start with 'Question:' or 'Answer:': {block[:60]!r}")
    kind = m.group(1).lower()
    text = block[m.end():].strip()
    if _INNER_HEADER.search(text):
      raise ReplyError("bad_format", f"block {i + 1} holds several 'Question:'/'Answer:' headers without '==='")
    if not text:
      raise ReplyError("empty_turn", f"block {i + 1} ({kind}) is empty")
    expected = "question" if i % 2 == 0 else "answer"
    if kind != expected:
      raise ReplyError("bad_order", f"block {i + 1} is an {kind}, expected a {expected}")
    turns.append(text)
  if not turns:
    raise ReplyError("bad_format", "no 'Question:' / 'Answer:' blocks")
  if len(turns) % 2:
    raise ReplyError("unanswered_question", "the last question has no answer")
  return [(turns[i], turns[i + 1]) for i in range(0, len(turns), 2)]


def _pick(key: str, n: int) -> int:
  """A stable choice in range(n) from a string (same key, same choice, on every run and machine)."""
  return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % n


def place_image(question: str, position: str, key: str) -> str:
  """The first question with `<image>` at its start ('front'), end ('end') or either, chosen stably per key
  ('random', as LLaVA-Instruct-158K mixes both)."""
  if position == "random":
    position = ("front", "end")[_pick("image:" + key, 2)]
  if position == "front":
    return conv_lib.IMAGE_TOKEN + "\n" + question
  if position == "end":
    return question + "\n" + conv_lib.IMAGE_TOKEN
  raise ValueError(f"image position {position!r}; choose front, end or random")


def reply_to_conversations(kind: str, reply: str, key: str, *, image_position: str = "random",
                           detail_instructions: Sequence[str] = ()) -> List[dict]:
  """A teacher reply for response type `kind` → LLaVA turns [{"from": "human"|"gpt", "value"}, ...]."""
  if kind == "detail":
    text = reply.strip() if isinstance(reply, str) else ""
    if not text:
      raise ReplyError("empty_reply", "the description is empty")
    if _HEADER.match(text):
      raise ReplyError("bad_format", "a description was expected, got 'Question:'/'Answer:' blocks")
    if not detail_instructions:
      from llava_jax.datagen.prompts import DETAIL_INSTRUCTIONS
      detail_instructions = DETAIL_INSTRUCTIONS
    question = detail_instructions[_pick("detail:" + key, len(detail_instructions))]
    pairs = [(question, text)]
  elif kind in ("conversation", "complex"):
    pairs = parse_qa(reply)
    if kind == "complex" and len(pairs) != 1:
      raise ReplyError("bad_format", f"complex reasoning wants one question and answer, got {len(pairs)}")
  else:
    raise ValueError(f"response type {kind!r}")
  turns = []
  for i, (q, a) in enumerate(pairs):
    if conv_lib.IMAGE_TOKEN in q or conv_lib.IMAGE_TOKEN in a:
      raise ReplyError("image_token_in_text", f"the reply itself contains {conv_lib.IMAGE_TOKEN}")
    turns.append({"from": "human", "value": place_image(q, image_position, key) if i == 0 else q})
    turns.append({"from": "gpt", "value": a})
  return turns


def check_record(record: dict, leak_patterns: Sequence[str] = LEAK_PATTERNS) -> Optional[str]:
  """None for a good generated sample, else 'reason: message' (see the module docstring)."""
  if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not record["id"]:
    return "bad_record: no string id"
  if not isinstance(record.get("image"), str) or not record["image"]:
    return "bad_record: no image path"
  turns = record.get("conversations")
  try:
    system, normalized = conv_lib.normalize_turns(turns, sample_id=record["id"])
  except SampleError as e:
    return f"malformed_conversation: {e}"
  if system is not None:
    return "malformed_conversation: generated samples carry no system turn"
  n_images = sum(t[1].count(conv_lib.IMAGE_TOKEN) for t in normalized)
  first = normalized[0][1]
  if n_images != 1 or first.count(conv_lib.IMAGE_TOKEN) != 1:
    return f"image_placement: expected exactly one {conv_lib.IMAGE_TOKEN}, in the first human turn ({n_images} found)"
  if not (first.startswith(conv_lib.IMAGE_TOKEN + "\n") or first.endswith("\n" + conv_lib.IMAGE_TOKEN)):
    return f"image_placement: {conv_lib.IMAGE_TOKEN} must open or close the first human turn"
  if not first.replace(conv_lib.IMAGE_TOKEN, "").strip():
    return "empty_question: the first human turn holds only the image"
  for role, text in normalized:
    if role == "assistant":
      for pattern in leak_patterns:
        if re.search(pattern, text, re.IGNORECASE):
          return f"mentions_context: an answer matches {pattern!r}"
  return None
