"""LLaVA-Bench with a pluggable judge: the chat client (retries, backoff, timeouts, usage, concurrency) against a
stand-in OpenAI-compatible judge on 127.0.0.1, the benchmark's file formats (COCO caps+boxes and In-the-Wild
captions), the judge request's layout, score parsing and the relative scores on hand-written fixtures, resume,
and `python -m llava_jax.main --mode=eval` end to end with a random tiny model and the --judge_* flags.

Expected layouts and numbers are derived by hand from LLaVA's llava/eval/eval_gpt_review_visual.py,
eval_gpt_review_bench.py (request) and summarize_gpt_review.py (the reference's averaging).
"""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from llava_jax.eval import llava_bench as lb
from llava_jax import openai_client as oc
from tests.fixtures import tiny_model
from tests.fixtures.judge_stub import JudgeStub, Reply

REPO = tiny_model.REPO


def _client(stub, **kw):
  kw = {"max_retries": 3, "backoff_base": 0.001, "timeout": 10, **kw}
  return oc.ChatClient(stub.base_url, "stub-judge", kw.pop("api_key", ""), **kw)


MSG = [{"role": "user", "content": "hello"}]


# ------------------------------------------------------------------------------------------ client


def test_client_retries_server_errors_and_counts_usage():
  with JudgeStub(lambda body, attempt: Reply(status=500) if attempt < 2 else "fine") as stub:
    client = _client(stub)
    res = client.chat(MSG, temperature=0.0)
    assert (res.text, res.attempts, res.prompt_tokens, res.completion_tokens) == ("fine", 3, 11, 7)
    assert len(stub.requests) == 3
    assert stub.requests[0]["model"] == "stub-judge" and stub.requests[0]["messages"] == MSG
    assert stub.requests[0]["temperature"] == 0.0
    u = client.usage
    assert (u.requests, u.retries, u.failures, u.prompt_tokens, u.completion_tokens) == (1, 2, 0, 11, 7)
    assert u.cost(prompt_per_1m=2.0, completion_per_1m=8.0) == pytest.approx((11 * 2 + 7 * 8) / 1e6)


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_does_not_retry_client_errors(status):
  with JudgeStub(lambda body, attempt: Reply(status=status)) as stub:
    client = _client(stub)
    with pytest.raises(oc.ChatError) as err:
      client.chat(MSG)
    assert err.value.status == status and not err.value.retryable
    assert len(stub.requests) == 1 and client.usage.failures == 1


@pytest.mark.parametrize("raw", ["this is not json", json.dumps({"choices": []}),
                                 json.dumps({"choices": [{"message": {"content": None}}]})])
def test_client_retries_malformed_replies_then_gives_up(raw):
  with JudgeStub(lambda body, attempt: Reply(raw=raw)) as stub:
    client = _client(stub, max_retries=2)
    with pytest.raises(oc.ChatError, match="reply"):
      client.chat(MSG)
    assert len(stub.requests) == 3
    assert (client.usage.requests, client.usage.failures, client.usage.retries) == (0, 1, 2)


def test_client_backoff_is_exponential_and_honours_retry_after():
  delays = []
  with JudgeStub(lambda body, attempt: Reply(status=503)) as stub:
    client = oc.ChatClient(stub.base_url, "m", "", max_retries=4, backoff_base=1.0, backoff_max=5.0,
                           sleep=delays.append, seed=0)
    with pytest.raises(oc.ChatError):
      client.chat(MSG)
  assert len(delays) == 4
  for k, d in enumerate(delays):  # min(max, base * 2^k) * U(0.5, 1)
    cap = min(5.0, 2.0 ** k)
    assert 0.5 * cap <= d <= cap
  delays.clear()
  with JudgeStub(lambda body, attempt: Reply(status=429, headers={"Retry-After": "0.25"}) if attempt == 0
                 else "ok") as stub:
    client = oc.ChatClient(stub.base_url, "m", "", backoff_base=1.0, sleep=delays.append)
    assert client.chat(MSG).text == "ok"
  assert delays == [0.25]


