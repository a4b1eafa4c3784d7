"""Helpers shared by the sources: structural record checks and a compact record store."""
from __future__ import annotations

import json
import operator
import os
from typing import Any, Iterable, List, Optional

import numpy as np


def record_problem(record: Any) -> Optional[str]:
  """A one-line description of what is structurally wrong with a raw record, or None if it looks usable.

  Only the shape is checked (dict, a non-empty list of dict turns, string values, 'image' a path or a list of
  paths); roles, alternation and placeholders are the encoder's business (data/conversation.py).
  """
  if not isinstance(record, dict):
    return f"record is a {type(record).__name__}, expected an object"
  conversations = record.get("conversations")
  if conversations is None:
    return "no 'conversations'"
  if not isinstance(conversations, list):
    return f"'conversations' is a {type(conversations).__name__}, expected a list"
  if not conversations:
    return "'conversations' is empty"
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict):
      return f"turn {i} is a {type(turn).__name__}, expected an object"
    if not isinstance(turn.get("from", turn.get("role")), str):
      return f"turn {i} has no string 'from'"
    if not isinstance(turn.get("value", turn.get("content")), str):
      return f"turn {i} has no string 'value'"
  image = record.get("image")
  if image is not None:
    paths = image if isinstance(image, list) else [image]
    problems = [image_path_problem(p) for p in paths]
    if not isinstance(image, (str, list)) or any(problems):
      detail = next((p for p in problems if p), f"got {image!r:.80}")
      return f"'image' must be a path or a list of paths: {detail}"
  return None


def image_path_problem(path) -> Optional[str]:
  """Why `path` (a record's "image" entry) can never name a file, or None: it must be a non-empty str (or
  os.PathLike) without NUL bytes that the file system encoding can encode."""
  if isinstance(path, os.PathLike):
    path = os.fspath(path)
  if not isinstance(path, str):
    return f"an image path must be a string, got {type(path).__name__}"
  if not path:
    return "an image path is empty"
  if "\0" in path:
    return f"image path {path[:100]!r} contains a NUL byte"
  try:
    os.fsencode(path)
  except UnicodeError as e:
    return f"image path {path[:100]!r} cannot be encoded as a file name: {e}"
  return None


def normalize_record(record: Any, fallback_id: str) -> dict:
  """The common record form of a raw JSON record: a str "id" (fallback_id when missing), "conversations"
  as given (None when missing: the encoder then rejects it as 'malformed_conversation'), "image" when
  present and not null, other keys kept."""
  if not isinstance(record, dict):
    return {"id": fallback_id, "conversations": None}
  out = dict(record)
  rid = out.get("id")
  out["id"] = fallback_id if rid is None or rid == "" else str(rid)
  out.setdefault("conversations", None)
  if out.get("image", 0) is None:
    del out["image"]
  return out


def check_index(index, length: int) -> int:
  """Python sequence indexing (negative counts from the end); IndexError outside [-length, length)."""
  i = operator.index(index)
  if i < 0:
    i += length
  if not 0 <= i < length:
    raise IndexError(f"index {index} out of range for a source of {length} records")
  return i


class RecordOrigins:
  """Where each record of a file-backed source is: `origins(i)` → "name line N" (1-based line numbers given, e.g.
  JSON Lines) or "name record #i". Small and picklable (int32 line numbers), so the pipeline can ship it to its
  workers without the records."""

  def __init__(self, name: str, lines: Optional[Iterable[int]] = None):
    self.name = name
    self.lines = None if lines is None else np.asarray(list(lines), np.int32)

  def __call__(self, index: int) -> str:
    if self.lines is None:
      return f"{self.name} record #{index}"
    return f"{self.name} line {int(self.lines[index])}"


class PackedJson:
  """Records stored as one UTF-8 JSON buffer plus int64 offsets.

  Hundreds of thousands of small Python dicts cost several times their JSON size and, in forked data workers,
  are copied page by page as reference counts change; one bytes object and one array are neither. Records are
  decoded on access. Pickles as two buffers (cheap to send to worker processes).
  """

  def __init__(self, records: Iterable[Any]):
    chunks: List[bytes] = []
    offsets = [0]
    for record in records:
      chunk = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
      chunks.append(chunk)
      offsets.append(offsets[-1] + len(chunk))
    self._buffer = b"".join(chunks)
    self._offsets = np.asarray(offsets, np.int64)

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, i: int) -> Any:
    return json.loads(self._buffer[self._offsets[i]:self._offsets[i + 1]])

  @property
  def nbytes(self) -> int:
    return len(self._buffer) + self._offsets.nbytes
