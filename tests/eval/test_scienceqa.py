"""ScienceQA evaluation: the reference's answer parsing, Table 7 numbers on hand-written predictions, the judge
ensemble against a stand-in judge on 127.0.0.1, the converter's LLaVA JSON, and `--mode=eval` end to end with a
random tiny model (its answers are junk; what is checked is the prompts, batching, files and resume).

Expected values are derived by hand from LLaVA's llava/eval/eval_science_qa.py (v1.5 rules, and its later
revision for rules='latest'), model_vqa_science.py (prompt) and eval_science_qa_gpt4_requery.py (ensemble).
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from llava_jax.data.sources import ScienceQASource
from llava_jax import openai_client, recipes
from llava_jax.eval import scienceqa as sqa
from tests.fixtures import tiny_model
from tests.fixtures.judge_stub import JudgeStub, Reply


def _problem(q, choices, answer, subject, grade, hint="", image=None, lecture="", solution=""):
  return {"question": q, "choices": choices, "answer": answer, "hint": hint, "image": image, "task": "closed choice",
          "grade": grade, "subject": subject, "topic": "t", "category": "c", "skill": "s", "lecture": lecture,
          "solution": solution, "split": "test"}


# columns: 10 NAT TXT IMG G1-6 | 11 NAT IMG G7-12 | 12 SOC NO G1-6 | 13 SOC TXT G7-12 | 14 LAN NO G1-6 |
#          15 LAN TXT IMG G7-12 | 16 NAT NO G1-6 | 17 SOC TXT G1-6
PROBLEMS = {
    "10": _problem("Q10 which is heavier?", ["feather", "rock", "leaf"], 1, "natural science", "grade3",
                   hint="A rock and a feather.", image="image.png", lecture="Weight is a force.",
                   solution="A rock is heavy."),
    "11": _problem("Q11 which animal is shown?", ["cat", "dog"], 0, "natural science", "grade7", image="image.png"),
    "12": _problem("Q12 which city is a capital?", ["Lyon", "Nice", "Lille", "Paris"], 3, "social science",
                   "grade2"),
    "13": _problem("Q13 which came first?", ["the car", "the wheel"], 1, "social science", "grade9",
                   hint="Think about history."),
    "14": _problem("Q14 which word is a verb?", ["blue", "table", "run"], 2, "language science", "grade5"),
    "15": _problem("Q15 which letter is shown?", ["a", "b", "c", "d", "e"], 4, "language science", "grade12",
                   hint="Look closely.", image="image.png"),
    "16": _problem("Q16 is ice cold?", ["yes", "no"], 0, "natural science", "grade1"),
    "17": _problem("Q17 which is a coin?", ["penny", "leaf"], 0, "social science", "grade6", hint="Money."),
}
SPLITS = {"test": list(PROBLEMS), "train": []}

# hand-written answers and what the v1.5 rules make of them
PREDICTIONS = {
    "10": "Weight is a force. The answer is B.",     # B, right
    "11": "B",                                         # B, wrong (answer A)
    "12": "D. Paris is the capital.",                  # D, right
    "13": "The answer is B. The answer is B.",         # two matches -> FAILED
    "14": "The answer is C.",                          # C, right
    "15": "E",                                         # E, right
    "16": "The answer is A",                           # no character after the letter -> FAILED
    # "17": missing -> counted wrong
}


@pytest.fixture()
def sqa_root(tmp_path):
  root = tmp_path / "scienceqa"
  root.mkdir()
  (root / "problems.json").write_text(json.dumps(PROBLEMS))
  (root / "pid_splits.json").write_text(json.dumps(SPLITS))
  for pid, p in PROBLEMS.items():
    if p["image"]:
      d = root / "images" / "test" / pid
      d.mkdir(parents=True)
      rng = np.random.default_rng(int(pid))
      Image.fromarray(rng.integers(0, 255, (24 + int(pid), 40, 3), dtype=np.uint8)).save(d / "image.png")
  return root


def _records(root, fmt="QCM-LEA"):
  src = ScienceQASource(root, "test", prompt_format=fmt)
  return [src[i] for i in range(len(src))]


# ------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("text,n,v15,latest", [
    ("A", 3, ("A", 0), ("A", 0)),
    ("B", 2, ("B", 1), ("B", 1)),
    ("C", 2, ("C", -1), ("C", -1)),                       # a letter beyond the choices is no answer
    (" A", 3, ("FAILED", -1), ("A", 0)),                   # v1.5 compares the raw text; 'latest' strips it
    ("A.", 3, ("FAILED", -1), ("FAILED", -1)),             # too short for 'X. '
    ("B. rock", 3, ("B", 1), ("B", 1)),
    ("The answer is A.", 3, ("A", 0), ("A", 0)),
    ("Lecture first. The answer is B.", 3, ("B", 1), ("B", 1)),
    ("The answer is A. So the answer is B.", 3, ("A", 0), ("A", 0)),  # only one capitalised match
    ("The answer is A. The answer is B.", 3, ("FAILED", -1), ("A", 0)),  # v1.5 needs exactly one match
    ("The answer is C", 3, ("FAILED", -1), ("C", 2)),      # v1.5's '.' needs a character after the letter
    ("The answer is AB", 3, ("A", 0), ("A", 0)),           # ... any character
    ("The answer is Z.", 5, ("Z", -1), ("FAILED", -1)),
    ("the answer is A.", 3, ("FAILED", -1), ("FAILED", -1)),
    ("A\nbecause", 3, ("FAILED", -1), ("A", 0)),           # 'latest' turns the newline into '. '
    ("", 3, ("FAILED", -1), ("FAILED", -1)),
    ("E", 5, ("E", 4), ("E", 4)),
    ("F", 6, ("FAILED", -1), ("FAILED", -1)),              # options stop at E, as the reference's
])
def test_parse_answer_follows_the_reference(text, n, v15, latest):
  assert sqa.parse_answer(text, n) == v15
  assert sqa.parse_answer(text, n, rules="latest") == latest


def test_parse_answer_rejects_unknown_rules():
  with pytest.raises(ValueError, match="v1.5"):
    sqa.parse_answer("A", 2, rules="strict")


# ------------------------------------------------------------------------------------------ scoring


def test_table7_exact_numbers(sqa_root):
  records = _records(sqa_root)
  report = sqa.score_predictions(records, PREDICTIONS)
  # right: 10, 12, 14, 15 of 8
  assert (report["count"], report["correct"], report["parse_failures"], report["missing"]) == (8, 4, 2, 1)
  assert report["accuracy"] == pytest.approx(50.0)
  expected = {"NAT": 100 / 3, "SOC": 100 / 3, "LAN": 100.0, "TXT": 50.0, "IMG": 200 / 3, "NO": 200 / 3,
              "G1-6": 60.0, "G7-12": 100 / 3, "Avg": 50.0}
  assert report["table7"] == pytest.approx(expected)
  assert report["column_counts"] == {"NAT": 3, "SOC": 3, "LAN": 2, "TXT": 4, "IMG": 3, "NO": 3, "G1-6": 5,
                                     "G7-12": 3, "Avg": 8}
  assert report["results"]["13"] == {"parsed": "FAILED", "pred": -1, "answer": "B", "correct": False}
  assert report["results"]["11"] == {"parsed": "B", "pred": 1, "answer": "A", "correct": False}
  assert report["results"]["17"]["parsed"] == "FAILED"
  table = sqa.format_table7({"ours": report["table7"]})
  assert table.splitlines()[0] == "| Method | NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |"
  assert table.splitlines()[2] == "| ours | 33.33 | 33.33 | 100.00 | 50.00 | 66.67 | 66.67 | 60.00 | 33.33 | 50.00 |"


def test_percentages_in_the_references_order():
  """eval_science_qa.py prints `correct / total * 100` with :.2f; 23 of 160 is 14.37 there (14.374999...), while
  100 * 23 / 160 = 14.375 exactly would print 14.38."""
  meta = {"subject_code": "NAT", "has_text": True, "has_image": False, "no_context": False, "grade_band": "G1-6"}
  records = [{"meta": dict(meta, pid=str(i))} for i in range(160)]
  acc, counts = sqa.table7(records, {str(i): i < 23 for i in range(160)})
  assert counts["Avg"] == counts["NAT"] == 160
  assert f"{acc['Avg']:.2f}" == f"{23 / 160 * 100:.2f}" == "14.37" and f"{acc['NAT']:.2f}" == "14.37"
  assert f"{100.0 * 23 / 160:.2f}" == "14.38"  # the order that gave the wrong digit
  assert "| 14.37 |" in sqa.format_table7({"x": acc})
  assert sqa.percent(23, 160) == 23 / 160 * 100 and sqa.percent(0, 0) is None


@pytest.mark.parametrize("variant,template,fmt,suffix", [
    ("7b", "vicuna_v1", "CQM-A", sqa.ANSWER_SUFFIX),  # scripts/v1_5/eval/sqa.sh
    ("paper", "llava_v0", "QCM-LEA", ""),             # scripts/sqa_eval_batch.sh for LLaVA-13b-v0-science_qa
])
def test_eval_config_is_the_references_run(variant, template, fmt, suffix):
  """max_new_tokens as model_vqa_science.py (1024) and the conv-mode the reference's scripts use."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("sqa_eval_cfg", os.path.join(tiny_model.REPO, "configs",
                                                                             "scienceqa_eval.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(variant)
  assert c.eval.max_new_tokens == 1024 and c.eval.kind == "scienceqa" and c.eval.parse_rules == "v1.5"
  assert c.eval.template == c.data.template == template and c.eval.prompt_format == fmt
  assert c.eval.answer_suffix == suffix