def test_client_times_out_and_retries():
  def slow_first(body, attempt):
    if attempt == 0:
      time.sleep(1.5)
    return "late but fine"

  with JudgeStub(slow_first) as stub:
    client = _client(stub, timeout=0.4)
    res = client.chat(MSG)
  assert res.text == "late but fine" and res.attempts == 2


def test_client_retries_a_reply_cut_short():
  with JudgeStub(lambda body, attempt: Reply(text="whole", cut_short=attempt == 0)) as stub:
    res = _client(stub).chat(MSG)
  assert res.text == "whole" and res.attempts == 2


def test_client_sends_the_key_only_as_a_bearer_token(monkeypatch):
  monkeypatch.delenv(oc.API_KEY_ENV, raising=False)
  with JudgeStub(lambda body, attempt: "ok") as stub:
    keyed = oc.ChatClient(stub.base_url, "m", "sk-test-123")
    keyed.chat(MSG)
    oc.ChatClient(stub.base_url, "m").chat(MSG)  # no key anywhere: no header
    monkeypatch.setenv(oc.API_KEY_ENV, "sk-from-env")
    oc.ChatClient(stub.base_url, "m").chat(MSG)
    assert stub.auth_headers == ["Bearer sk-test-123", None, "Bearer sk-from-env"]
    assert "sk-test" not in repr(keyed) and all("sk-" not in json.dumps(b) for b in stub.requests)


def test_client_settings_from_environment_and_errors(monkeypatch):
  monkeypatch.setenv(oc.BASE_URL_ENV, "http://127.0.0.1:9/v1/")
  c = oc.ChatClient(model="m")
  assert c.url == "http://127.0.0.1:9/v1/chat/completions"
  with pytest.raises(ValueError, match="model"):
    oc.ChatClient("http://127.0.0.1:9/v1", "")
  with pytest.raises(ValueError, match="http"):
    oc.ChatClient("ftp://example/v1", "m")
  with pytest.raises(ValueError, match="role"):
    c.chat([{"role": "robot", "content": "x"}])
  with pytest.raises(ValueError, match="judge model"):
    oc.client_from_settings(oc.judge_settings())


def test_client_unreachable_endpoint_is_a_retryable_failure():
  import socket
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()  # nothing listens there now
  client = oc.ChatClient(f"http://127.0.0.1:{port}/v1", "m", "", max_retries=1, backoff_base=0.001, timeout=2)
  with pytest.raises(oc.ChatError, match="cannot reach") as err:
    client.chat(MSG)
  assert err.value.retryable and err.value.attempts == 2


def test_map_runs_concurrently_in_order_with_callbacks():
  lock, state = threading.Lock(), {"now": 0, "max": 0}

  def reply(body, attempt):
    with lock:
      state["now"] += 1
      state["max"] = max(state["max"], state["now"])
    time.sleep(0.3)
    with lock:
      state["now"] -= 1
    text = body["messages"][-1]["content"]
    return Reply(status=500) if text == "q3" and attempt == 0 else "re:" + text

  seen = []
  with JudgeStub(reply) as stub:
    client = _client(stub, concurrency=3)
    out = client.map([[{"role": "user", "content": f"q{i}"}] for i in range(6)],
                     on_result=lambda i, r: seen.append((i, r.text)))
  assert [r.text for r in out] == [f"re:q{i}" for i in range(6)]
  assert sorted(seen) == [(i, f"re:q{i}") for i in range(6)]
  assert 2 <= state["max"] <= 3
  assert client.usage.requests == 6 and client.usage.retries == 1


# ------------------------------------------------------------------------------------------ COCO fixture

