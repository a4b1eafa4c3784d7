"""Templates render exactly the reference's strings (the original LLaVA's llava/conversation.py, its
`get_prompt`); the registry; turn validation with reasons."""
import pytest

from llava_jax.data import conversation as C
from llava_jax.data.errors import SampleError

# The reference's system texts, spelled out here independently of the module under test.
SYS_HUMAN = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
             "helpful, detailed, and polite answers to the human's questions.")
SYS_USER = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the user's questions.")
SYS_LLAVA_LLAMA_2 = ("You are a helpful language and vision assistant. You are able to understand the visual "
                     "content that the user provides, and assist the user with a variety of tasks using natural "
                     "language.")
SYS_LLAMA_2_START = "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible"

CONV = [
    {"from": "human", "value": "What is in the picture?\n<image>"},  # image last: moved to the front
    {"from": "gpt", "value": "A red square."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "On the left."},
]


def _oracle_prompt(style, system, roles, sep, sep2, messages):
  """The reference's `Conversation.get_prompt` rules, rewritten here as the oracle. `messages` are
  (role, text or None) after the reference's image move."""
  if style == "single":
    out = system + sep
    for role, msg in messages:
      out += f"{role}: {msg}{sep}" if msg else f"{role}:"
    return out
  if style == "two":
    out = system + sep
    for i, (role, msg) in enumerate(messages):
      out += f"{role}: {msg}{(sep, sep2)[i % 2]}" if msg else f"{role}:"
    return out
  if style == "llama_2":
    out = ""
    for i, (role, msg) in enumerate(messages):
      if not msg:
        continue
      if i == 0:
        msg = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + msg
      out += sep + f"[INST] {msg} [/INST]" if i % 2 == 0 else f" {msg} {sep2}"
    return out.lstrip(sep)
  raise ValueError(style)


def _oracle_v0_training(system, turns):
  """The reference's generic `preprocess` text for v0 (llava/train/train.py `_add_speaker_and_signal`): header
  `system + "\\n\\n"`, each turn `"### " + role + ": " + value + "\\n"`, then a final `"### "`; `turns` after the
  reference's image move."""
  out = f"{system}\n\n"
  for t in turns:
    role = {"human": "Human", "gpt": "Assistant"}[t["from"]]
    out += "### " + role + ": " + t["value"] + "\n"
  return out + "### "


# The reference's conv_vicuna_v0.messages (llava/conversation.py), spelled out independently of the module.
V0_EXAMPLE_Q = "What are the key differences between renewable and non-renewable energy sources?"
V0_EXAMPLE_A_START = "Renewable energy sources are those that can be replenished naturally in a relatively short amount"
V0_EXAMPLE_A_END = ("6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
                    "non-renewable sources are not, and their depletion can lead to economic and social instability.\n")


def _oracle_move(value):
  """The reference's preprocess_multimodal on one turn holding `<image>`."""
  if "<image>" not in value:
    return value
  return ("<image>\n" + value.replace("<image>", "").strip()).strip()


ORACLE = {
    "vicuna_v1": ("two", SYS_USER, ("USER", "ASSISTANT"), " ", "</s>"),
    "llava_v1": ("two", SYS_HUMAN, ("USER", "ASSISTANT"), " ", "</s>"),
    "llava_llama_2": ("llama_2", SYS_LLAVA_LLAMA_2, ("USER", "ASSISTANT"), "<s>", "</s>"),
    "llama_2": ("llama_2", C.SYSTEM_LLAMA_2, ("USER", "ASSISTANT"), "<s>", "</s>"),
}


