"""The JSON-lines results files of the plan tables (scale/table.py, scale/finetune_table.py): one compiled row per
line, appended as it is measured, so an interrupted run resumes where it stopped. They live in the repository's
docs/ (`DOCS`), beside the tables they render into."""
from __future__ import annotations

import json
import os
from typing import List

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs")


def read_rows(path: str) -> List[dict]:
  """The rows of a results file ([] when it does not exist yet)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def append_row(path: str, row: dict) -> dict:
  """Stamp `row` with the jax / libtpu versions that compiled it and append it to the results file `path`."""
  import jax
  from llava_jax.scale import tpu
  row.update(jax=jax.__version__, libtpu=tpu.libtpu_version())
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
  return row
