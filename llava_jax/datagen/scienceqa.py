"""ScienceQA raw release → a LLaVA JSON file (what LLaVA's scripts/convert_sqa_to_llava.py writes).

  python -m llava_jax.datagen.scienceqa --root=DIR --split=train --format=QCM-LEA --out=llava_train_QCM-LEA.json

Formats (data/sources/scienceqa.py renders them): 'QCM-LEA' (the paper's best: lecture and explanation, then
"The answer is X."), 'QCM-ALE' (the paper's answer-first ablation: "The answer is X. BECAUSE: lecture
explanation"), 'QCM-A' (answer only), 'CQM-A' (v1.5's evaluation questions), ...
Records are {"id", "image"?, "conversations"}; image paths are relative to <root>/images (set
data.image_root to it), so `--config.data.source=llava_json` trains on the file as on any LLaVA data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from llava_jax.data.sources.scienceqa import ScienceQASource

REASONING_FIRST = "QCM-LEA"
ANSWER_FIRST = "QCM-ALE"


def write_llava_json(root: str, split: str, out_path: str, prompt_format: str = REASONING_FIRST, *,
                     keep_meta: bool = False) -> int:
  """Convert one split and write it as a JSON list; returns the number of records. keep_meta: also write
  each record's "meta" (answer letter, subject, grade, context flags; ignored by training)."""
  source = ScienceQASource(root, split, prompt_format=prompt_format)
  records = []
  for i in range(len(source)):
    rec = source[i]
    out = {"id": rec["id"]}
    if "image" in rec:
      out["image"] = rec["image"]
    out["conversations"] = rec["conversations"]
    if keep_meta:
      out["meta"] = rec["meta"]
    records.append(out)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
  tmp = out_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(records, f, ensure_ascii=False, indent=1)
  os.replace(tmp, out_path)
  return len(records)


def main(argv: Optional[list] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m llava_jax.datagen.scienceqa",
                              description="Convert the ScienceQA release to LLaVA JSON.")
  p.add_argument("--root", required=True, help="folder with problems.json, pid_splits.json, images/")
  p.add_argument("--split", default="train")
  p.add_argument("--format", default=REASONING_FIRST,
                 help=f"INPUT-OUTPUT prompt format ({REASONING_FIRST} reasoning first, {ANSWER_FIRST} answer first)")
  p.add_argument("--out", required=True, help="output .json")
  p.add_argument("--keep_meta", action="store_true")
  args = p.parse_args(argv)
  n = write_llava_json(args.root, args.split, args.out, args.format, keep_meta=args.keep_meta)
  print(f"{n} records -> {args.out} (images relative to {os.path.join(args.root, 'images')})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