def test_exact_strings_written_out():
  img_q = "<image>\nWhat is in the picture?"
  assert C.prompt_text(C.render(CONV, "vicuna_v1")) == (
      SYS_USER + " USER: " + img_q + " ASSISTANT: A red square.</s>USER: Where is it? ASSISTANT: On the left.</s>")
  assert C.prompt_text(C.render(CONV, "llava_v1")) == (
      SYS_HUMAN + " USER: " + img_q + " ASSISTANT: A red square.</s>USER: Where is it? ASSISTANT: On the left.</s>")
  assert C.prompt_text(C.render(CONV, "vicuna_v0")) == (  # v0 training text (see test_v0_training_text)
      SYS_HUMAN + "\n\n### Human: " + img_q + "\n### Assistant: A red square.\n### Human: Where is it?\n"
      "### Assistant: On the left.\n### ")
  assert C.generation_prompt(CONV[:3], "llava_v0") == (  # v0 inference prompt (conv_llava_v0: no example)
      SYS_HUMAN + "###Human: " + img_q + "###Assistant: A red square.###Human: Where is it?###Assistant:")
  assert C.prompt_text(C.render(CONV, "llava_llama_2")) == (
      "[INST] <<SYS>>\n" + SYS_LLAVA_LLAMA_2 + "\n<</SYS>>\n\n" + img_q + " [/INST] A red square. </s>"
      "<s>[INST] Where is it? [/INST] On the left. </s>")
  llama2 = C.prompt_text(C.render(CONV, "llama_2"))
  assert llama2.startswith("[INST] <<SYS>>\n" + SYS_LLAMA_2_START)
  assert "while being safe.  Your answers" in llama2  # the reference's double space
  assert llama2.endswith("please don't share false information.\n<</SYS>>\n\n" + img_q +
                         " [/INST] A red square. </s><s>[INST] Where is it? [/INST] On the left. </s>")
  assert C.prompt_text(C.render(CONV[:2], "plain")) == "<image>A red square.\n"
  assert C.prompt_text(C.render(CONV, "chatml")) == (
      "<|im_start|>system\n" + C.SYSTEM_CHATML + "<|im_end|>\n<|im_start|>user\n" + img_q + "<|im_end|>\n"
      "<|im_start|>assistant\nA red square.<|im_end|>\n<|im_start|>user\nWhere is it?<|im_end|>\n"
      "<|im_start|>assistant\nOn the left.<|im_end|>\n")


CASES = [
    CONV,
    [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A cat\non a mat."}],
    [{"from": "human", "value": "  Describe <image> it. "}, {"from": "gpt", "value": "Ünïcødé 日本語 😀"}],
    [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "Only an image."}],
    [{"from": "human", "value": "Text only?"}, {"from": "gpt", "value": "Yes."},
     {"from": "human", "value": "Say ASSISTANT: and ### and </s>"}, {"from": "gpt", "value": "ASSISTANT: ###"},
     {"from": "human", "value": "  spaced  "}, {"from": "gpt", "value": " lead and trail "}],
]


@pytest.mark.parametrize("name", sorted(ORACLE))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference_get_prompt(name, case):
  style, system, roles, sep, sep2 = ORACLE[name]
  turns = CASES[case]
  msgs = [(roles[i % 2], _oracle_move(t["value"])) for i, t in enumerate(turns)]
  assert C.prompt_text(C.render(turns, name)) == _oracle_prompt(style, system, roles, sep, sep2, msgs)
  # Generation prompt = the reference's prompt with an empty last assistant message.
  gen_msgs = msgs[:-1] + [(roles[1], None)]
  assert C.generation_prompt(turns[:-1], name) == _oracle_prompt(style, system, roles, sep, sep2, gen_msgs)


def test_generation_prompt_endings():
  q = CONV[:3]
  assert C.generation_prompt(q, "vicuna_v1").endswith("USER: Where is it? ASSISTANT:")
  assert C.generation_prompt(q, "vicuna_v0").endswith("###Human: Where is it?###Assistant:")
  assert C.generation_prompt(q, "llava_llama_2").endswith("</s><s>[INST] Where is it? [/INST]")
  assert C.generation_prompt(q, "chatml").endswith("<|im_start|>user\nWhere is it?<|im_end|>\n<|im_start|>assistant\n")
  assert C.generation_prompt(CONV[:1], "plain") == "<image>\nWhat is in the picture?\n"  # PLAIN get_prompt
  assert C.generation_prompt([{"from": "human", "value": "<image>"}], "plain") == "<image>"
  for name in ("vicuna_v1", "vicuna_v0", "llama_2", "chatml"):
    assert C.generation_prompt(q, name).endswith(C.get_template(name).generation_prefix)


def test_stop_strings():
  assert C.stop_strings("vicuna_v1") == ("</s>",)
  assert C.stop_strings("llava_v1") == ("</s>",)
  assert C.stop_strings("vicuna_v0") == ("###",)
  assert C.stop_strings("llama_2") == ("</s>",)
  assert C.stop_strings("chatml") == ("<|im_end|>",)
  assert C.stop_strings("plain") == ("\n",)


@pytest.mark.parametrize("name", ["vicuna_v0", "vicuna_v1", "llava_v1", "llama_2", "llava_llama_2", "chatml"])
def test_segments_supervise_answers_and_stops_only(name):
  segs = C.render(CASES[4], name)
  tpl = C.get_template(name).training_format
  sup = [s for s in segs if s.supervised]
  answers = [t["value"] for t in CASES[4][1::2]]
  assert [s.text for s in sup] == [x for a in answers for x in (tpl.reply_prefix + a, tpl.stop)]
  assert all(s.role == "assistant" for s in sup)
  assert [s.kind for s in sup] == ["text", "stop"] * len(answers)
  assert all(not s.supervised for s in segs if s.role in ("user", "system"))
  # The user's literal "ASSISTANT:" / "###" / "</s>" stays in one unsupervised user segment.
  assert any(s.text == "Say ASSISTANT: and ### and </s>" and s.role == "user" and not s.supervised for s in segs)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("name", ["vicuna_v0", "v0", "llava_v0", "default"])