COCO_QUESTIONS = [
    {"question_id": 0, "image": "000000000001.jpg", "text": "What is the man holding?", "category": "conv"},
    {"question_id": 1, "image": "000000000001.jpg", "text": "Is it raining?", "category": "conv"},
    {"question_id": 2, "image": "000000000001.jpg", "text": "Describe the image in detail.", "category": "detail"},
    {"question_id": 3, "image": "000000000002.jpg", "text": "What is shown, in detail?", "category": "detail"},
    {"question_id": 4, "image": "000000000002.jpg", "text": "Why is the dog wet?", "category": "complex"},
    {"question_id": 5, "image": "000000000002.jpg", "text": "What might happen next?", "category": "complex"},
]
COCO_CONTEXT = [
    {"id": "1", "image": "000000000001.jpg", "captions": ["A man holds an umbrella.", "A person in the rain."],
     "instances": [{"id": 7, "category": "person", "bbox": [0.1, 0.2, 0.5, 0.9]},
                   {"id": 8, "category": "umbrella", "bbox": [0.05, 0.0, 0.6, 0.3]}]},
    {"id": "2", "image": "000000000002.jpg", "captions": ["A wet dog on a beach."],
     "instances": [{"id": 9, "category": "dog", "bbox": [0.3, 0.4, 0.7, 0.8]}]},
]
REFERENCE = {0: "He is holding an umbrella.", 1: "Yes, it is raining.", 2: "A man with an umbrella in the rain.",
             3: "A wet dog stands on a beach.", 4: "It has been swimming.", 5: "It will shake itself dry."}
OURS = {str(q): f"our answer {q}" for q in REFERENCE}
JUDGE = {  # by question: the judge's review (q3 unparsable; q4 fails once with a 500 first)
    "What is the man holding?": "8 6\nAssistant 1 names the umbrella; Assistant 2 is vague.",
    "Is it raining?": "7, 7\nBoth are right.",
    "Describe the image in detail.": "9 3\nAssistant 2 misses most of the scene.",
    "What is shown, in detail?": "Scores: 8 and 5\nAssistant 1 is better.",
    "Why is the dog wet?": "10 8\nBoth reason well.",
    "What might happen next?": "6 9\nAssistant 2 is more thorough.",
}


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


@pytest.fixture()
def coco_bench(tmp_path):
  q = _write_jsonl(tmp_path / "qa90_questions.jsonl", COCO_QUESTIONS)
  c = _write_jsonl(tmp_path / "caps_boxes_coco2014_val_80.jsonl", COCO_CONTEXT)
  a = _write_jsonl(tmp_path / "qa90_gpt4_answer.jsonl",
                   [{"question_id": k, "prompt": "p", "text": v, "answer_id": f"ref{k}", "model_id": "gpt-4-0314",
                     "metadata": {}} for k, v in REFERENCE.items()])
  return q, c, a


def _question_of(content):
  return content.split("[Question]\n", 1)[1].split("\n\n", 1)[0]


def coco_judge(body, attempt):
  q = _question_of(body["messages"][-1]["content"])
  if q == "Why is the dog wet?" and attempt == 0:
    return Reply(status=500)
  return JUDGE[q]


def test_judge_request_layout_coco(coco_bench):
  items = lb.load_bench(*coco_bench)
  assert [(i.qid, i.category, i.rule_key) for i in items][:3] == [(0, "conv", "conv"), (1, "conv", "conv"),
                                                                  (2, "detail", "detail")]
  expected = ("[Context]\nA man holds an umbrella.\nA person in the rain.\n\n"
              "person: [0.1, 0.2, 0.5, 0.9]\numbrella: [0.05, 0.0, 0.6, 0.3]\n\n"
              "[Question]\nWhat is the man holding?\n\n"
              "[Assistant 1]\nHe is holding an umbrella.\n\n[End of Assistant 1]\n\n"
              "[Assistant 2]\nour answer 0\n\n[End of Assistant 2]\n\n"
              "[System]\n" + lb.RULES["conv"]["prompt"] + "\n\n")
  assert lb.judge_content(items[0], "our answer 0", lb.RULES["conv"]) == expected
  assert items[0].reference_id == "ref0"


