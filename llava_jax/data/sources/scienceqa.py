"""ScienceQA from its raw release (problems.json, pid_splits.json, images/<split>/<pid>/image.png) as LLaVA
conversations, rendered exactly as LLaVA's scripts/convert_sqa_to_llava.py (+ _base_prompt.py) render them.

Rendering, for prompt_format "IN-OUT" (default "QCM-LEA", the paper's best: reasoning first):
  context  = (hint + " " + "").strip() or "N/A"            (use_caption=False)
  choices  = "(A) c0 (B) c1 ..."                            (joined by one space)
  lecture, solution: the problem's texts (a literal backslash-n in them becomes a newline)
  input  "QCM": "Question: {q}\\nContext: {c}\\nOptions: {choices}\\n"     (other layouts: INPUT_FORMATS)
  output "LEA": "Answer: {lecture} {solution} The answer is {X}."          (others: OUTPUT_FORMATS)
  then each: .replace("  ", " ").strip(); a trailing "BECAUSE:" is removed;
  human = input with every "Question: " removed when it starts with one; gpt = output with every "Answer: "
  removed when it starts with one; a problem with an image gets "\\n<image>" appended to the human turn.
So QCM-LEA gives human "{q}\\nContext: {c}\\nOptions: (A) ... (B) ...[\\n<image>]" and gpt
"{lecture} {solution} The answer is {X}."; QCM-A (answer only) gives gpt "The answer is {X}.".

Each record keeps what evaluation needs under "meta" (see `ScienceQASource`).
"""
from __future__ import annotations

import json
import os
import string
from typing import Dict, List, Optional

from llava_jax.data.sources.base import check_index

INPUT_FORMATS = ("CQM", "QCM", "QCML", "QCME", "QCMLE", "QCLM", "QCEM", "QCLEM")
OUTPUT_FORMATS = ("A", "AL", "AE", "ALE", "AEL", "LA", "EA", "LEA", "ELA", "LEPA")
OPTION_LETTERS = string.ascii_uppercase  # the reference stops at E; ScienceQA has at most 5 choices
SUBJECT_CODES = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def _context(problem: dict) -> str:
  context = " ".join([problem.get("hint") or "", ""]).strip()
  return context if context else "N/A"


def _choices(choices: List[str]) -> str:
  return " ".join(f"({OPTION_LETTERS[i]}) {c}" for i, c in enumerate(choices))


def _input_text(fmt: str, question: str, context: str, choice: str, lecture: str, solution: str) -> str:
  because_le = f"BECAUSE: {lecture} {solution}\n"
  return {
      "CQM": f"Context: {context}\nQuestion: {question}\nOptions: {choice}\n",
      "QCM": f"Question: {question}\nContext: {context}\nOptions: {choice}\n",
      "QCML": f"Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {lecture}\n",
      "QCME": f"Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {solution}\n",
      "QCMLE": f"Question: {question}\nContext: {context}\nOptions: {choice}\n{because_le}",
      "QCLM": f"Question: {question}\nContext: {context}\nBECAUSE: {lecture}\nOptions: {choice}\n",
      "QCEM": f"Question: {question}\nContext: {context}\nBECAUSE: {solution}\nOptions: {choice}\n",
      "QCLEM": f"Question: {question}\nContext: {context}\n{because_le}Options: {choice}\n",
  }[fmt]


def _output_text(fmt: str, answer: str, lecture: str, solution: str) -> str:
  if fmt == "LEPA":
    out = ""
    if lecture.strip():
      out += f"LECTURE: {lecture}\n"
    if solution.strip():
      out += f"SOLUTION: {solution}\n"
    return out + "###\n" + f"ANSWER: {answer}."
  return {
      "A": f"Answer: The answer is {answer}.",
      "AL": f"Answer: The answer is {answer}. BECAUSE: {solution}",
      "AE": f"Answer: The answer is {answer}. BECAUSE: {lecture}",
      "ALE": f"Answer: The answer is {answer}. BECAUSE: {lecture} {solution}",
      "AEL": f"Answer: The answer is {answer}. BECAUSE: {solution} {lecture}",
      "LA": f"Answer: {lecture} The answer is {answer}.",
      "EA": f"Answer: {solution} The answer is {answer}.",
      "LEA": f"Answer: {lecture} {solution} The answer is {answer}.",
      "ELA": f"Answer: {solution} {lecture} The answer is {answer}.",
  }[fmt]


def _tidy(text: str) -> str:
  text = text.replace("  ", " ").strip()
  if text.endswith("BECAUSE:"):
    text = text.replace("BECAUSE:", "").strip()
  return text


def render_problem(problem: dict, prompt_format: str = "QCM-LEA") -> tuple:
  """(human, gpt) texts for one raw ScienceQA problem, without the image placeholder."""
  in_fmt, out_fmt = _split_format(prompt_format)
  choices = problem["choices"]
  if len(choices) > len(OPTION_LETTERS):
    raise ValueError(f"{len(choices)} choices: more than {len(OPTION_LETTERS)} option letters")
  answer = OPTION_LETTERS[int(problem["answer"])]
  # the reference escapes newlines and unescapes them again: net effect, a literal "\n" becomes a newline
  lecture = (problem.get("lecture") or "").replace("\n", "\\n").replace("\\n", "\n")
  solution = (problem.get("solution") or "").replace("\n", "\\n").replace("\\n", "\n")
  human = _tidy(_input_text(in_fmt, problem["question"], _context(problem), _choices(choices), lecture, solution))
  gpt = _tidy(_output_text(out_fmt, answer, lecture, solution))
  if human.startswith("Question: "):
    human = human.replace("Question: ", "")
  if gpt.startswith("Answer: "):
    gpt = gpt.replace("Answer: ", "")
  return human, gpt


