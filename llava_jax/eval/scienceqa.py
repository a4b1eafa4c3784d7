"""ScienceQA evaluation: greedy answers for a split, the reference's answer parsing, the paper's Table 7.

Prompt (LLaVA's llava/eval/model_vqa_science.py): the human turn of the converted problem
(`data/sources/scienceqa.py`, e.g. 'CQM-A' for v1.5's llava_test_CQM-A.json, 'QCM-LEA' for the paper's model)
without its `<image>`, prefixed by `<image>\\n` when the problem has an image, plus, for v1.5
(`--single-pred-prompt`), `"\\n" + ANSWER_SUFFIX`; rendered by the conversation template; greedy decoding.

Parsing (LLaVA-1.5's llava/eval/eval_science_qa.py, `parse_answer`), for options A-E:
  1. the whole answer is an option letter ('B')                              → that letter
  2. else it starts with a letter, a period and a space ('B. Paris ...')     → that letter
  3. else `re.findall(r'The answer is ([A-Z]).', text)` finds exactly one match → its letter
  4. else 'FAILED'.
A letter beyond the problem's number of choices counts as no answer (index -1). A problem with no prediction
counts as wrong (the reference's 'FAILED'), so the denominator is always the whole split.

Report (the paper's Table 7): accuracy overall ('Avg') and by subject (NAT / SOC / LAN), context modality
(TXT: the problem has a text hint; IMG: it has an image; NO: neither — a problem can be TXT and IMG) and
grade (G1-6 / G7-12), in percent.

Judge ensemble (the paper's "GPT-4 as the judge", optional): a second model (any OpenAI-compatible endpoint,
text only) answers each problem; where its answer and ours differ, it is shown both answers and asked for a
final one. Final answer: ours when the second model gave no parsable answer; the common answer when they
agree; else the judge's decision, or ours when the decision cannot be parsed (as the reference's
eval_science_qa_gpt4_requery.py). Both numbers (ours alone and the ensemble) are reported, with the second
model's own accuracy. Its replies are kept on disk and reused by a rerun.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple


from llava_jax import openai_client
from llava_jax.eval.predict import Question, answer_questions

logger = logging.getLogger(__name__)

OPTIONS = ("A", "B", "C", "D", "E")
ANSWER_SUFFIX = "Answer with the option's letter from the given choices directly."
FAILED = "FAILED"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")

SUBJECT_COLUMNS = ("NAT", "SOC", "LAN")
CONTEXT_COLUMNS = ("TXT", "IMG", "NO")
GRADE_COLUMNS = ("G1-6", "G7-12")
TABLE7_COLUMNS = SUBJECT_COLUMNS + CONTEXT_COLUMNS + GRADE_COLUMNS + ("Avg",)


# ---------------------------------------------------------------------------------------------------------
# Parsing and scoring


def parse_answer(text: str, num_choices: int, options: Sequence[str] = OPTIONS,
                 rules: str = "v1.5") -> Tuple[str, int]:
  """(parsed letter or 'FAILED', option index or -1) by the reference's rules (see the module docstring).

  rules: 'v1.5' (default; the eval_science_qa.py the LLaVA-1.5 numbers were computed with, and the only rules on
  the reference's main branch) or 'latest' (the revision proposed in LLaVA pull request #1279, never merged:
  newlines become '. ', the text is stripped before the letter test, and the first `The answer is ([A-E])\\.` —
  else `The answer is ([A-E])` — match wins however many there are; numbers with it are not the reference's).
  """
  options = tuple(options)
  if not isinstance(text, str):
    text = ""
  if rules == "v1.5":
    if text in options:
      answer = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
      answer = text[0]
    else:
      found = _ANSWER_IS.findall(text)
      answer = found[0] if len(found) == 1 else FAILED
  elif rules == "latest":
    text = text.replace("\n", ". ")
    answer = FAILED
    if text.strip() in options:
      answer = text.strip()
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
      answer = text[0]
    elif "The answer is " in text:
      match = re.search(r"The answer is ([A-E])\.", text) or re.search(r"The answer is ([A-E])", text)
      answer = match.group(1) if match else FAILED
  else:
    raise ValueError(f"rules={rules!r}; choose 'v1.5' or 'latest'")
  valid = options[:num_choices]
  return answer, (valid.index(answer) if answer in valid else -1)


def percent(correct: int, total: int) -> Optional[float]:
  """correct / total * 100 in the reference's order of operations (eval_science_qa.py): 23/160 prints 14.37
  there, where 100 * 23 / 160 = 14.375 exactly would print 14.38. None for total 0."""
  return correct / total * 100 if total else None


def problem_columns(meta: Mapping) -> List[str]:
  """The Table 7 columns a problem counts in (besides 'Avg'), from ScienceQASource's meta."""
  cols = []
  if meta.get("subject_code") in SUBJECT_COLUMNS:
    cols.append(meta["subject_code"])
  if meta.get("has_text"):
    cols.append("TXT")
  if meta.get("has_image"):
    cols.append("IMG")
  if meta.get("no_context"):
    cols.append("NO")
  if meta.get("grade_band") in GRADE_COLUMNS:
    cols.append(meta["grade_band"])
  return cols


def table7(records: Sequence[Mapping], correct: Mapping[str, bool]) -> Tuple[Dict[str, float], Dict[str, int]]:
  """({column: accuracy in percent (None for an empty column)}, {column: problem count}) over `records`
  (ScienceQASource records); `correct` maps pid → bool (a missing pid counts as wrong)."""
  hits = {c: 0 for c in TABLE7_COLUMNS}
  counts = {c: 0 for c in TABLE7_COLUMNS}
  for rec in records:
    pid = str(rec["meta"]["pid"])
    ok = bool(correct.get(pid, False))
    for col in problem_columns(rec["meta"]) + ["Avg"]:
      counts[col] += 1
      hits[col] += ok
  acc = {c: percent(hits[c], counts[c]) for c in TABLE7_COLUMNS}
  return acc, counts


def score_predictions(records: Sequence[Mapping], predictions: Mapping[str, str], *, rules: str = "v1.5") -> dict:
  """Score predicted texts {pid: text} against ScienceQASource records.

  Returns {"count", "correct", "accuracy" (percent), "table7" {column: percent}, "column_counts",
  "parse_failures" (predictions that gave no valid option), "missing" (problems without a prediction),
  "results" {pid: {"parsed", "pred", "answer", "correct"}}}.
  """
  results, correct = {}, {}
  failures = missing = 0
  for rec in records:
    meta = rec["meta"]
    pid = str(meta["pid"])
    if pid not in predictions:
      missing += 1
      text = FAILED
    else:
      text = predictions[pid]
    parsed, idx = parse_answer(text, len(meta["choices"]), rules=rules)
    failures += pid in predictions and idx < 0
    ok = idx == int(meta["answer_index"])
    correct[pid] = ok
    results[pid] = {"parsed": parsed, "pred": idx, "answer": meta["answer"], "correct": ok}
  acc, counts = table7(records, correct)
  n_correct = sum(correct.values())
  return {"count": len(records), "correct": n_correct,
          "accuracy": percent(n_correct, len(records)), "table7": acc,
          "column_counts": counts, "parse_failures": failures, "missing": missing, "results": results}


def format_table7(rows: Mapping[str, Mapping[str, float]]) -> str:
  """Rows {method name: table7 dict} as the paper's Table 7 (markdown, two decimals)."""
  header = "| Method | " + " | ".join(TABLE7_COLUMNS) + " |"
  sep = "|---|" + "---:|" * len(TABLE7_COLUMNS)
  lines = [header, sep]
  for name, acc in rows.items():
    lines.append(f"| {name} | " + " | ".join("-" if acc[c] is None else f"{acc[c]:.2f}" for c in TABLE7_COLUMNS)
                 + " |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Our answers


def questions_for(records: Iterable[Mapping], answer_suffix: str = "") -> List[Question]:
  """ScienceQASource records → prompts as model_vqa_science.py builds them (see the module docstring)."""
  out = []
  for rec in records:
    qs = rec["meta"]["question_text"].replace("<image>", "").strip()
    if answer_suffix:
      qs = qs + "\n" + answer_suffix
    image = rec.get("image")
    text = ("<image>\n" + qs) if image else qs
    out.append(Question(qid=str(rec["meta"]["pid"]), text=text, image=image, prompt=text))
  return out


# ---------------------------------------------------------------------------------------------------------
# Judge ensemble

SECOND_SYSTEM = ("You are a careful science teacher. You answer multiple-choice questions from school science, "
                 "social science and language lessons.")
SECOND_INSTRUCTION = (
    "Answer the question above. Some questions refer to a picture that you cannot see; rely on the question, "
    "the context and the options as far as they go. Reason briefly, then end with one sentence of the form "
    "\"The answer is X.\" where X is the letter of the option you choose.")
DECIDE_INSTRUCTION = (
    "Two students answered the question above and reached different conclusions. Read both answers, work out "
    "which option is right (it may be neither student's choice), explain in a few sentences, then end with one "
    "sentence of the form \"The answer is X.\" where X is the letter of the correct option.")


def _problem_text(rec: Mapping) -> str:
  meta = rec["meta"]
  choices = " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(meta["choices"]))
  return f"Question: {meta['question']}\nContext: {meta['context']}\nOptions: {choices}"


def second_opinion_messages(rec: Mapping) -> List[Dict[str, str]]:
  """The request asking the second model for its own answer to one problem."""
  return [{"role": "system", "content": SECOND_SYSTEM},
          {"role": "user", "content": f"{_problem_text(rec)}\n\n{SECOND_INSTRUCTION}"}]


def decide_messages(rec: Mapping, ours: str, theirs: str) -> List[Dict[str, str]]:
  """The request asking the second model to settle a disagreement between the two answers."""
  return [{"role": "system", "content": SECOND_SYSTEM},
          {"role": "user", "content": (f"{_problem_text(rec)}\n\n[Student 1]\n{ours}\n[End of Student 1]\n\n"
                                       f"[Student 2]\n{theirs}\n[End of Student 2]\n\n{DECIDE_INSTRUCTION}")}]


def combine_answers(ours_idx: int, second_idx: int, decided_idx: Optional[int]) -> Tuple[int, str]:
  """The ensemble's final option index and how it was reached: 'second_failed' (ours), 'agree',
  'judged' (the decision) or 'judge_failed' (ours: no decision or an unparsable one)."""
  if second_idx < 0:
    return ours_idx, "second_failed"
  if ours_idx == second_idx:
    return ours_idx, "agree"
  if decided_idx is not None and decided_idx >= 0:
    return decided_idx, "judged"
  return ours_idx, "judge_failed"


def judge_ensemble(records: Sequence[Mapping], predictions: Mapping[str, str], client: openai_client.ChatClient,
                   out_dir: str, *, rules: str = "v1.5", print_fn: Callable[[str], None] = print) -> dict:
  """Run the paper's judge ensemble over `records` given our predicted texts; see the module docstring.

  Files in out_dir: judge_second.jsonl (the second model's answers), judge_decide.jsonl (its decisions).
  Returns {"second_model": score_predictions(...) without per-problem results, "ensemble": same,
  "outcomes": {agree, judged, judge_failed, second_failed}, "request_failures", "judge": {model, base_url,
  usage}}.
  """
  os.makedirs(out_dir, exist_ok=True)
  by_pid = {str(r["meta"]["pid"]): r for r in records}
  jobs = [openai_client.Job(pid, second_opinion_messages(r), {"question_id": pid}) for pid, r in by_pid.items()]
  second, fail1 = openai_client.run_resumable(client, jobs, os.path.join(out_dir, "judge_second.jsonl"),
                                              key_field="question_id", print_fn=print_fn)
  second_text = {pid: rec["content"] for pid, rec in second.items()}

  ours_idx, second_idx = {}, {}
  disagree = []
  for pid, rec in by_pid.items():
    n = len(rec["meta"]["choices"])
    ours_idx[pid] = parse_answer(predictions.get(pid, FAILED), n, rules=rules)[1]
    second_idx[pid] = parse_answer(second_text.get(pid, FAILED), n, rules=rules)[1]
    if second_idx[pid] >= 0 and second_idx[pid] != ours_idx[pid]:
      disagree.append(pid)
  jobs = [openai_client.Job(pid, decide_messages(by_pid[pid], predictions.get(pid, ""), second_text[pid]),
                            {"question_id": pid}) for pid in disagree]
  decided, fail2 = openai_client.run_resumable(client, jobs, os.path.join(out_dir, "judge_decide.jsonl"),
                                               key_field="question_id", print_fn=print_fn)

  final, outcomes = {}, {"agree": 0, "judged": 0, "judge_failed": 0, "second_failed": 0}
  for pid, rec in by_pid.items():
    d = decided.get(pid)
    d_idx = parse_answer(d["content"], len(rec["meta"]["choices"]), rules=rules)[1] if d is not None else None
    final[pid], how = combine_answers(ours_idx[pid], second_idx[pid], d_idx)
    outcomes[how] += 1
  correct = {pid: final[pid] == int(by_pid[pid]["meta"]["answer_index"]) for pid in by_pid}
  acc, counts = table7(records, correct)
  n_correct = sum(correct.values())
  second_score = score_predictions(records, second_text, rules=rules)
  second_score.pop("results")
  return {
      "second_model": second_score,
      "ensemble": {"count": len(records), "correct": n_correct,
                   "accuracy": percent(n_correct, len(records)), "table7": acc,
                   "column_counts": counts},
      "outcomes": outcomes,
      "request_failures": {"second": sorted(fail1), "decide": sorted(fail2)},
      "judge": {"model": client.model, "base_url": client.base_url, "usage": client.usage.to_dict()},
  }


# ---------------------------------------------------------------------------------------------------------
# --mode=eval


def evaluate_scienceqa(config, model_config, params, tokenizer, *, workdir: str, mesh=None,
                       client: Optional[openai_client.ChatClient] = None,
                       print_fn: Callable[[str], None] = print) -> dict:
  """Generate, parse and score a ScienceQA split (config.data.scienceqa_root, config.eval.*); writes
  predictions.jsonl and report.json in the eval's out_dir and returns the report."""
  from llava_jax.data.sources import ScienceQASource
  ev, data = config.eval, config.data
  if not data.scienceqa_root:
    raise ValueError("ScienceQA eval needs --config.data.scienceqa_root=<dir with problems.json, "
                     "pid_splits.json, images/>")
  prompt_format = ev.prompt_format or data.scienceqa_format
  source = ScienceQASource(data.scienceqa_root, ev.split, prompt_format=prompt_format)
  records = [source[i] for i in range(len(source))]
  if int(ev.limit) > 0:
    records = records[:int(ev.limit)]
  out_dir = ev.out_dir or os.path.join(workdir, "eval", f"scienceqa_{ev.split}")
  os.makedirs(out_dir, exist_ok=True)
  pred_path = os.path.join(out_dir, "predictions.jsonl")
  template = ev.template or data.template
  print_fn(f"ScienceQA {ev.split}: {len(records)} problems, format {prompt_format}, template {template}")
  answers = answer_questions(
      questions_for(records, ev.answer_suffix), model_config=model_config, params=params,
      tokenizer=tokenizer, template=template, out_path=pred_path, image_root=source.image_root,
      aspect_ratio=data.image_aspect_ratio, batch_size=int(ev.batch_size), max_new_tokens=int(ev.max_new_tokens),
      model_id=ev.model_id, mesh=mesh, print_fn=print_fn)
  predictions = {pid: a["text"] for pid, a in answers.items() if "error" not in a}
  rules = ev.parse_rules
  report = score_predictions(records, predictions, rules=rules)
  report.update(parse_rules=rules, split=ev.split, prompt_format=prompt_format,
                answer_suffix=ev.answer_suffix, template=str(template), predictions=pred_path,
                generation_errors={pid: a["error"] for pid, a in answers.items() if "error" in a})
  rows = {"ours": report["table7"]}
  if ev.judge_ensemble:
    client = client or openai_client.client_from_settings(ev.judge)
    report["judge_ensemble"] = judge_ensemble(records, predictions, client, out_dir, rules=rules,
                                              print_fn=print_fn)
    rows["second model"] = report["judge_ensemble"]["second_model"]["table7"]
    rows["ours + judge"] = report["judge_ensemble"]["ensemble"]["table7"]
  report_path = os.path.join(out_dir, "report.json")
  with open(report_path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  print_fn(f"ScienceQA {ev.split}: {report['correct']}/{report['count']} correct, accuracy "
           f"{report['accuracy'] or 0:.2f}% ({report['parse_failures']} unparsable, {report['missing']} missing)")
  print_fn(format_table7(rows))
  print_fn(f"report: {report_path}")
  return report