@pytest.mark.parametrize("text,scores", [
    ("8 6\nwhy", (8.0, 6.0)), ("7, 7", (7.0, 7.0)), ("8.5 9\n", (8.5, 9.0)), ("8,6", (8.0, 6.0)),
    ("8  6", (8.0, 6.0)),            # the reference's split(' ') would fail here; whitespace runs are fine
    ("8 6 7", None), ("Scores: 8 and 5", None), ("nan 5", None), ("inf 1", None), ("", None), ("8\n6", None),
    ("\n8 6", None),                 # the scores must be on the first line
])
def test_parse_scores(text, scores):
  assert lb.parse_scores(text) == scores


def _ref_parse_score(review):
  """LLaVA's llava/eval/eval_gpt_review_bench.py `parse_score`, as written there (the oracle)."""
  try:
    score_pair = review.split('\n')[0]
    score_pair = score_pair.replace(',', ' ')
    sp = score_pair.split(' ')
    if len(sp) == 2:
      return [float(sp[0]), float(sp[1])]
    return [-1, -1]
  except Exception:  # noqa: BLE001
    return [-1, -1]


def _ref_summarize(tuples):
  """summarize_gpt_review.py's printed relative score for one group of review tuples."""
  stats = [round(x, 3) for x in np.asarray(tuples).mean(0).tolist()]
  return round(stats[1] / stats[0] * 100, 1)


@pytest.mark.parametrize("text", ["8 6\nwhy", "7, 7", "8 7 ", "8  6", "8,6", " 8 6", "8\t6", "8 6 7", "nan 5",
                                  "Scores: 8 and 5", "", "\n8 6", "8.5 9\n", None])
def test_reference_parse_score_is_the_references(text):
  """`reference_method` is computed with the reference's own parse_score: "8, 7" and "8 7 " give (-1, -1) there."""
  got, want = lb.reference_parse_score(text), _ref_parse_score(text)
  assert got == want or (np.isnan(got[0]) and np.isnan(want[0]) and got[1] == want[1])
  if text in ("7, 7", "8 7 ", "8  6"):
    assert got == [-1, -1] and lb.parse_scores(text) is not None  # ours reads these; the reference does not


def test_review_exact_numbers_and_resume(coco_bench, tmp_path):
  items = lb.load_bench(*coco_bench)
  out = tmp_path / "out"
  with JudgeStub(coco_judge) as stub:
    client = _client(stub, concurrency=3)
    report = lb.review_and_summarize(items, {k: {"text": v, "answer_id": f"ours{k}"} for k, v in OURS.items()},
                                     client, str(out), print_fn=lambda s: None)
    assert len(stub.requests) == 7  # six reviews, one retried
    body = stub.requests[0]
    assert body["messages"][0] == {"role": "system", "content": lb.JUDGE_SYSTEM}
    assert body["temperature"] == 0.2 and body["max_tokens"] == 1024
    s = report["summary"]
    # reference_method: the reference's parse_score reads "7, 7" as (-1, -1) (split(' ') → '7', '', '7')
    assert s["conv"] == {"n": 2, "parsed": 2, "parse_failures": 0, "reference_mean": 7.5, "model_mean": 6.5,
                         "relative": pytest.approx(6.5 / 7.5 * 100), "reference_method": 71.4}  # 2.5 / 3.5
    assert s["detail"] == {"n": 2, "parsed": 1, "parse_failures": 1, "reference_mean": 9.0, "model_mean": 3.0,
                           "relative": pytest.approx(100 / 3), "reference_method": 25.0}
    assert s["complex"]["relative"] == pytest.approx(8.5 / 8 * 100) and s["complex"]["reference_method"] == 106.2
    assert s["overall"]["parsed"] == 5 and s["overall"]["parse_failures"] == 1
    assert s["overall"]["relative"] == pytest.approx(6.6 / 8.0 * 100)
    assert s["overall"]["reference_method"] == 77.4  # (-1, -1) twice averaged in: 4.0 / 5.167
    reviews = {q: JUDGE[q] for q in JUDGE}
    by_cat = {"conv": ["What is the man holding?", "Is it raining?"],
              "detail": ["Describe the image in detail.", "What is shown, in detail?"],
              "complex": ["Why is the dog wet?", "What might happen next?"]}
    for cat, qs in by_cat.items():
      assert s[cat]["reference_method"] == _ref_summarize([_ref_parse_score(reviews[q]) for q in qs])
    assert s["overall"]["reference_method"] == _ref_summarize([_ref_parse_score(r) for r in reviews.values()])
    assert report["parse_failures"] == ["3"] and report["request_failures"] == {} and report["unanswered"] == []
    lines = [json.loads(l) for l in open(out / "reviews.jsonl")]
    by_q = {l["question_id"]: l for l in lines}
    assert by_q[3]["tuple"] == [-1, -1] and by_q[3]["parsed"] is False and by_q[0]["tuple"] == [8.0, 6.0]
    assert by_q[1]["tuple"] == [-1, -1] and by_q[1]["scores"] == [7.0, 7.0] and by_q[1]["parsed"] is True
    assert (by_q[0]["id"], by_q[0]["answer1_id"], by_q[0]["answer2_id"], by_q[0]["category"]) == \
           (1, "ref0", "ours0", "conv")

    # resume: nothing is asked again; a changed answer is asked again alone and replaces its stale review
    n = len(stub.requests)
    again = lb.review_and_summarize(items, {k: {"text": v, "answer_id": f"ours{k}"} for k, v in OURS.items()},
                                    _client(stub), str(out), print_fn=lambda s: None)
    assert len(stub.requests) == n and again["summary"] == report["summary"]
    changed = dict(OURS, **{"5": "a better answer"})
    lb.review_and_summarize(items, {k: {"text": v} for k, v in changed.items()}, _client(stub), str(out),
                            print_fn=lambda s: None)
    assert len(stub.requests) == n + 1 and "a better answer" in stub.user_messages()[-1]
    assert len(open(out / "reviews.jsonl").read().splitlines()) == 6