def test_v0_training_text_is_the_references_preprocess(name, case):
  """v0 trains on the reference's generic `preprocess` string, not on its inference prompt."""
  turns = CASES[case]
  moved = [dict(t, value=_oracle_move(t["value"])) for t in turns]
  assert C.prompt_text(C.render(turns, name)) == _oracle_v0_training(SYS_HUMAN, moved)
  # What the loss sees: each answer (after the ' ' of 'Assistant: ') and the '\n###' the model must emit.
  sup = [s.text for s in C.render(turns, name) if s.supervised]
  assert sup == [x for t in turns[1::2] for x in (" " + t["value"], "\n###")]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_v0_inference_prompt_has_the_references_worked_example(case):
  """v0 / default (conv_vicuna_v0) start with its two-message example; llava_v0 (conv_llava_v0) has none."""
  turns = CASES[case][:-1]
  msgs = [(("Human", "Assistant")[i % 2], _oracle_move(t["value"])) for i, t in enumerate(turns)]
  plain = _oracle_prompt("single", SYS_HUMAN, None, "###", None, msgs + [("Assistant", None)])
  assert C.generation_prompt(turns, "llava_v0") == plain
  example = C.get_template("v0").examples
  assert len(example) == 1 and example[0][0] == V0_EXAMPLE_Q
  assert example[0][1].startswith(V0_EXAMPLE_A_START) and example[0][1].endswith(V0_EXAMPLE_A_END)
  with_example = _oracle_prompt("single", SYS_HUMAN, None, "###", None,
                                [("Human", example[0][0]), ("Assistant", example[0][1])] + msgs + [("Assistant", None)])
  for name in ("v0", "default", "vicuna_v0"):
    assert C.generation_prompt(turns, name) == with_example
  assert with_example.startswith(SYS_HUMAN + "###Human: " + V0_EXAMPLE_Q + "###Assistant: " + V0_EXAMPLE_A_START)
  assert C.stop_strings("v0") == ("###",)


@pytest.mark.parametrize("value,expected", [
    ("What is this?\n<image>", "<image>\nWhat is this?"),
    ("<image>\nWhat is this?", "<image>\nWhat is this?"),
    ("What <image> is this?", "<image>\nWhat  is this?"),
    ("<image>", "<image>"),
    ("  <image>  hi  ", "<image>\nhi"),
    ("No image here  ", "No image here  "),
])
def test_image_moved_to_front_like_reference(value, expected):
  assert C.move_images_to_front(value) == expected == _oracle_move(value)


def test_image_segments_and_multi_images():
  turns = [{"from": "human", "value": "Compare <image> with <image>."}, {"from": "gpt", "value": "Same."},
           {"from": "human", "value": "And this <image>?"}, {"from": "gpt", "value": "Different."}]
  segs = C.render(turns, "vicuna_v1")
  images = [s for s in segs if s.kind == "image"]
  assert len(images) == 3 and all(s.text == "<image>" and not s.supervised and s.role == "user" for s in images)
  text = C.prompt_text(segs)
  assert "USER: <image>\n<image>\nCompare  with ." in text and "USER: <image>\nAnd this ?" in text
  inline = C.prompt_text(C.render(turns, "vicuna_v1", images_to_front=False))
  assert "USER: Compare <image> with <image>. ASSISTANT:" in inline


def test_plain_drops_instruction():
  turns = [{"from": "human", "value": "Describe the image briefly.\n<image>"}, {"from": "gpt", "value": "A dog."}]
  segs = C.render(turns, "plain")
  assert [(s.text, s.kind, s.supervised) for s in segs] == [
      ("<image>", "image", False), ("A dog.", "text", True), ("\n", "stop", True)]
  with pytest.raises(SampleError) as e:
    C.render(CONV, "plain")
  assert e.value.reason == "malformed_conversation"


