"""Held-out evaluation on the synthetic shapes source (the demo's proof that the model learned).

Accuracy = greedy exact match of the answer (eval/answer_match.py), overall and per question kind, next to
the majority-answer baseline per kind (always answering the most frequent answer of that kind in the eval
set): a model that learned from the image beats it by a wide margin.
"""
from __future__ import annotations

import collections
import logging
from typing import Dict

from llava_jax.config import LlavaConfig
from llava_jax.data import conversation
from llava_jax.data import from_config as data_config
from llava_jax.data.image import preprocess_batch
from llava_jax.data.pipeline import make_pipeline
from llava_jax.eval.answer_match import batch_answer_matches, summarize
from llava_jax.infer.generate import generate

logger = logging.getLogger(__name__)


def majority_baseline(records) -> Dict[str, float]:
  by_kind = collections.defaultdict(list)
  for r in records:
    by_kind[r["meta"]["kinds"][0]].append(r["meta"]["answers"][0])
  out, total = {}, 0
  for kind, answers in sorted(by_kind.items()):
    top = collections.Counter(answers).most_common(1)[0][1]
    out[kind] = top / len(answers)
    total += top
  out["overall"] = total / max(1, sum(len(v) for v in by_kind.values()))
  return out


def evaluate_synthetic(config, model_config: LlavaConfig, params, tokenizer, *, mesh=None,
                       print_fn=print) -> dict:
  """Score `params` on config.eval's held-out synthetic questions (single-turn, QA, a seed unseen in training)."""
  ev = config.eval
  data = config.data.copy_and_resolve_references() if hasattr(config.data, "copy_and_resolve_references") else config.data
  data.source, data.synthetic_caption, data.synthetic_multi_turn = "synthetic", False, False
  source = data_config.build_source(data, model_config, seed=int(ev.seed), num_samples=int(ev.synthetic_samples))
  kwargs = data_config.pipeline_kwargs(config, model_config, tokenizer)
  kwargs.update(packing=False, group_by_modality=False, worker_count=0, template=ev.template or data.template)
  batches = make_pipeline(source, seed=0, shuffle=False, num_epochs=1, global_batch_size=int(ev.batch_size),
                          process_index=0, process_count=1, **kwargs)
  matches = collections.defaultdict(list)
  seen = set()
  for batch in batches:
    ok = batch_answer_matches(model_config, params, batch, mesh=mesh)
    for row, ids in enumerate(batches.last_ids):
      for sample_id in ids:  # one sample per row in padding mode; empty rows have none
        if sample_id in seen:
          continue
        seen.add(sample_id)
        index = int(sample_id.rsplit("-", 1)[1])
        matches[source[index]["meta"]["kinds"][0]].append(bool(ok[row]))
  report = {"accuracy": summarize(matches), "majority_baseline": majority_baseline(source[i] for i in range(len(source))),
            "skipped": batches.skip_counts()}
  acc, base = report["accuracy"], report["majority_baseline"]
  print_fn(f"held-out synthetic questions: {acc['n']}  accuracy {acc['overall']:.1%}  "
           f"(majority-answer baseline {base['overall']:.1%})")
  for kind in sorted(k for k in acc if k not in ("overall", "n")):
    print_fn(f"  {kind:10s} {acc[kind]:6.1%}   baseline {base.get(kind, float('nan')):6.1%}")
  report["samples"] = sample_answers(model_config, params, tokenizer, source, kwargs["template"], data, mesh=mesh)
  for s in report["samples"]:
    print_fn(f"  Q: {s['question']!r}  model: {s['answer']!r}  expected: {s['expected']!r}")
  return report


def sample_answers(model_config: LlavaConfig, params, tokenizer, source, template, data, *, mesh=None,
                   count: int = 3) -> list:
  """Greedy KV-cache generation (infer/generate.py) for the first `count` held-out questions."""
  tpl = conversation.get_template(template)
  records = [source[i] for i in range(min(count, len(source)))]
  prompts = [conversation.generation_prompt(r["conversations"][:1], tpl) for r in records]
  pixels = preprocess_batch([r["images"][0] for r in records], image_size=model_config.vision.image_size,
                            aspect_ratio=data.image_aspect_ratio)
  result = generate(model_config, params, prompts=prompts, pixel_values=pixels, tokenizer=tokenizer,
                    max_new_tokens=16, stop_strings=tuple(conversation.stop_strings(tpl)), mesh=mesh)
  return [{"question": r["meta"]["questions"][0], "answer": text.strip(), "expected": r["meta"]["answers"][0]}
          for r, text in zip(records, result.texts)]
