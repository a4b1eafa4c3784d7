"""LLaVA's own data format: a JSON list (or JSON Lines) of `{"id", "image"?, "conversations"}` records."""
from __future__ import annotations

import codecs
import json
import logging
import os
from typing import Any, List, Optional, Tuple

from llava_jax.data.sources.base import PackedJson, RecordOrigins, check_index, normalize_record, record_problem

log = logging.getLogger(__name__)


class LlavaJsonSource:
  """Random-access records from a LLaVA data file (`llava_instruct_150k.json`, `llava_v1_5_mix665k.json`,
  `blip_laion_cc_sbu_558k.json`, ... or a `.jsonl` with one record per line).

  json_path: `.json` (a list) or `.jsonl`; other suffixes are sniffed ('[' first = list).
  image_root: the folder "image" paths are relative to (LLaVA's `--image_folder`; mix665k paths carry a
    source prefix such as `coco/train2017/...`, `gqa/images/...`). None: paths are used as written.
  strict: raise at load, listing the bad records, instead of keeping them.

  Records are parsed once at load, checked for structure and stored packed (see base.PackedJson); images are
  not opened here. Text-only records (no "image") pass through. A structurally bad record (missing or empty
  "conversations", a turn that is not `{"from", "value"}`, an "image" that is not a path / list of paths, a
  JSONL line that is not JSON) is kept, logged once at load with the others, listed in `self.malformed`
  as `(index, id, problem)`, and yielded with its fields as found, so the encoder rejects it with
  SampleError('malformed_conversation') and the pipeline counts it.
  `origins(i)` says where record i is in the file ("data.jsonl line 13" for JSON Lines, "data.json record #12"
  for a list); the pipeline names it in skip logs and strict-mode errors.
  """

  def __init__(self, json_path: str | os.PathLike, image_root: Optional[str | os.PathLike] = None, *,
               strict: bool = False):
    self.json_path = os.fspath(json_path)
    self.image_root = None if image_root is None else os.fspath(image_root)
    name = os.path.basename(self.json_path)
    raw, line_errors, lines = _read_records(self.json_path)
    self.origins = RecordOrigins(name, lines)
    records = []
    self.malformed: List[Tuple[int, str, str]] = []
    for i, rec in enumerate(raw):
      record = normalize_record(rec, f"{name}#{i}")
      problem = line_errors.get(i) or record_problem(rec)
      if problem:
        self.malformed.append((i, record["id"], problem))
      records.append(record)
    if self.malformed:
      listing = "; ".join(f"{self.origins(i)} id={rid!r}: {p}" for i, rid, p in self.malformed[:20])
      more = f" (and {len(self.malformed) - 20} more)" if len(self.malformed) > 20 else ""
      if strict:
        raise ValueError(f"{self.json_path}: {len(self.malformed)} malformed record(s): {listing}{more}")
      log.warning("%s: %d of %d records are malformed and will be skipped as 'malformed_conversation': %s%s",
                  self.json_path, len(self.malformed), len(records), listing, more)
    self._records = PackedJson(records)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index) -> dict:
    return self._records[check_index(index, len(self._records))]

  def __repr__(self) -> str:
    return (f"LlavaJsonSource({self.json_path!r}, image_root={self.image_root!r}, records={len(self)}, "
            f"malformed={len(self.malformed)})")


def _read_records(path: str) -> Tuple[List[Any], dict, Optional[List[int]]]:
  """(records, {index: problem}, 1-based line number of each record or None for a JSON list) from a JSON list or
  JSON Lines file."""
  with open(path, "rb") as f:
    raw = f.read()
  if raw.startswith(codecs.BOM_UTF8):  # written by some editors / Windows tools
    raw = raw[len(codecs.BOM_UTF8):]
  as_list = path.endswith(".json") or (not path.endswith(".jsonl") and raw.lstrip().startswith(b"["))
  if as_list:
    try:
      data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}: not UTF-8 at byte {e.start} ({e.reason})") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}); use .jsonl for one record per line") from None
    if not isinstance(data, list):
      raise ValueError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    return data, {}, None
  records, errors, lines = [], {}, []
  # Lines end at "\n" only (JSON Lines; a "\r" before it is dropped): str.splitlines would also split at U+2028,
  # U+0085, ... which JSON strings may hold unescaped. Each line is decoded on its own, so a line that is not
  # UTF-8 is one malformed record, not a failed load.
  for lineno, line in enumerate(raw.split(b"\n"), start=1):
    if not line.strip():
      continue
    lines.append(lineno)
    try:
      records.append(json.loads(line.decode("utf-8")))
    except UnicodeDecodeError as e:
      errors[len(records)] = f"line {lineno} is not UTF-8 at byte {e.start} ({e.reason})"
      records.append(None)
    except json.JSONDecodeError as e:
      errors[len(records)] = f"line {lineno} is not valid JSON ({e})"
      records.append(None)
  return records, errors, lines