@pytest.mark.parametrize("for_generation", [False, True])
def test_plain_text_only_row_is_a_counted_skip(for_generation):
  """A caption of no image (the reference's preprocess_plain asserts '<image>' in the turn): SampleError with
  its own reason, so the pipeline counts and logs the skip."""
  turns = [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A dog."}]
  with pytest.raises(SampleError) as e:
    if for_generation:
      C.generation_prompt(turns[:1], "plain")
    else:
      C.render(turns, "plain", sample_id="t1")
  assert e.value.reason == "caption_without_image"
  assert e.value.sample_id == (None if for_generation else "t1")


@pytest.mark.parametrize("question", ["What is this?", "<image>\nWhat is this?", "What is this? <image>",
                                      "  <image>  What is this?  "])
def test_plain_generation_prompt_is_the_references(question):
  """The reference's PLAIN get_prompt: system '' + '<image>\\n' + question (image removed, stripped) + sep '\\n'."""
  turn = question if "<image>" in question else question + "\n<image>"
  msg = "<image>\n" + turn.replace("<image>", "").strip()
  assert C.generation_prompt([{"from": "human", "value": turn}], "plain") == "" + msg + "\n"


def test_roles_keys_and_system_override():
  a = C.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "vicuna_v1")
  b = C.render([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "vicuna_v1")
  assert a == b
  c = C.prompt_text(C.render([{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello"}], "vicuna_v1"))
  assert c == "Be brief. USER: Hi ASSISTANT: Hello</s>"
  d = C.prompt_text(C.render([{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello"}], "llama_2"))
  assert d == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s>"


@pytest.mark.parametrize("turns,fragment", [
    ([], "empty"),
    ("human: hi", "list"),
    ([{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Hello"}], "first turn"),
    ([{"from": "human", "value": "Hi"}], "one-sided"),
    ([{"from": "human", "value": "Hi"}, {"from": "human", "value": "Again"}, {"from": "gpt", "value": "x"}],
     "alternate"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}, {"from": "human", "value": "More"}],
     "no answer"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], "expected a string"),
    ([{"from": "human", "value": None}, {"from": "gpt", "value": "x"}], "expected a string"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "   "}], "empty"),
    ([{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "x"}], "unknown role"),
    ([{"value": "Hi"}, {"from": "gpt", "value": "x"}], "unknown role"),
    (["Hi", "x"], "expected a dict"),
    ([{"from": "human", "value": "Hi"}, {"from": "system", "value": "S"}, {"from": "gpt", "value": "x"}],
     "system turn"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "see <image>"}], "images belong"),
])
def test_malformed_conversations(turns, fragment):
  with pytest.raises(SampleError) as e:
    C.render(turns, "vicuna_v1", sample_id="s-7")
  assert e.value.reason == "malformed_conversation"
  assert e.value.sample_id == "s-7" and "s-7" in str(e.value)
  assert fragment in str(e.value)


def test_generation_needs_trailing_human_turn():
  with pytest.raises(SampleError, match="ends with a human turn"):
    C.generation_prompt(CONV, "vicuna_v1")


def test_registry():
  assert {"vicuna_v0", "vicuna_v1", "llava_v1", "llama_2", "llava_llama_2", "plain", "chatml"} <= set(
      C.template_names())
  assert C.get_template("v1") is C.get_template("vicuna_v1")
  assert C.get_template("v0") is C.get_template("vicuna_v0") is C.get_template("default")
  assert C.get_template("llava_v0").examples == () and C.get_template("llava_v0").training is C.VICUNA_V0_TRAINING
  tpl = C.get_template("chatml")
  assert C.get_template(tpl) is tpl
  with pytest.raises(ValueError) as e:
    C.get_template("vicuna_v9")
  assert "vicuna_v9" in str(e.value) and "vicuna_v1" in str(e.value) and "llava_llama_2" in str(e.value)
  custom = C.Template(name="zephyr_test", system="Sys.", system_format="<|system|>\n{system}</s>\n",
                      user_prefix="<|user|>\n", user_suffix="</s>\n", assistant_prefix="<|assistant|>\n",
                      stop="</s>", assistant_suffix="\n")
  C.register_template("zephyr_test", custom)
  try:
    text = C.prompt_text(C.render([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}], "zephyr_test"))
    assert text == "<|system|>\nSys.</s>\n<|user|>\nHi</s>\n<|assistant|>\nYo</s>\n"
    with pytest.raises(ValueError, match="already registered"):
      C.register_template("zephyr_test", custom.replace(system="Other."))
    C.register_template("zephyr_test", custom.replace(system="Other."), overwrite=True)
    assert C.get_template("zephyr_test").system == "Other."
  finally:
    C._REGISTRY.pop("zephyr_test", None)
  with pytest.raises(TypeError):
    C.register_template("bad", {"system": "x"})
  with pytest.raises(ValueError, match="stop"):
    C.Template(name="nostop")