def test_failed_requests_and_missing_answers_are_reported_not_scored(coco_bench, tmp_path):
  items = lb.load_bench(*coco_bench)

  def judge(body, attempt):
    q = _question_of(body["messages"][-1]["content"])
    return Reply(status=502) if q == "Is it raining?" else JUDGE[q].replace("Scores: 8 and 5", "8 5")

  answers = {k: {"text": v} for k, v in OURS.items() if k != "2"}
  with JudgeStub(judge) as stub:
    report = lb.review_and_summarize(items, answers, _client(stub, max_retries=1), str(tmp_path),
                                     print_fn=lambda s: None)
  assert list(report["request_failures"]) == ["1"] and report["unanswered"] == ["2"]
  s = report["summary"]
  assert s["conv"]["n"] == 1 and s["detail"]["n"] == 1 and s["overall"]["n"] == 4
  assert s["overall"]["relative"] == pytest.approx((6 + 5 + 8 + 9) / (8 + 8 + 10 + 6) * 100)


def test_rule_file_in_the_reference_format(coco_bench, tmp_path):
  rules = {c: {"role": "Reviewer", "prompt": f"Rate the {c} answers."} for c in lb.CATEGORIES}
  path = tmp_path / "rule.json"
  path.write_text(json.dumps(rules))
  loaded = lb.load_rules(str(path))
  items = lb.load_bench(*coco_bench)
  content = lb.judge_content(items[4], "x", loaded[items[4].rule_key])
  assert "[Reviewer 1]\nIt has been swimming.\n\n[End of Reviewer 1]" in content
  assert content.endswith("[System]\nRate the complex answers.\n\n")
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"conv": {"prompt": "no role"}}))
  with pytest.raises(ValueError, match="role"):
    lb.load_rules(str(bad))
  with pytest.raises(ValueError, match="no rule 'llava_bench_conv'"):
    wild = [lb.BenchItem(1, 0, "a.jpg", "q", "conv", "llava_bench_conv", "ctx", "ref", 0)]
    lb.review_answers(wild, {"0": {"text": "x"}}, oc.ChatClient("http://127.0.0.1:9/v1", "m"), str(tmp_path / "r"),
                      rules={"conv": rules["conv"]})