def test_empty_columns_are_none(sqa_root):
  records = [r for r in _records(sqa_root) if r["meta"]["subject_code"] == "LAN"]
  report = sqa.score_predictions(records, PREDICTIONS)
  assert report["table7"]["NAT"] is None and report["table7"]["LAN"] == 100.0
  assert "| - |" in sqa.format_table7({"x": report["table7"]})


def test_prompts_are_model_vqa_science_prompts(sqa_root):
  """`<image>\\n` + the human turn without its image + '\\n' + the v1.5 suffix (model_vqa_science.py)."""
  recs = _records(sqa_root, "CQM-A")
  qs = {q.qid: q for q in sqa.questions_for(recs, sqa.ANSWER_SUFFIX)}
  assert qs["10"].text == ("<image>\nContext: A rock and a feather.\nQuestion: Q10 which is heavier?\n"
                           "Options: (A) feather (B) rock (C) leaf\n"
                           "Answer with the option's letter from the given choices directly.")
  assert qs["10"].image == os.path.join("test", "10", "image.png")
  assert qs["12"].text == ("Context: N/A\nQuestion: Q12 which city is a capital?\n"
                           "Options: (A) Lyon (B) Nice (C) Lille (D) Paris\n"
                           "Answer with the option's letter from the given choices directly.")
  assert qs["12"].image is None
  plain = {q.qid: q for q in sqa.questions_for(_records(sqa_root))}
  assert plain["16"].text == "Q16 is ice cold?\nContext: N/A\nOptions: (A) yes (B) no"


