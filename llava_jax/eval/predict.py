"""Batched greedy answers for a list of questions, written as the reference's answer files (resumable).

Each question is one human turn (`<image>` marks where its image goes; the template moves it to the front as
LLaVA's `model_vqa*.py` scripts do) rendered as a generation prompt by the conversation template, then
`infer.generate` runs a batch of them (left-padded, KV cache, stop on EOS / the template's stop strings).

The answer file is JSON lines in the format of LLaVA's `model_vqa*.py` output:
  {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
written batch by batch (flushed), so an interrupted run resumes where it stopped: questions whose id is already
in the file with no "error" are skipped. A question that cannot be asked (unreadable image, prompt too long)
gets a line with "text": "" and "error": "<reason>", and is retried on the next run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from llava_jax.config import LlavaConfig
from llava_jax.data import conversation as conv_lib
from llava_jax.data import image as image_lib
from llava_jax.data.errors import SampleError
from llava_jax.data.tokenize import encode_generation_prompt, stop_token_ids

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Question:
  """qid: the answer file's question_id (str or int, as the benchmark writes it). text: the human turn, with
  `<image>` where the image goes when `image` is set. image: a path relative to the image root, or None.
  prompt: what the answer file records as "prompt" (the reference records the question text)."""
  qid: object
  text: str
  image: Optional[str] = None
  prompt: Optional[str] = None


def read_answers(path: str) -> Dict[str, dict]:
  """An answer / prediction JSON-lines file → {str(question_id): record} (later lines win; blank lines and
  lines that are not JSON objects with a question_id are skipped with a warning)."""
  out: Dict[str, dict] = {}
  if not os.path.exists(path):
    return out
  with open(path, "r", encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except ValueError:
        logger.warning("%s:%d is not JSON; ignored", path, n)
        continue
      if not isinstance(record, dict) or "question_id" not in record:
        logger.warning("%s:%d has no question_id; ignored", path, n)
        continue
      out[str(record["question_id"])] = record
  return out


def answer_questions(questions: Sequence[Question], *, model_config: LlavaConfig, params, tokenizer, template,
                     out_path: str, image_root: Optional[str] = None, aspect_ratio: str = "square",
                     batch_size: int = 8, max_new_tokens: int = 1024, model_id: str = "llava_jax", mesh=None,
                     resume: bool = True, max_pixels: Optional[int] = image_lib.MAX_IMAGE_PIXELS,
                     print_fn: Callable[[str], None] = print) -> Dict[str, dict]:
  """Answer every question greedily; returns {str(qid): answer record} for all of them (old and new).

  template: a conversation template name or Template. image_root: folder `Question.image` is relative to.
  batch_size: prompts per `generate` call (rows are sorted by prompt length first, so padding stays small).
  max_new_tokens: cap per answer (lowered for a batch whose longest prompt would pass the model's
    max_position_embeddings).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  from llava_jax.infer.generate import generate  # infer is downstream of data; import lazily

  template = conv_lib.get_template(template)
  ids_seen = [str(q.qid) for q in questions]
  if len(set(ids_seen)) != len(ids_seen):
    raise ValueError("question ids must be unique")
  done = read_answers(out_path) if resume else {}
  done = {k: v for k, v in done.items() if "error" not in v}
  todo = [q for q in questions if str(q.qid) not in done]
  os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
  if not resume or not os.path.exists(out_path):
    open(out_path, "w").close()
  if done and todo:
    print_fn(f"{out_path}: {len(done)} answers on disk, {len(todo)} to go")
  stops = stop_token_ids(template, tokenizer)
  stop_strings = conv_lib.stop_strings(template)
  limit = model_config.text.max_position_embeddings

  encoded, failed = [], []
  for q in todo:
    try:
      ids = encode_generation_prompt([{"from": "human", "value": q.text}], template, tokenizer,
                                     num_image_tokens=model_config.num_image_tokens,
                                     image_token_index=model_config.image_token_index,
                                     num_images=1 if q.image else 0)
      if len(ids) >= limit:
        raise SampleError("too_long", f"prompt of {len(ids)} tokens leaves no room to answer (limit {limit})")
      encoded.append((q, ids))
    except SampleError as e:
      failed.append((q, str(e)))
  encoded.sort(key=lambda x: len(x[1]))

  results: Dict[str, dict] = dict(done)
  with open(out_path, "a", encoding="utf-8") as out:
    def write(q: Question, text: str, error: Optional[str] = None):
      record = {"question_id": q.qid, "prompt": q.prompt if q.prompt is not None else q.text, "text": text,
                "answer_id": f"{model_id}:{q.qid}", "model_id": model_id, "metadata": {}}
      if error is not None:
        record["error"] = error
      out.write(json.dumps(record, ensure_ascii=False) + "\n")
      results[str(q.qid)] = record

    for q, reason in failed:
      logger.warning("question %s: %s", q.qid, reason)
      write(q, "", reason)
    for start in range(0, len(encoded), batch_size):
      batch = encoded[start:start + batch_size]
      rows, pixels, kept = [], [], []
      for q, ids in batch:
        if q.image:
          try:
            path = q.image if image_root is None else os.path.join(image_root, q.image)
            img = image_lib.load_image(path, max_pixels=max_pixels, sample_id=q.qid)
            pixels.append(image_lib.preprocess(img, image_size=model_config.vision.image_size,
                                               aspect_ratio=aspect_ratio))
          except SampleError as e:
            logger.warning("question %s: %s", q.qid, e)
            write(q, "", str(e))
            continue
        else:
          pixels.append(None)
        rows.append(ids)
        kept.append(q)
      if rows:
        new = max(1, min(max_new_tokens, limit - max(len(r) for r in rows)))
        result = generate(model_config, params, input_ids=[np.asarray(r) for r in rows], pixel_values=pixels,
                          tokenizer=tokenizer, max_new_tokens=new, temperature=0.0, stop_token_ids=stops,
                          stop_strings=stop_strings, mesh=mesh)
        for q, text in zip(kept, result.texts):
          write(q, clean_answer(text, stop_strings))
      out.flush()
      print_fn(f"answered {min(start + batch_size, len(encoded))}/{len(encoded)}")
  return results


def clean_answer(text: str, stop_strings: Sequence[str] = ()) -> str:
  """The reference's post-processing: strip, drop a trailing stop string, strip again."""
  text = text.strip()
  for s in stop_strings:
    if s and text.endswith(s):
      text = text[:-len(s)]
  return text.strip()