def test_load_bench_rejects_broken_files(coco_bench, tmp_path):
  q, c, a = coco_bench
  missing = _write_jsonl(tmp_path / "a2.jsonl", [{"question_id": 0, "text": "x"}])
  with pytest.raises(ValueError, match="no answer text for question 1"):
    lb.load_bench(q, c, missing)
  badcat = _write_jsonl(tmp_path / "q2.jsonl", [dict(COCO_QUESTIONS[0], category="chat")])
  with pytest.raises(ValueError, match="category 'chat'"):
    lb.load_bench(badcat, c, a)
  noctx = _write_jsonl(tmp_path / "q3.jsonl", [dict(COCO_QUESTIONS[0], image="nope.jpg")])
  with pytest.raises(ValueError, match="no context for image 'nope.jpg'"):
    lb.load_bench(noctx, c, a)
  (tmp_path / "broken.jsonl").write_text('{"question_id": 0}\nnot json\n')
  with pytest.raises(ValueError, match="broken.jsonl:2"):
    lb.load_bench(str(tmp_path / "broken.jsonl"), c, a)


# ------------------------------------------------------------------------------------------ --mode=eval (CLI)

WILD_QUESTIONS = [
    {"question_id": 0, "image": "001.jpg", "text": "What colour is the square?", "category": "conv"},
    {"question_id": 1, "image": "001.jpg", "text": "Describe this picture in detail.", "category": "detail"},
    {"question_id": 2, "image": "002.jpg", "text": "Why would someone draw this?", "category": "complex"},
]
WILD_JUDGE = {"What colour is the square?": "9 4\nok", "Describe this picture in detail.": "I'd give 9 and 4",
              "Why would someone draw this?": "8 8\nok"}
CONFIG_FILE = '''
from tests.fixtures import tiny_model
from llava_jax.recipes import llava_bench_eval_section


def get_config():
  c = tiny_model.tiny_config({tok!r})
  c.eval = llava_bench_eval_section(max_new_tokens=4, batch_size=4)
  return c
'''