# ------------------------------------------------------------------------------------------ judge ensemble

SECOND = {  # the second model's own answers (by problem); 12 fails twice then cannot answer, 17 always fails
    "10": "The answer is B.", "11": "The answer is A.", "13": "The answer is A.", "14": "The answer is A.",
    "15": "The answer is E.", "16": "The answer is B.",
}
DECIDE = {  # its decisions where it disagrees with ours
    "11": "Student 2 is right. The answer is A.", "13": "Option B is right.",  # unparsable
    "14": "The answer is C.", "16": "Ice is cold. The answer is A.",
}


def _pid_of(content):
  return content.split("Question: Q", 1)[1].split(" ", 1)[0]


def judge_reply(body, attempt):
  content = body["messages"][-1]["content"]
  pid = _pid_of(content)
  if "[Student 1]" in content:
    return DECIDE[pid]
  if pid == "17":
    return Reply(status=503)
  if pid == "12":
    return Reply(status=500) if attempt < 2 else "I cannot see the image, sorry."
  return SECOND[pid]


def test_judge_ensemble_exact_numbers_and_resume(sqa_root, tmp_path):
  records = _records(sqa_root)
  out = str(tmp_path / "judge")
  with JudgeStub(judge_reply) as stub:
    client = openai_client.ChatClient(stub.base_url, "stub-judge", "", max_retries=2, backoff_base=0.001,
                                      concurrency=3, timeout=10)
    result = sqa.judge_ensemble(records, PREDICTIONS, client, out, print_fn=lambda s: None)
    n_requests = len(stub.requests)
    # 8 second opinions: 12 took 3 attempts, 17 took 3 and failed; 4 decisions (11, 13, 14, 16)
    assert n_requests == 6 + 3 + 3 + 4
    decided = sorted(_pid_of(m) for m in stub.user_messages() if "[Student 1]" in m)
    assert decided == ["11", "13", "14", "16"]
    # the decision request shows both full answers
    msg = next(m for m in stub.user_messages() if "[Student 1]" in m and "Q14" in m)
    assert "[Student 1]\nThe answer is C.\n[End of Student 1]" in msg
    assert "[Student 2]\nThe answer is A.\n[End of Student 2]" in msg
    assert "Options: (A) blue (B) table (C) run" in msg

    # ensemble right: 10 agree, 11 judged A, 12 ours (second failed), 14 judged C, 15 agree, 16 judged A
    assert result["outcomes"] == {"agree": 2, "judged": 3, "judge_failed": 1, "second_failed": 2}
    assert result["ensemble"]["correct"] == 6 and result["ensemble"]["accuracy"] == pytest.approx(75.0)
    assert result["second_model"]["correct"] == 3 and result["second_model"]["accuracy"] == pytest.approx(37.5)
    assert result["ensemble"]["table7"] == pytest.approx(
        {"NAT": 100.0, "SOC": 100 / 3, "LAN": 100.0, "TXT": 50.0, "IMG": 100.0, "NO": 100.0, "G1-6": 80.0,
         "G7-12": 200 / 3, "Avg": 75.0})
    assert result["request_failures"] == {"second": ["17"], "decide": []}
    usage = result["judge"]["usage"]
    assert (usage["requests"], usage["failures"], usage["retries"]) == (11, 1, 4)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (11 * 11, 7 * 11)

    # a rerun asks again only what failed (17: three attempts), and gets the same numbers
    client2 = openai_client.ChatClient(stub.base_url, "stub-judge", "", max_retries=2, backoff_base=0.001)
    again = sqa.judge_ensemble(records, PREDICTIONS, client2, out, print_fn=lambda s: None)
    assert len(stub.requests) == n_requests + 3
    assert {_pid_of(m) for m in stub.user_messages()[n_requests:]} == {"17"}
    assert again["ensemble"] == result["ensemble"] and again["outcomes"] == result["outcomes"]


