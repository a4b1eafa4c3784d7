"""GPT-assisted instruction data (the paper's section 3): COCO contexts → teacher replies → LLaVA JSON.

For each image and response type one request (`prompts.build_messages`) goes to an OpenAI-compatible
endpoint; replies are kept in out_dir/replies.jsonl as they arrive (a rerun asks only for what is missing, or
for requests whose prompt or model changed). Every run then rebuilds, from all replies on disk:
  out_dir/llava_instruct.json   the accepted samples, a JSON list of {"id", "image", "conversations"} (the
                                format data.source='llava_json' reads; image paths are image_prefix +
                                the COCO file name, relative to data.image_root)
  out_dir/rejected.jsonl        {"id", "type", "reason", "reply"} for replies that failed parsing or checks
  out_dir/summary.json          counts per type, rejections per reason, token usage and cost
Sample ids are '<file stem>-<type>' (unique across types; LLaVA-Instruct repeats the stem).
"""
from __future__ import annotations

import collections
import json
import os
from typing import Callable, Dict, Optional, Sequence

from llava_jax.datagen import parse, prompts
from llava_jax.datagen.coco import ImageContext
from llava_jax import openai_client

DATASET_FILE = "llava_instruct.json"
REPLIES_FILE = "replies.jsonl"
REJECTED_FILE = "rejected.jsonl"
SUMMARY_FILE = "summary.json"


def sample_id(image: ImageContext, kind: str) -> str:
  return f"{image.stem}-{kind}"


def build_samples(images: Sequence[ImageContext], replies: Dict[str, dict], *, types: Sequence[str],
                  image_prefix: str = "", image_position: str = "random", leak_patterns=parse.LEAK_PATTERNS):
  """(accepted samples in image × type order, rejected [{"id", "type", "reason", "reply"}]) from replies
  {sample id: reply record with "content" and "finish_reason"}; images without a reply are left out."""
  accepted, rejected = [], []
  for image in images:
    for kind in types:
      key = sample_id(image, kind)
      rec = replies.get(key)
      if rec is None:
        continue
      reply = rec.get("content", "")
      try:
        if rec.get("finish_reason") == "length":
          raise parse.ReplyError("truncated", "the reply hit the token limit")
        turns = parse.reply_to_conversations(kind, reply, key, image_position=image_position)
        sample = {"id": key, "image": image_prefix + image.file_name, "conversations": turns}
        problem = parse.check_record(sample, leak_patterns)
        if problem:
          raise parse.ReplyError(problem.split(":", 1)[0], problem.split(":", 1)[1].strip())
        accepted.append(sample)
      except parse.ReplyError as e:
        rejected.append({"id": key, "type": kind, "reason": e.reason, "message": str(e), "reply": reply})
  return accepted, rejected


def generate_dataset(images: Sequence[ImageContext], client: openai_client.ChatClient, out_dir: str, *,
                     types: Sequence[str] = prompts.TYPES, image_prefix: str = "", image_position: str = "random",
                     with_boxes: bool = True, temperature: float = 0.7, max_tokens: int = 1024,
                     price_prompt_per_1m: float = 0.0, price_completion_per_1m: float = 0.0,
                     print_fn: Optional[Callable[[str], None]] = print) -> dict:
  """Ask the teacher for every (image, type), then write the data set, rejections and summary; returns the
  summary (see the module docstring)."""
  for kind in types:
    if kind not in prompts.TYPES:
      raise ValueError(f"response type {kind!r}; choose from {prompts.TYPES}")
  if not images:
    raise ValueError("no images to generate data for")
  os.makedirs(out_dir, exist_ok=True)
  jobs = []
  for image in images:
    context = image.text(with_boxes=with_boxes)
    for kind in types:
      jobs.append(openai_client.Job(sample_id(image, kind), prompts.build_messages(kind, context),
                                    {"image_id": image.image_id, "file_name": image.file_name, "type": kind}))
  replies, failures = openai_client.run_resumable(client, jobs, os.path.join(out_dir, REPLIES_FILE), key_field="id",
                                                  print_fn=print_fn, temperature=temperature,
                                                  max_tokens=max_tokens)
  accepted, rejected = build_samples(images, replies, types=types, image_prefix=image_prefix,
                                     image_position=image_position)
  _write_json(os.path.join(out_dir, DATASET_FILE), accepted)
  with open(os.path.join(out_dir, REJECTED_FILE), "w", encoding="utf-8") as f:
    for r in rejected:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")

  per_type = {k: {"requested": 0, "replied": 0, "accepted": 0, "rejected": 0, "turns": 0} for k in types}
  for job in jobs:
    per_type[job.record["type"]]["requested"] += 1
    per_type[job.record["type"]]["replied"] += job.key in replies
  for s in accepted:
    kind = s["id"].rsplit("-", 1)[1]
    per_type[kind]["accepted"] += 1
    per_type[kind]["turns"] += len(s["conversations"]) // 2
  reasons = collections.Counter()
  for r in rejected:
    per_type[r["type"]]["rejected"] += 1
    reasons[r["reason"]] += 1
  dataset_tokens = {"prompt_tokens": 0, "completion_tokens": 0, "replies_without_usage": 0}
  for rec in replies.values():
    usage = rec.get("usage") or {}
    if usage.get("prompt_tokens") is None and usage.get("completion_tokens") is None:
      dataset_tokens["replies_without_usage"] += 1
    dataset_tokens["prompt_tokens"] += usage.get("prompt_tokens") or 0
    dataset_tokens["completion_tokens"] += usage.get("completion_tokens") or 0
  dataset_tokens["cost"] = (dataset_tokens["prompt_tokens"] * price_prompt_per_1m
                            + dataset_tokens["completion_tokens"] * price_completion_per_1m) / 1e6
  summary = {
      "images": len(images), "samples": len(accepted), "types": per_type, "rejected_by_reason": dict(reasons),
      "request_failures": failures, "dataset": os.path.join(out_dir, DATASET_FILE),
      "teacher": {"model": client.model, "base_url": client.base_url},
      "usage_this_run": client.usage.to_dict(price_prompt_per_1m, price_completion_per_1m),
      "usage_dataset": dataset_tokens,
  }
  _write_json(os.path.join(out_dir, SUMMARY_FILE), summary)
  if print_fn:
    print_fn(f"{len(accepted)} samples from {len(images)} images -> {summary['dataset']}")
    for kind, c in per_type.items():
      print_fn(f"  {kind:<13} requested {c['requested']:>5}  replied {c['replied']:>5}  accepted {c['accepted']:>5}"
               f"  rejected {c['rejected']:>5}")
    if reasons:
      print_fn("  rejected: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    if failures:
      print_fn(f"  {len(failures)} request(s) failed after retries; rerun to retry them")
    u = summary["usage_dataset"]
    print_fn(f"  tokens: prompt {u['prompt_tokens']}, completion {u['completion_tokens']}, cost {u['cost']:.4f}")
  return summary


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False, indent=1)
  os.replace(tmp, path)
