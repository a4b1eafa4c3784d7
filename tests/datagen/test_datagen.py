"""GPT-assisted instruction data: COCO annotations → teacher context, prompts with our seed examples, reply
parsing and checks, and the whole generation run against a stand-in teacher on 127.0.0.1 (good, malformed,
truncated, leaking and failing replies), with exact counts, usage, resume, and the data set read back by the
training pipeline."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import conversation as conv_lib
from llava_jax.datagen import coco, generate, parse, prompts
from llava_jax.datagen import __main__ as cli
from llava_jax import openai_client as oc
from tests.fixtures import tiny_model
from tests.fixtures.judge_stub import JudgeStub, Reply

CAPTIONS = {
    "images": [{"id": 1, "file_name": "000000000001.jpg", "width": 640, "height": 480},
               {"id": 2, "file_name": "000000000002.jpg", "width": 100, "height": 100},
               {"id": 3, "file_name": "000000000003.jpg", "width": 200, "height": 100},
               {"id": 4, "file_name": "000000000004.jpg", "width": 50, "height": 50}],  # no caption: skipped
    "annotations": [
        {"id": 11, "image_id": 1, "caption": "A man rides a horse on a beach."},
        {"id": 12, "image_id": 1, "caption": "  A person on a horse near the sea. "},
        {"id": 21, "image_id": 2, "caption": "A cat sits on a mat."},
        {"id": 22, "image_id": 2, "caption": "A grey cat indoors."},
        {"id": 31, "image_id": 3, "caption": "A dog runs in a park."},
        {"id": 32, "image_id": 3, "caption": ""},  # empty captions are dropped
    ]}
INSTANCES = {
    "images": CAPTIONS["images"],
    "categories": [{"id": 1, "name": "person"}, {"id": 19, "name": "horse"}, {"id": 38, "name": "kite"},
                   {"id": 18, "name": "dog"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [64, 48, 320, 240]},
        {"id": 2, "image_id": 1, "category_id": 19, "bbox": [128, 96, 384, 288]},
        {"id": 3, "image_id": 1, "category_id": 38, "bbox": [576, 432, 100, 100]},  # runs off the image: clipped
        {"id": 4, "image_id": 3, "category_id": 18, "bbox": [20, 10, 100, 50]},
    ]}
CONTEXT_1 = ("A man rides a horse on a beach.\nA person on a horse near the sea.\n\n"
             "person: [0.100, 0.100, 0.600, 0.600]\nhorse: [0.200, 0.200, 0.800, 0.800]\n"
             "kite: [0.900, 0.900, 1.000, 1.000]")


@pytest.fixture()
def coco_files(tmp_path):
  c, i = tmp_path / "captions.json", tmp_path / "instances.json"
  c.write_text(json.dumps(CAPTIONS))
  i.write_text(json.dumps(INSTANCES))
  return str(c), str(i)


def test_coco_context_text(coco_files):
  images = coco.load_coco(*coco_files)
  assert [im.image_id for im in images] == [1, 2, 3]
  assert images[0].text() == CONTEXT_1
  assert images[1].text() == "A cat sits on a mat.\nA grey cat indoors."
  assert images[2].text() == "A dog runs in a park.\n\ndog: [0.100, 0.100, 0.600, 0.600]"
  assert images[0].text(with_boxes=False) == "A man rides a horse on a beach.\nA person on a horse near the sea."
  assert images[0].stem == "000000000001"
  assert [im.image_id for im in coco.load_coco(coco_files[0], limit=2)] == [1, 2]
  assert coco.load_coco(coco_files[0])[0].boxes == ()
  with pytest.raises(ValueError, match="image id 9"):
    coco.load_coco(coco_files[0], image_ids=[9])


def test_messages_hold_the_seeds_as_in_context_examples():
  for kind in prompts.TYPES:
    msgs = prompts.build_messages(kind, CONTEXT_1)
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * len(prompts.SEEDS[kind]) + ["user"]
    assert msgs[0]["content"] == prompts.SYSTEM[kind] and msgs[-1]["content"] == CONTEXT_1
    assert len(prompts.SEEDS[kind]) >= 2
  with pytest.raises(ValueError, match="response type"):
    prompts.build_messages("chitchat", CONTEXT_1)
  with pytest.raises(ValueError, match="empty"):
    prompts.build_messages("detail", "  ")


@pytest.mark.parametrize("kind", prompts.TYPES)
def test_seed_replies_are_valid_samples_of_their_own_format(kind):
  """The in-context examples must themselves pass the parser and every check the generated data must pass."""
  for n, (ctx, reply) in enumerate(prompts.SEEDS[kind]):
    turns = parse.reply_to_conversations(kind, reply, f"seed{n}", image_position="front")
    assert parse.check_record({"id": f"seed{n}", "image": "x.jpg", "conversations": turns}) is None
    assert len(turns) >= 6 if kind == "conversation" else len(turns) == 2


def test_parse_qa_formats_and_errors():
  good = "Question:\nWhat is it?\n===\nAnswer:\nA horse.\n  ===  \nquestion: Where?\n===\nANSWER: On a beach."
  assert parse.parse_qa(good) == [("What is it?", "A horse."), ("Where?", "On a beach.")]
  cases = {
      "": "empty_reply",
      "Answer:\nA horse.\n===\nQuestion:\nWhat?": "bad_order",
      "Question:\nWhat?\n===\nAnswer:\n": "empty_turn",
      "Question:\nWhat?\n===\nAnswer:\nA.\n===\nQuestion:\nAnd?": "unanswered_question",
      "Question:\nWhat?\nAnswer:\nA horse.": "bad_format",  # no separator between the blocks
      "Here are some questions.": "bad_format",
  }
  for reply, reason in cases.items():
    with pytest.raises(parse.ReplyError) as err:
      parse.parse_qa(reply)
    assert err.value.reason == reason, reply


def test_image_placement_and_detail_instruction_are_stable():
  front = parse.place_image("What is it?", "front", "k")
  end = parse.place_image("What is it?", "end", "k")
  assert front == "<image>\nWhat is it?" and end == "What is it?\n<image>"
  chosen = [parse.place_image("Q?", "random", f"id{i}") for i in range(40)]
  assert set(chosen) == {"<image>\nQ?", "Q?\n<image>"}  # both placements occur, as in LLaVA-Instruct
  assert chosen == [parse.place_image("Q?", "random", f"id{i}") for i in range(40)]
  turns = parse.reply_to_conversations("detail", "A long description.", "000000000001-detail")
  question = turns[0]["value"].replace("<image>", "").strip()
  assert question in prompts.DETAIL_INSTRUCTIONS and turns[1] == {"from": "gpt", "value": "A long description."}
  assert turns == parse.reply_to_conversations("detail", "A long description.", "000000000001-detail")


@pytest.mark.parametrize("turns,reason", [
    ([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."},
      {"from": "human", "value": "<image>\nQ2?"}, {"from": "gpt", "value": "B."}], "image_placement"),
    ([{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}], "image_placement"),
    ([{"from": "human", "value": "Why <image> this?"}, {"from": "gpt", "value": "A."}], "image_placement"),
    ([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "  "}], "malformed_conversation"),
    ([{"from": "human", "value": "<image>\nQ?"}, {"from": "human", "value": "Q2?"}], "malformed_conversation"),
    ([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "See <image>."}],
     "malformed_conversation"),
    ([{"from": "human", "value": "<image>\nQ?"}], "malformed_conversation"),
    ([{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "A."}], "empty_question"),
    ([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "The bounding box shows a man."}],
     "mentions_context"),
    ([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "As the captions say, a man."}],
     "mentions_context"),
])
def test_check_record_rejections(turns, reason):
  problem = parse.check_record({"id": "x", "image": "x.jpg", "conversations": turns})
  assert problem is not None and problem.split(":")[0] == reason


# ------------------------------------------------------------------------------------------ a whole run

GOOD = {
    ("A man rides a horse on a beach.", "conversation"):
        "Question:\nWhat animal is the man riding?\n===\nAnswer:\nHe is riding a horse.\n===\n"
        "Question: Where are they?\n===\nAnswer: On a sandy beach by the sea.",
    ("A man rides a horse on a beach.", "detail"):
        "A man rides a brown horse along a sandy beach, with the sea behind him.",
    ("A man rides a horse on a beach.", "complex"):
        "Question:\nWhy might the rider choose the beach?\n===\nAnswer:\nFirm wet sand is easy for a horse to run on.",
    ("A cat sits on a mat.", "conversation"): "Question:\nWhat is this?\nAnswer:\nA cat.",   # no separator
    ("A cat sits on a mat.", "detail"): "The caption says a cat sits on a mat.",               # leaks the context
    ("A cat sits on a mat.", "complex"): "Question:\nWhy is the cat on the mat?\n===\nAnswer:\nIt is warm there.",
    ("A dog runs in a park.", "conversation"): Reply(text="Question:\nWhat is it?\n===\nAnswer:\nA dog that",
                                                     finish_reason="length"),
    ("A dog runs in a park.", "detail"): "",
}


def _kind_of(body):
  system = body["messages"][0]["content"]
  return next(k for k, v in prompts.SYSTEM.items() if v == system)


def make_teacher(state):
  def teacher(body, attempt):
    first_caption = body["messages"][-1]["content"].split("\n", 1)[0]
    key = (first_caption, _kind_of(body))
    if key == ("A cat sits on a mat.", "complex") and attempt == 0:
      return Reply(status=500)
    if key == ("A dog runs in a park.", "complex"):
      if not state.get("dog_complex_ok"):
        return Reply(status=503)
      return "Question:\nWhy is the dog running?\n===\nAnswer:\nIt is chasing a ball."
    return GOOD[key]
  return teacher


def test_generate_dataset_counts_usage_resume_and_training_pipeline(coco_files, tmp_path, tiny_tokenizer,
                                                                    tiny_tokenizer_dir):
  images = coco.load_coco(*coco_files)
  out = str(tmp_path / "gen")
  state = {}
  with JudgeStub(make_teacher(state)) as stub:
    client = oc.ChatClient(stub.base_url, "teacher", "", max_retries=1, backoff_base=0.001, concurrency=4)
    summary = generate.generate_dataset(images, client, out, image_prefix="coco/train2017/",
                                        image_position="front", price_prompt_per_1m=1.0,
                                        price_completion_per_1m=2.0, print_fn=None)
    assert len(stub.requests) == 9 + 1 + 1  # the cat's complex retried once, the dog's complex twice
    body = stub.requests[0]
    assert body["model"] == "teacher" and body["temperature"] == 0.7 and body["max_tokens"] == 1024
    assert summary["samples"] == 4 and summary["images"] == 3
    assert summary["types"] == {
        "conversation": {"requested": 3, "replied": 3, "accepted": 1, "rejected": 2, "turns": 2},
        "detail": {"requested": 3, "replied": 3, "accepted": 1, "rejected": 2, "turns": 1},
        "complex": {"requested": 3, "replied": 2, "accepted": 2, "rejected": 0, "turns": 2}}
    assert summary["rejected_by_reason"] == {"bad_format": 1, "mentions_context": 1, "truncated": 1,
                                             "empty_reply": 1}
    assert list(summary["request_failures"]) == ["000000000003-complex"]
    u = summary["usage_this_run"]
    assert (u["requests"], u["failures"], u["retries"], u["prompt_tokens"], u["completion_tokens"]) == \
           (8, 1, 2, 88, 56)
    assert summary["usage_dataset"]["cost"] == pytest.approx((88 * 1.0 + 56 * 2.0) / 1e6)
    assert json.load(open(os.path.join(out, "summary.json")))["samples"] == 4

    data = json.load(open(os.path.join(out, "llava_instruct.json")))
    assert [d["id"] for d in data] == ["000000000001-conversation", "000000000001-detail",
                                       "000000000001-complex", "000000000002-complex"]
    assert data[0] == {"id": "000000000001-conversation", "image": "coco/train2017/000000000001.jpg",
                       "conversations": [
                           {"from": "human", "value": "<image>\nWhat animal is the man riding?"},
                           {"from": "gpt", "value": "He is riding a horse."},
                           {"from": "human", "value": "Where are they?"},
                           {"from": "gpt", "value": "On a sandy beach by the sea."}]}
    assert data[3]["conversations"][1]["value"] == "It is warm there."
    rejected = {r["id"]: r for r in map(json.loads, open(os.path.join(out, "rejected.jsonl")))}
    assert rejected["000000000002-detail"]["reason"] == "mentions_context"
    assert rejected["000000000003-conversation"]["reason"] == "truncated"

    # resume: only the failed request is asked again; once it succeeds the data set grows by one
    n = len(stub.requests)
    state["dog_complex_ok"] = True
    client2 = oc.ChatClient(stub.base_url, "teacher", "", max_retries=1, backoff_base=0.001)
    again = generate.generate_dataset(images, client2, out, image_prefix="coco/train2017/",
                                      image_position="front", print_fn=None)
    assert len(stub.requests) == n + 1 and "A dog runs in a park." in stub.user_messages()[-1]
    assert again["samples"] == 5 and again["request_failures"] == {}
    assert again["usage_dataset"]["prompt_tokens"] == 9 * 11 and again["usage_this_run"]["requests"] == 1

  # the training side: the JSON source, the encoder and a pipeline batch with the tiny config
  from llava_jax import recipes
  from llava_jax.data import from_config
  from llava_jax.data.pipeline import make_pipeline
  from llava_jax.data.tokenize import encode_conversation
  image_root = tmp_path / "images"
  for d in json.load(open(os.path.join(out, "llava_instruct.json"))):
    path = image_root / d["image"]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(path)
  config = tiny_model.tiny_config(tiny_tokenizer_dir)
  config.data.source, config.data.json_path, config.data.image_root = "llava_json", os.path.join(
      out, "llava_instruct.json"), str(image_root)
  config.data.strict = True
  model_config = recipes.llava_config(config.model)
  source = from_config.build_source(config.data, model_config)
  assert len(source) == 5 and not source.malformed
  for i in range(len(source)):
    enc = encode_conversation(source[i]["conversations"], "vicuna_v1", tiny_tokenizer,
                              num_image_tokens=model_config.num_image_tokens, image_token_index=512, max_length=512)
    assert enc.num_images == 1 and enc.loss_mask.any()
  kwargs = from_config.pipeline_kwargs(config, model_config, tiny_tokenizer)
  batches = make_pipeline(source, seed=0, shuffle=False, num_epochs=1, global_batch_size=8, process_index=0,
                          process_count=1, **kwargs)
  batch = next(batches)
  assert sorted(x for row in batches.last_ids for x in row) == sorted(source[i]["id"] for i in range(5))
  assert batch["loss_mask"].sum() > 0
  assert not any(batches.skip_counts().values())


def test_cli_writes_a_dataset(coco_files, tmp_path, monkeypatch):
  monkeypatch.setenv("TEACHER_KEY", "sk-teacher")
  with JudgeStub(make_teacher({})) as stub:
    code = cli.main(["--captions", coco_files[0], "--instances", coco_files[1], "--out", str(tmp_path / "o"),
                     "--model", "teacher", "--base_url", stub.base_url, "--api_key_env", "TEACHER_KEY",
                     "--types", "detail,complex", "--limit", "1", "--max_retries", "0"])
    assert code == 0 and len(stub.requests) == 2 and stub.auth_headers == ["Bearer sk-teacher"] * 2
    assert {_kind_of(b) for b in stub.requests} == {"detail", "complex"}
    assert stub.requests[0]["messages"][-1]["content"] == CONTEXT_1
  data = json.load(open(tmp_path / "o" / "llava_instruct.json"))
  assert [d["id"] for d in data] == ["000000000001-detail", "000000000001-complex"]
  assert all(d["image"] == "000000000001.jpg" for d in data)
  conv_lib.normalize_turns(data[1]["conversations"])