def test_combine_answers_rules():
  assert sqa.combine_answers(1, -1, None) == (1, "second_failed")
  assert sqa.combine_answers(2, 2, None) == (2, "agree")
  assert sqa.combine_answers(-1, 0, 3) == (3, "judged")
  assert sqa.combine_answers(1, 0, -1) == (1, "judge_failed")
  assert sqa.combine_answers(1, 0, None) == (1, "judge_failed")


# ------------------------------------------------------------------------------------------ converter


def test_converter_writes_llava_json_both_variants(sqa_root, tmp_path, tiny_tokenizer):
  from llava_jax.data.sources import LlavaJsonSource
  from llava_jax.data.tokenize import encode_conversation
  from llava_jax.datagen import scienceqa as convert
  first = tmp_path / "lea.json"
  assert convert.main(["--root", str(sqa_root), "--split", "test", "--out", str(first)]) == 0
  answer_first = tmp_path / "ale.json"
  assert convert.write_llava_json(str(sqa_root), "test", str(answer_first), convert.ANSWER_FIRST) == 8
  lea = json.loads(first.read_text())
  ale = json.loads(answer_first.read_text())
  assert lea[0] == {"id": "10", "image": os.path.join("test", "10", "image.png"), "conversations": [
      {"from": "human", "value": "Q10 which is heavier?\nContext: A rock and a feather.\n"
                                 "Options: (A) feather (B) rock (C) leaf\n<image>"},
      {"from": "gpt", "value": "Weight is a force. A rock is heavy. The answer is B."}]}
  assert ale[0]["conversations"][1]["value"] == "The answer is B. BECAUSE: Weight is a force. A rock is heavy."
  assert "image" not in lea[2] and "meta" not in lea[2]
  # the training side reads it like any LLaVA data set
  src = LlavaJsonSource(str(first), str(sqa_root / "images"), strict=True)
  assert len(src) == 8
  for rec in (src[0], src[2]):
    enc = encode_conversation(rec["conversations"], "vicuna_v1", tiny_tokenizer, num_image_tokens=4,
                              image_token_index=512, max_length=512)
    assert enc.loss_mask.any() and enc.num_images == (1 if "image" in rec else 0)


# ------------------------------------------------------------------------------------------ --mode=eval


def _tiny_config(sqa_root, tokenizer_dir, **eval_kw):
  c = tiny_model.tiny_config(tokenizer_dir)
  c.data.source, c.data.scienceqa_root = "scienceqa", str(sqa_root)
  c.eval = recipes.scienceqa_eval_section(**eval_kw)
  return c


