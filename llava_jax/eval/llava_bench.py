"""LLaVA-Bench (COCO and In-the-Wild): our answers reviewed by a text-only judge against reference answers.

Files (the benchmark's own formats, JSON lines):
  questions   {"question_id", "image", "text", "category"}  category: conv | detail | complex
              (COCO: qa90_questions.jsonl; In-the-Wild: questions.jsonl)
  context     {"image", ...} keyed by image file name, either COCO-style {"captions": [...], "instances":
              [{"category", "bbox"}]} (caps_boxes_coco2014_val_80.jsonl) or In-the-Wild {"caption": str or
              list} (context.jsonl)
  reference   {"question_id", "text", "answer_id"?} (qa90_gpt4_answer.jsonl / answers_gpt4.jsonl)
  rules       {key: {"role", "prompt"}} (LLaVA's llava/eval/table/rule.json); keys are the category for COCO
              contexts and "llava_bench_" + category for In-the-Wild ones. Without a rule file, RULES (our own
              wording of the same request) is used: numbers are comparable with the paper's only with its rules.

The judge request is the reference's (eval_gpt_review_visual.py / eval_gpt_review_bench.py): system
JUDGE_SYSTEM; user
  "[Context]\\n{captions joined by \\n}\\n\\n[{boxes, one 'category: bbox' per line}\\n\\n]"
  "[Question]\\n{question}\\n\\n[{role} 1]\\n{reference answer}\\n\\n[End of {role} 1]\\n\\n"
  "[{role} 2]\\n{our answer}\\n\\n[End of {role} 2]\\n\\n[System]\\n{rule prompt}\\n\\n"
(the box block only for COCO contexts), temperature 0.2. The judge writes the two scores on its first line.

Scoring, ours ("relative"): the first line, commas read as spaces, must split (on any whitespace) into exactly
two finite numbers (reference score, our score); anything else is a parse failure, left out of the means and
counted and listed separately. Per category (conv, detail, complex) and overall: relative score =
mean(ours) / mean(reference) × 100.

The reference's number ("reference_method"), computed by the reference's own rules: its `parse_score`
(eval_gpt_review*.py: first line, commas → spaces, `split(' ')` — a single space — must give exactly two parts,
each `float()`; else (-1, -1)) and its summarize_gpt_review.py (mean of every tuple, failures included as
(-1, -1), means rounded to 3 decimals, round(mean2 / mean1 × 100, 1)). So "8, 7" (→ '8', '', '7'), "8 7 " and
"8  7" are (-1, -1) there, and "nan 7" parses; ours reads the first three as scores and rejects the last.

Reviews are written to reviews.jsonl as the reference's review files ({"id", "question_id", "answer1_id",
"answer2_id", "category", "content", "tuple"} with "tuple" = the reference's `parse_score`, so its
summarize_gpt_review.py reads the file as its own, plus "scores" (ours, or null), "parsed" and a prompt
fingerprint) as they arrive; a rerun asks only for the reviews that are missing (or whose prompt changed).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from llava_jax import openai_client
from llava_jax.eval.predict import Question, answer_questions

logger = logging.getLogger(__name__)

CATEGORIES = ("conv", "detail", "complex")
CATEGORY_NAMES = {"conv": "conversation", "detail": "detail", "complex": "complex"}
WILD_PREFIX = "llava_bench_"
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."

_SCORE_REQUEST = (
    "Rate how helpful, relevant, accurate and detailed each answer is, giving each assistant one overall score "
    "from 1 to 10 (higher is better).\n"
    "On the first line, write only the two scores, for Assistant 1 and Assistant 2 in that order, separated by a "
    "space.\n"
    "From the next line on, explain your ratings in detail. Be impartial: the order in which the answers are "
    "shown must not influence your judgment.")
_COCO_INTRO = (
    "Please review the two AI assistants' answers to the user question above. The user asked the question "
    "while looking at an image, which you cannot see; instead it is described by five sentences and by the "
    "bounding boxes of the objects in it, written as (x1, y1, x2, y2) — top-left x, top-left y, bottom-right x, "
    "bottom-right y — as fractions of the image size between 0 and 1.\n")
_WILD_INTRO = (
    "Please review the two AI assistants' answers to the user question above. The user asked the question "
    "while looking at an image, which you cannot see; instead it is described by a few sentences.\n")
RULES: Dict[str, Dict[str, str]] = {}
for _c in CATEGORIES:
  RULES[_c] = {"role": "Assistant", "prompt": _COCO_INTRO + _SCORE_REQUEST}
  RULES[WILD_PREFIX + _c] = {"role": "Assistant", "prompt": _WILD_INTRO + _SCORE_REQUEST}
del _c


@dataclasses.dataclass(frozen=True)
class BenchItem:
  """One question with its judge context: `order` (1-based position in the questions file), `qid`, `image`,
  `text`, `category` (conv | detail | complex), `rule_key`, `context` (the judge's [Context] block text),
  `reference` (the reference answer's text) and `reference_id` (its answer_id, else its question_id)."""
  order: int
  qid: object
  image: str
  text: str
  category: str
  rule_key: str
  context: str
  reference: str
  reference_id: object


def read_jsonl(path: str) -> List[dict]:
  """Objects of a JSON-lines file (blank lines skipped; a bad line is an error naming the line)."""
  out = []
  with open(path, "r", encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError as e:
        raise ValueError(f"{path}:{n} is not JSON: {e}") from None
      if not isinstance(obj, dict):
        raise ValueError(f"{path}:{n} is a {type(obj).__name__}, expected an object")
      out.append(obj)
  return out


def context_text(ctx: Mapping) -> Tuple[str, bool]:
  """(the judge's context text, whether it is a COCO-style context with boxes) for one context record."""
  caps = ctx.get("captions", ctx.get("caption"))
  if isinstance(caps, str):
    cap_str = caps
  elif isinstance(caps, list) and all(isinstance(c, str) for c in caps):
    cap_str = "\n".join(caps)
  else:
    raise ValueError(f"context for image {ctx.get('image')!r} has no 'captions' (list) / 'caption' (str or list)")
  instances = ctx.get("instances")
  if instances is None:
    return cap_str, False
  try:
    box_str = "\n".join(f"{inst['category']}: {inst['bbox']}" for inst in instances)
  except (KeyError, TypeError):
    raise ValueError(f"context for image {ctx.get('image')!r}: 'instances' must be a list of "
                     "{'category', 'bbox'}") from None
  return f"{cap_str}\n\n{box_str}", True


def load_bench(questions_path: str, context_path: str, reference_path: str) -> List[BenchItem]:
  """Join the three benchmark files (see the module docstring) by image and question_id."""
  questions = read_jsonl(questions_path)
  contexts = {c.get("image"): c for c in read_jsonl(context_path)}
  references = {str(a.get("question_id")): a for a in read_jsonl(reference_path)}
  items = []
  seen = set()
  for i, q in enumerate(questions):
    for key in ("question_id", "image", "text", "category"):
      if key not in q:
        raise ValueError(f"{questions_path}: question #{i + 1} has no {key!r}")
    qid = q["question_id"]
    if str(qid) in seen:
      raise ValueError(f"{questions_path}: question_id {qid!r} appears twice")
    seen.add(str(qid))
    if q["category"] not in CATEGORIES:
      raise ValueError(f"{questions_path}: question {qid!r} has category {q['category']!r}; expected {CATEGORIES}")
    if q["image"] not in contexts:
      raise ValueError(f"{context_path} has no context for image {q['image']!r} (question {qid!r})")
    ref = references.get(str(qid))
    if ref is None or not isinstance(ref.get("text"), str):
      raise ValueError(f"{reference_path} has no answer text for question {qid!r}")
    context, coco = context_text(contexts[q["image"]])
    items.append(BenchItem(order=i + 1, qid=qid, image=q["image"], text=q["text"], category=q["category"],
                           rule_key=q["category"] if coco else WILD_PREFIX + q["category"], context=context,
                           reference=ref["text"], reference_id=ref.get("answer_id", ref["question_id"])))
  return items


def load_rules(path: Optional[str]) -> Dict[str, Dict[str, str]]:
  """A rule.json ({key: {"role", "prompt"}}) or, for None / '', the built-in RULES."""
  if not path:
    return dict(RULES)
  with open(path, "r", encoding="utf-8") as f:
    rules = json.load(f)
  if not isinstance(rules, dict) or not all(isinstance(v, dict) and "role" in v and "prompt" in v
                                            for v in rules.values()):
    raise ValueError(f"{path} must map rule names to {{'role', 'prompt'}} objects (LLaVA's table/rule.json)")
  return rules


def judge_content(item: BenchItem, answer: str, rule: Mapping[str, str]) -> str:
  """The judge's user message for one question (the reference's layout)."""
  role = rule["role"]
  return (f"[Context]\n{item.context}\n\n"
          f"[Question]\n{item.text}\n\n"
          f"[{role} 1]\n{item.reference}\n\n[End of {role} 1]\n\n"
          f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
          f"[System]\n{rule['prompt']}\n\n")


def parse_scores(review: str) -> Optional[Tuple[float, float]]:
  """(reference score, our score) from the review's first line, or None (see the module docstring)."""
  if not isinstance(review, str):
    return None
  parts = review.split("\n")[0].replace(",", " ").split()
  if len(parts) != 2:
    return None
  try:
    a, b = float(parts[0]), float(parts[1])
  except ValueError:
    return None
  if not (math.isfinite(a) and math.isfinite(b)):
    return None
  return a, b


def review_answers(items: Sequence[BenchItem], answers: Mapping[str, Mapping], client: openai_client.ChatClient,
                   out_path: str, *, rules: Optional[Mapping] = None, temperature: float = 0.2,
                   max_tokens: int = 1024, print_fn: Optional[Callable[[str], None]] = print):
  """Ask the judge about every item that has an answer ({str(qid): {"text", "answer_id"?}}); returns
  (reviews in question order, request failures {qid: error}, questions without an answer [qid])."""
  rules = dict(RULES) if rules is None else rules
  jobs, unanswered = [], []
  for item in items:
    ans = answers.get(str(item.qid))
    if ans is None or "error" in ans:
      unanswered.append(item.qid)
      continue
    if item.rule_key not in rules:
      raise ValueError(f"no rule {item.rule_key!r} for question {item.qid!r}; rules: {sorted(rules)}")
    content = judge_content(item, ans["text"], rules[item.rule_key])
    messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]
    record = {"id": item.order, "question_id": item.qid, "answer1_id": item.reference_id,
              "answer2_id": ans.get("answer_id", ans.get("question_id", item.qid)), "category": item.rule_key}
    jobs.append(openai_client.Job(str(item.qid), messages, record))
  records, failures = openai_client.run_resumable(client, jobs, out_path, key_field="question_id",
                                                  annotate=_scored, print_fn=print_fn, temperature=temperature,
                                                  max_tokens=max_tokens)
  reviews = [{**records[str(item.qid)], **_scored(records[str(item.qid)])} for item in items
             if str(item.qid) in records]
  return reviews, failures, unanswered


def reference_parse_score(review) -> List[float]:
  """The reference's `parse_score` (llava/eval/eval_gpt_review*.py) re-expressed: [score 1, score 2] or
  [-1, -1] (see the module docstring: `split(' ')`, so doubled or trailing spaces fail; `float()` accepts
  'nan' / 'inf')."""
  try:
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) == 2:
      return [float(parts[0]), float(parts[1])]
    return [-1, -1]
  except Exception:  # noqa: BLE001 — the reference catches everything (a non-string review, a non-number)
    return [-1, -1]


def _scored(review: Mapping) -> dict:
  """The review's "tuple" as the reference stores it (its `parse_score`), our "scores" and whether they parsed."""
  scores = parse_scores(review["content"])
  return {"tuple": reference_parse_score(review["content"]), "scores": list(scores) if scores else None,
          "parsed": scores is not None}


def base_category(category: str) -> str:
  return category[len(WILD_PREFIX):] if category.startswith(WILD_PREFIX) else category


def summarize(reviews: Sequence[Mapping]) -> dict:
  """Scores per category and overall from reviews ({"category", "tuple", "scores", "parsed"} each; without
  "scores", a parsed review's "tuple" is taken as ours).

  Per group: n (reviews), parsed, parse_failures, reference_mean, model_mean (over reviews whose "scores" —
  ours — parsed), relative = model_mean / reference_mean × 100 (None when nothing parsed or the reference mean
  is 0), and reference_method: summarize_gpt_review.py's number over the reviews' "tuple"s (the reference's
  `parse_score`, failures as (-1, -1)): means rounded to 3 decimals, the ratio × 100 rounded to 1 decimal
  (None where the reference would divide by zero).
  """
  groups: Dict[str, List[Mapping]] = {c: [] for c in CATEGORIES}
  for r in reviews:
    groups.setdefault(base_category(r["category"]), []).append(r)
  groups["overall"] = list(reviews)
  out = {}
  for name, rs in groups.items():
    ok = [r["scores"] if "scores" in r else r["tuple"] for r in rs if r.get("parsed")]
    ref_mean = sum(t[0] for t in ok) / len(ok) if ok else None
    our_mean = sum(t[1] for t in ok) / len(ok) if ok else None
    relative = 100.0 * our_mean / ref_mean if ok and ref_mean else None
    every = [r["tuple"] for r in rs]
    ref_method = None
    if every:
      m0, m1 = (round(float(x), 3) for x in np.asarray(every, dtype=np.float64).mean(0))  # as the reference
      ref_method = round(m1 / m0 * 100, 1) if m0 else None
    out[name] = {"n": len(rs), "parsed": len(ok), "parse_failures": len(rs) - len(ok), "reference_mean": ref_mean,
                 "model_mean": our_mean, "relative": relative, "reference_method": ref_method}
  return out


def format_summary(summary: Mapping[str, Mapping]) -> str:
  def f(x, spec):
    return "-" if x is None else format(x, spec)
  lines = [f"{'category':<14}{'n':>5}{'parsed':>8}{'failed':>8}{'reference':>11}{'ours':>7}{'relative':>10}"
           f"{'(ref. method)':>15}"]
  for name in list(CATEGORIES) + ["overall"]:
    if name not in summary or (name != "overall" and not summary[name]["n"]):
      continue
    s = summary[name]
    lines.append(f"{CATEGORY_NAMES.get(name, name):<14}{s['n']:>5}{s['parsed']:>8}{s['parse_failures']:>8}"
                 f"{f(s['reference_mean'], '.2f'):>11}{f(s['model_mean'], '.2f'):>7}{f(s['relative'], '.1f'):>10}"
                 f"{f(s['reference_method'], '.1f'):>15}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# --mode=eval


def evaluate_llava_bench(config, model_config, params, tokenizer, *, workdir: str, mesh=None,
                         client: Optional[openai_client.ChatClient] = None,
                         print_fn: Callable[[str], None] = print) -> dict:
  """Answer the benchmark's questions (answers.jsonl), have the judge review them (reviews.jsonl), and write
  and return the report (report.json) in the eval's out_dir."""
  ev, data = config.eval, config.data
  for key in ("questions", "context", "reference_answers"):
    if not ev[key]:
      raise ValueError(f"LLaVA-Bench eval needs --config.eval.{key}=<path> (see llava_jax/eval/llava_bench.py)")
  items = load_bench(ev.questions, ev.context, ev.reference_answers)
  rules = load_rules(ev.rule_file)
  out_dir = ev.out_dir or os.path.join(workdir, "eval", "llava_bench")
  os.makedirs(out_dir, exist_ok=True)
  template = ev.template or data.template
  questions = [Question(qid=it.qid, text="<image>\n" + it.text, image=it.image, prompt=it.text) for it in items]
  answers_path = os.path.join(out_dir, "answers.jsonl")
  print_fn(f"LLaVA-Bench: {len(items)} questions, template {template}")
  answers = answer_questions(questions, model_config=model_config, params=params, tokenizer=tokenizer,
                             template=template, out_path=answers_path, image_root=ev.image_root or None,
                             aspect_ratio=data.image_aspect_ratio, batch_size=int(ev.batch_size),
                             max_new_tokens=int(ev.max_new_tokens), model_id=ev.model_id,
                             mesh=mesh, print_fn=print_fn)
  report = {"questions": len(items), "answers": answers_path, "rules": ev.rule_file or "built-in",
            "generation_errors": {k: v["error"] for k, v in answers.items() if "error" in v}}
  if client is None and not ev.judge.model:
    print_fn("no judge model configured (--judge_model): answers written, no reviews")
  else:
    client = client or openai_client.client_from_settings(ev.judge)
    report.update(review_and_summarize(items, answers, client, out_dir, rules=rules,
                                       temperature=float(ev.judge.temperature),
                                       max_tokens=int(ev.judge.max_tokens), print_fn=print_fn))
    report["judge"]["usage"] = client.usage.to_dict(float(ev.judge.price_prompt_per_1m),
                                                    float(ev.judge.price_completion_per_1m))
  path = os.path.join(out_dir, "report.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  print_fn(f"report: {path}")
  return report


def review_and_summarize(items: Sequence[BenchItem], answers: Mapping[str, Mapping],
                         client: openai_client.ChatClient, out_dir: str, *, rules=None, temperature: float = 0.2,
                         max_tokens: int = 1024, print_fn: Callable[[str], None] = print) -> dict:
  """Reviews (out_dir/reviews.jsonl) → {"summary", "request_failures", "unanswered", "reviews", "judge"}."""
  path = os.path.join(out_dir, "reviews.jsonl")
  reviews, failures, unanswered = review_answers(items, answers, client, path, rules=rules,
                                                 temperature=temperature, max_tokens=max_tokens,
                                                 print_fn=print_fn)
  summary = summarize(reviews)
  print_fn(f"LLaVA-Bench review by {client.model}: relative score = mean(ours) / mean(reference) x 100")
  print_fn(format_summary(summary))
  n_fail = summary["overall"]["parse_failures"]
  if n_fail or failures or unanswered:
    print_fn(f"left out: {n_fail} unparsable review(s), {len(failures)} failed request(s) (rerun to retry), "
             f"{len(unanswered)} question(s) without an answer")
  return {"summary": summary, "request_failures": failures, "unanswered": [str(q) for q in unanswered],
          "parse_failures": [str(r["question_id"]) for r in reviews if not r["parsed"]], "reviews": path,
          "judge": {"model": client.model, "base_url": client.base_url}}