def test_mode_eval_llava_bench_cli(tmp_path, tiny_tokenizer_dir):
  bench = tmp_path / "llava-bench-in-the-wild"
  (bench / "images").mkdir(parents=True)
  for i, name in enumerate(("001.jpg", "002.jpg")):
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (30 + i, 50, 3), dtype=np.uint8)).save(
        bench / "images" / name)
  q = _write_jsonl(bench / "questions.jsonl", WILD_QUESTIONS)
  c = _write_jsonl(bench / "context.jsonl", [{"id": "001", "image": "001.jpg", "caption": "A red square on white."},
                                             {"id": "002", "image": "002.jpg", "caption": ["A sketch.", "Lines."]}])
  a = _write_jsonl(bench / "answers_gpt4.jsonl", [{"question_id": i, "text": f"reference {i}", "answer_id": f"g{i}"}
                                                  for i in range(3)])
  rules = {f"llava_bench_{k}": {"role": "Assistant", "prompt": f"Judge {k}."} for k in lb.CATEGORIES}
  (bench / "rule.json").write_text(json.dumps(rules))
  cfg = tmp_path / "bench_config.py"
  cfg.write_text(CONFIG_FILE.format(tok=tiny_tokenizer_dir))
  config = tiny_model.tiny_config(tiny_tokenizer_dir)
  params = tiny_model.save_random_params(config, str(tmp_path / "params"), seed=5)
  workdir = tmp_path / "run"

  def judge(body, attempt):
    return WILD_JUDGE[_question_of(body["messages"][-1]["content"])]

  with JudgeStub(judge) as stub:
    env = dict(os.environ, JAX_PLATFORMS="cpu", OPENAI_API_KEY="sk-test-cli")
    env.pop("XLA_FLAGS", None)
    env.pop(oc.BASE_URL_ENV, None)
    cmd = [sys.executable, "-m", "llava_jax.main", f"--config={cfg}", "--mode=eval", f"--checkpoint={params}",
           f"--workdir={workdir}", f"--judge_base_url={stub.base_url}", "--judge_model=stub-judge",
           f"--config.eval.questions={q}", f"--config.eval.context={c}", f"--config.eval.reference_answers={a}",
           f"--config.eval.image_root={bench / 'images'}", f"--config.eval.rule_file={bench / 'rule.json'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(stub.requests) == 3 and stub.auth_headers == ["Bearer sk-test-cli"] * 3
    assert {b["model"] for b in stub.requests} == {"stub-judge"}
    contents = {_question_of(m): m for m in stub.user_messages()}

  out = workdir / "eval" / "llava_bench"
  answers = {l["question_id"]: l for l in map(json.loads, open(out / "answers.jsonl"))}
  assert sorted(answers) == [0, 1, 2] and answers[0]["prompt"] == "What colour is the square?"
  # the judge saw the wild layout (captions, no boxes), the reference as Assistant 1, our answer as Assistant 2
  assert contents["What colour is the square?"] == (
      "[Context]\nA red square on white.\n\n[Question]\nWhat colour is the square?\n\n"
      "[Assistant 1]\nreference 0\n\n[End of Assistant 1]\n\n"
      f"[Assistant 2]\n{answers[0]['text']}\n\n[End of Assistant 2]\n\n[System]\nJudge conv.\n\n")
  assert contents["Why would someone draw this?"].startswith("[Context]\nA sketch.\nLines.\n\n[Question]")
  report = json.load(open(out / "report.json"))
  s = report["summary"]
  assert s["conv"]["relative"] == pytest.approx(4 / 9 * 100)
  assert s["detail"]["parse_failures"] == 1 and s["detail"]["relative"] is None
  assert s["complex"]["relative"] == pytest.approx(100.0)
  assert s["overall"]["relative"] == pytest.approx(6 / 8.5 * 100) and s["overall"]["reference_method"] == 68.8
  assert report["judge"]["model"] == "stub-judge" and report["judge"]["usage"]["requests"] == 3
  assert "relative" in proc.stdout and "conversation" in proc.stdout


def test_the_project_server_as_the_judge(coco_bench, tmp_path, tiny_tokenizer_dir):
  """Our client against our own OpenAI-compatible server (a random tiny model as the 'judge'): every request
  is answered with a well-formed completion and usage, and its reviews are scored by the same rules."""
  from llava_jax.infer.loading import load_for_inference
  from llava_jax.infer.openai_api import Limits
  from llava_jax.infer.server import ServerOptions, ServerThread
  config = tiny_model.tiny_config(tiny_tokenizer_dir)
  params = tiny_model.save_random_params(config, str(tmp_path / "params"), seed=7)
  model = load_for_inference(config, checkpoint=params, workdir=str(tmp_path), mesh=None)
  rules = {c: {"role": "Assistant", "prompt": "Two scores."} for c in lb.CATEGORIES}
  items = lb.load_bench(*coco_bench)
  options = ServerOptions(port=0, limits=Limits(max_output_tokens=8, default_max_tokens=4), max_batch_size=4,
                          batch_window_s=0.2)
  with ServerThread(model, options) as srv:
    client = oc.ChatClient(srv.url + "/v1", model.name, "", max_retries=0, timeout=300, concurrency=3)
    report = lb.review_and_summarize(items, {k: {"text": v} for k, v in OURS.items()}, client, str(tmp_path),
                                     rules=rules, max_tokens=4, print_fn=lambda s: None)
  assert report["request_failures"] == {} and report["summary"]["overall"]["n"] == 6
  reviews = [json.loads(l) for l in open(tmp_path / "reviews.jsonl")]
  assert len(reviews) == 6
  for r in reviews:
    assert r["model"] == model.name and isinstance(r["content"], str)
    assert 1 <= r["usage"]["completion_tokens"] <= 4 and r["usage"]["prompt_tokens"] > 20
    assert r["parsed"] == (lb.parse_scores(r["content"]) is not None)
  assert client.usage.requests == 6 and client.usage.usage_missing == 0