def test_mode_eval_end_to_end_with_a_tiny_model(sqa_root, tmp_path, tiny_tokenizer_dir, tiny_tokenizer,
                                                monkeypatch):
  from llava_jax import recipes
  from llava_jax.data import conversation, image as image_lib
  from llava_jax.infer import generate as gen_lib
  from llava_jax.eval.run import evaluate_checkpoint

  config = _tiny_config(sqa_root, tiny_tokenizer_dir, split="test", prompt_format="CQM-A",
                        answer_suffix=sqa.ANSWER_SUFFIX, max_new_tokens=6, batch_size=5)
  model_config = recipes.llava_config(config.model)
  workdir = str(tmp_path / "run")
  tiny_model.save_random_params(config, os.path.join(workdir, "params"), seed=3)
  calls = []
  real_generate = gen_lib.generate

  def counting_generate(*args, **kw):
    calls.append(len(kw["input_ids"]))
    return real_generate(*args, **kw)

  monkeypatch.setattr(gen_lib, "generate", counting_generate)
  report = evaluate_checkpoint(config, workdir)
  out_dir = os.path.join(workdir, "eval", "scienceqa_test")
  assert calls == [5, 3]  # 8 problems, batches of 5
  lines = [json.loads(l) for l in open(os.path.join(out_dir, "predictions.jsonl"))]
  assert sorted(l["question_id"] for l in lines) == sorted(PROBLEMS)
  by_id = {l["question_id"]: l for l in lines}
  assert by_id["15"]["prompt"] == ("<image>\nContext: Look closely.\nQuestion: Q15 which letter is shown?\n"
                                   "Options: (A) a (B) b (C) c (D) d (E) e\n" + sqa.ANSWER_SUFFIX)

  # the report scores exactly the texts on disk by the reference's rules
  assert report["count"] == 8 and report["missing"] == 0 and not report["generation_errors"]
  for pid, line in by_id.items():
    letter, idx = sqa.parse_answer(line["text"], len(PROBLEMS[pid]["choices"]))
    assert report["results"][pid]["parsed"] == letter
    assert report["results"][pid]["correct"] == (idx == PROBLEMS[pid]["answer"])
  assert json.load(open(os.path.join(out_dir, "report.json")))["correct"] == report["correct"]

  # an independent prompt: the vicuna_v1 generation prompt written out by hand, all rows in file order,
  # tokenized by generate's own string path, gives the same answers as the length-sorted batches
  from llava_jax.infer.loading import default_mesh
  mesh = default_mesh(config)
  from llava_jax.models.llava import param_shardings
  from llava_jax.checkpoints.orbax_params import restore_params
  params = restore_params(os.path.join(workdir, "params"), param_shardings(model_config, mesh))
  records = _records(sqa_root, "CQM-A")
  prompts, pixels = [], []
  for rec in records:
    q = rec["meta"]["question_text"] + "\n" + sqa.ANSWER_SUFFIX
    image = "<image>\n" if rec.get("image") else ""
    prompts.append(conversation.SYSTEM_USER + " USER: " + image + q + " ASSISTANT:")
    pixels.append(image_lib.preprocess(image_lib.load_image(os.path.join(sqa_root, "images", rec["image"])),
                                       image_size=32) if rec.get("image") else None)
  res = real_generate(model_config, params, prompts=prompts, pixel_values=pixels, tokenizer=tiny_tokenizer,
                      max_new_tokens=6, temperature=0.0, mesh=mesh, stop_strings=("</s>",))
  for rec, text in zip(records, res.texts):
    assert by_id[rec["id"]]["text"] == text.strip(), rec["id"]

  # resume: nothing to generate on a rerun; a deleted line is regenerated alone
  calls.clear()
  evaluate_checkpoint(config, workdir)
  assert calls == []
  with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
    for l in lines:
      if l["question_id"] != "12":
        f.write(json.dumps(l) + "\n")
  again = evaluate_checkpoint(config, workdir)
  assert calls == [1]
  assert again["results"] == report["results"]


def test_mode_eval_rejects_an_unknown_kind(sqa_root, tiny_tokenizer_dir, tmp_path):
  from llava_jax.eval.run import evaluate_checkpoint
  config = _tiny_config(sqa_root, tiny_tokenizer_dir)
  config.eval.kind = "mmbench"
  with pytest.raises(ValueError, match="choose one of"):
    evaluate_checkpoint(config, str(tmp_path))