def _split_format(prompt_format: str):
  parts = prompt_format.split("-")
  if len(parts) != 2 or parts[0] not in INPUT_FORMATS or parts[1] not in OUTPUT_FORMATS:
    raise ValueError(f"prompt_format={prompt_format!r}; expected INPUT-OUTPUT with INPUT in {INPUT_FORMATS} and "
                     f"OUTPUT in {OUTPUT_FORMATS} (the paper's best: 'QCM-LEA')")
  return parts


def _grade_band(grade: str) -> Optional[str]:
  try:
    n = int(str(grade).replace("grade", ""))
  except ValueError:
    return None
  return "G1-6" if n <= 6 else "G7-12"


class ScienceQASource:
  """ScienceQA problems of one split as LLaVA conversations (see the module docstring for the strings).

  root: the folder holding problems.json, pid_splits.json and images/ (images/<problem split>/<pid>/<file>).
  split: a key of pid_splits.json ('train', 'val', 'test', 'minival', 'trainval', ...).
  prompt_format: 'QCM-LEA' (reasoning then answer, the paper's best), 'QCM-A' (answer only), 'QCM-ALE'
    (answer first, then the reasons), 'QCM-LEPA' (the script's default), ... (INPUT_FORMATS x OUTPUT_FORMATS).

  Record: {"id": pid, "conversations": [human, gpt], "image": "<split>/<pid>/image.png" (problems with an
  image; relative to `self.image_root` = root/images), "meta": {"pid", "question", "choices", "answer"
  (letter), "answer_index", "hint", "context", "subject", "subject_code" (NAT/SOC/LAN), "grade", "grade_band"
  (G1-6/G7-12), "category", "topic", "has_text" (hint not empty), "has_image", "no_context" (neither), "split",
  "question_text" (the human text without the image placeholder)}}. has_text / has_image / no_context are the
  TXT / IMG / NO columns of the paper's Table 7 (a problem can be both TXT and IMG).
  Image paths use the problem's own split, so merged splits (trainval, minitrain) resolve too; LLaVA's
  converter writes "<pid>/image.png" under images/<split>: the same file.
  """

  def __init__(self, root: str | os.PathLike, split: str, prompt_format: str = "QCM-LEA"):
    self.root = os.fspath(root)
    self.split = split
    self.prompt_format = prompt_format
    _split_format(prompt_format)
    self.image_root = os.path.join(self.root, "images")
    with open(os.path.join(self.root, "problems.json"), "r", encoding="utf-8") as f:
      problems: Dict[str, dict] = json.load(f)
    with open(os.path.join(self.root, "pid_splits.json"), "r", encoding="utf-8") as f:
      splits: Dict[str, List[str]] = json.load(f)
    if split not in splits:
      raise ValueError(f"split={split!r} is not in {os.path.join(self.root, 'pid_splits.json')}; "
                       f"available: {sorted(splits)}")
    missing = [pid for pid in splits[split] if str(pid) not in problems]
    if missing:
      raise ValueError(f"{len(missing)} pid(s) of split {split!r} are not in problems.json: {missing[:10]}")
    self._records = [self._convert(str(pid), problems[str(pid)]) for pid in splits[split]]

  def _convert(self, pid: str, problem: dict) -> dict:
    human, gpt = render_problem(problem, self.prompt_format)
    image = problem.get("image")
    hint = problem.get("hint") or ""
    meta = {
        "pid": pid,
        "question": problem["question"],
        "choices": list(problem["choices"]),
        "answer": OPTION_LETTERS[int(problem["answer"])],
        "answer_index": int(problem["answer"]),
        "hint": hint,
        "context": _context(problem),
        "subject": problem.get("subject"),
        "subject_code": SUBJECT_CODES.get(problem.get("subject")),
        "grade": problem.get("grade"),
        "grade_band": _grade_band(problem.get("grade")),
        "category": problem.get("category"),
        "topic": problem.get("topic"),
        "has_text": bool(hint),
        "has_image": bool(image),
        "no_context": not hint and not image,
        "split": problem.get("split", self.split),
        "question_text": human,
    }
    record = {"id": pid, "conversations": [{"from": "human", "value": human + ("\n<image>" if image else "")},
                                           {"from": "gpt", "value": gpt}], "meta": meta}
    if image:
      record["image"] = os.path.join(meta["split"], pid, image)
    return record

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index) -> dict:
    record = self._records[check_index(index, len(self._records))]
    return {**record, "conversations": [dict(t) for t in record["conversations"]], "meta": dict(record["meta"])}

  def __repr__(self) -> str:
    return f"ScienceQASource({self.root!r}, {self.split!r}, {self.prompt_format!r}, records={len(self)})"
