"""Conversation templates: a registry of named prompt formats that render a conversation into segments.

A rendered conversation is a list of `Segment(text, role, supervised, kind)` whose texts concatenate to the
exact prompt string the reference builds (original LLaVA: `llava/conversation.py` `get_prompt` after
`llava/train/train.py` `preprocess_multimodal`). The `supervised` flags say which characters the loss sees:
everything the model must generate after a generation prompt, i.e. each answer plus the stop that ends it
(`</s>` for v1 / llama_2, `\n###` for v0 training text, `\n` for plain). Loss masks are derived from these
character spans by `llava_jax.data.tokenize`, never by re-tokenizing pieces and counting.

Input conversations are LLaVA JSON turns: `[{"from": "human" | "gpt", "value": str}, ...]`; "user" /
"assistant" and the keys "role" / "content" are accepted too, and an optional leading "system" turn overrides
the template's system text. Bad input raises `SampleError('malformed_conversation')`.

Templates (names as in the reference's `conv_templates` where they exist):
  vicuna_v0 (alias v0, default)   inference `{sys}###Human: {q}###Assistant: {a}###...`  (the paper), after the
                                  reference's two-message worked example (conv_vicuna_v0.messages)
  llava_v0                        as vicuna_v0 without the worked example (conv_llava_v0)
  vicuna_v1 (alias v1)            `{sys} USER: {q} ASSISTANT: {a}</s>USER: ...`          (LLaVA-1.5 training)
  llava_v1                        as vicuna_v1 with the "curious human" system text      (CLI inference)
  llama_2, llava_llama_2          `[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] ...`
  plain (alias v0_plain)          `<image>{caption}\\n` (stage-1: the instruction is dropped); generation prompt
                                  `<image>\\n{question}\\n` (the reference's PLAIN get_prompt), `<image>` alone
                                  without a question
  chatml                          `<|im_start|>system\\n{sys}<|im_end|>\\n<|im_start|>user\\n...` (extension example)

Training text vs inference prompt. Most templates train on the string their generation prompt extends. The
v0 templates do not: the reference trains v0 with its generic `preprocess` (`_add_speaker_and_signal`,
BEGIN_SIGNAL "### ", END_SIGNAL "\\n") on
  `{sys}\\n\\n### Human: {q}\\n### Assistant: {a}\\n### Human: ...\\n### Assistant: {a}\\n### `
while its inference prompt is the `###` form above; `Template.training` holds that training format, and `render`
uses it (so fine-tuning a paper-era checkpoint sees what it was trained on) while `render_generation` keeps the
inference prompt. Supervised: each answer plus `\\n###`, the stop the model must emit (inference stops on `###`).
The reference's own v0 mask drifts by at least one token per turn, a known reference bug we do not copy:
`_tokenize_fn` / `get_tokenize_len` measure each turn tokenized alone, so a turn's length counts its own BOS (and
the dummy-prefix `▁` a string start may add), and `_mask_targets` advances `cur_idx` by that, so each turn's span
starts later than the turn really does, more so turn by turn: the ends of human turns become targets and later
answers lose their first tokens. It also keeps the first two tokens of each (drifted) human span and the whole
gpt turn, tag included ('### Assistant: a\\n'), as targets.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

from llava_jax.data.errors import SampleError

IMAGE_TOKEN = "<image>"

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclasses.dataclass(frozen=True)
class Segment:
  """A piece of a rendered prompt.

  text: the exact characters; the prompt is `"".join(s.text for s in segments)`.
  role: 'system' | 'user' | 'assistant' (image placeholders belong to the user turn holding them).
  supervised: whether the loss sees the tokens of these characters.
  kind: 'system' | 'tag' (role tags and separators) | 'text' (message content) | 'image' (one `<image>`)
    | 'stop' (the supervised end of an answer).
  """
  text: str
  role: str
  supervised: bool
  kind: str = "text"


@dataclasses.dataclass(frozen=True)
class Template:
  """A prompt format. A conversation of rounds (user q_i, assistant a_i) renders as

      system_format(system)                                  [unless system_in_first_user]
      for each round i:
        (first_user_prefix if i == 0 else user_prefix)       tag, unsupervised
        system_format(system)                                [only i == 0 and system_in_first_user]
        q_i                                                  user text (images moved to its front)
        user_suffix                                          tag, unsupervised
        assistant_prefix                                     tag, unsupervised: a generation prompt ends here
        reply_prefix + a_i + stop                            supervised (what the model generates)
        assistant_suffix                                     tag, unsupervised

  captions_only: stage-1 'plain' format: the user text is dropped (only its `<image>`s remain), exactly
    one round is allowed and the human turn must hold an image (else SampleError('caption_without_image')).
    A generation prompt is `<image>\\n{question}\\n` (or `<image>` alone when the question is only the image).
  stop_strings: strings that end a generated answer (for inference); `stop` itself is the trained one.
  training: the template `render` uses for training text when the reference trains on a different string than
    its inference prompt (v0); None: this one.
  examples: (question, answer) rounds a generation prompt starts with after the system text (the reference's
    `Conversation.messages` worked example, e.g. conv_vicuna_v0's); never in training text.
  """
  name: str
  system: str = ""
  system_format: str = "{system}"
  system_in_first_user: bool = False
  user_prefix: str = ""
  first_user_prefix: Optional[str] = None
  user_suffix: str = ""
  assistant_prefix: str = ""
  reply_prefix: str = ""
  stop: str = ""
  assistant_suffix: str = ""
  stop_strings: Tuple[str, ...] = ()
  captions_only: bool = False
  training: Optional["Template"] = None
  examples: Tuple[Tuple[str, str], ...] = ()

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError("Template.name must be a non-empty string")
    if "{system}" not in self.system_format and self.system_format and not self.captions_only:
      raise ValueError(f"template {self.name!r}: system_format {self.system_format!r} lacks '{{system}}'")
    if not self.stop:
      raise ValueError(f"template {self.name!r}: `stop` (the supervised end of an answer) must be non-empty, "
                       "otherwise a model never learns to stop")
    object.__setattr__(self, "stop_strings", tuple(self.stop_strings) or (self.stop,))
    object.__setattr__(self, "examples", tuple((str(q), str(a)) for q, a in self.examples))
    if self.training is not None and not isinstance(self.training, Template):
      raise TypeError(f"template {self.name!r}: `training` must be a Template, got {type(self.training).__name__}")

  @property
  def generation_prefix(self) -> str:
    """The text a generation prompt ends with after the last user turn ('ASSISTANT:', '[/INST]', ...)."""
    return self.user_suffix + self.assistant_prefix

  @property
  def training_format(self) -> "Template":
    """The template training text is rendered with (`training`, or this one)."""
    return self.training if self.training is not None else self

  def replace(self, **kw) -> "Template":
    return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------------------------- registry

_REGISTRY: Dict[str, Template] = {}


def register_template(name: str, template: Template, *, overwrite: bool = False) -> Template:
  """Make `template` available as `get_template(name)`. Re-registering a name needs overwrite=True."""
  if not isinstance(template, Template):
    raise TypeError(f"register_template({name!r}, ...): expected a Template, got {type(template).__name__}")
  if not isinstance(name, str) or not name:
    raise ValueError("template names are non-empty strings")
  if name in _REGISTRY and not overwrite and _REGISTRY[name] is not template:
    raise ValueError(f"a template named {name!r} is already registered; pass overwrite=True to replace it")
  _REGISTRY[name] = template
  return template


def template_names() -> Tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def get_template(name) -> Template:
  """The registered template called `name` (a Template passes through unchanged)."""
  if isinstance(name, Template):
    return name
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown conversation template {name!r}; known templates: "
                     f"{', '.join(template_names())} (add one with register_template)") from None


# Texts as in the original LLaVA code base (llava/conversation.py).
SYSTEM_HUMAN = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SYSTEM_USER = ("A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_LLAMA_2 = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information.")
SYSTEM_LLAVA_LLAMA_2 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language.")
SYSTEM_CHATML = ("A conversation between a user and an LLM-based AI assistant. "
                 "The assistant gives helpful and honest answers.")

# The reference's conv_vicuna_v0.messages: the worked example its v0 / default inference prompt starts with.
VICUNA_V0_EXAMPLE = (
    ("What are the key differences between renewable and non-renewable energy sources?",
     "Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, "
     "such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, are "
     "finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences "
     "between renewable and non-renewable energy sources:\n"
     "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy sources "
     "are finite and will eventually run out.\n"
     "2. Environmental impact: Renewable energy sources have a much lower environmental impact than non-renewable "
     "sources, which can lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n"
     "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have lower "
     "operational costs than non-renewable sources.\n"
     "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote locations "
     "than non-renewable sources.\n"
     "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different situations "
     "and needs, while non-renewable sources are more rigid and inflexible.\n"
     "6. Sustainability: Renewable energy sources are more sustainable over the long term, while non-renewable "
     "sources are not, and their depletion can lead to economic and social instability.\n"),
)
# v0 training text (the reference's generic `preprocess`): `{sys}\n\n### Human: q\n### Assistant: a\n### ...`.
# The "###" that opens the next turn is the answer's supervised stop; the first turn's "### " is its own tag.
VICUNA_V0_TRAINING = Template(
    name="vicuna_v0_training", system=SYSTEM_HUMAN, system_format="{system}\n\n", first_user_prefix="### Human: ",
    user_prefix="Human: ", user_suffix="\n", assistant_prefix="### Assistant:", reply_prefix=" ", stop="\n###",
    assistant_suffix=" ", stop_strings=("###",))
VICUNA_V0 = Template(
    name="vicuna_v0", system=SYSTEM_HUMAN, system_format="{system}###", user_prefix="Human: ",
    user_suffix="###", assistant_prefix="Assistant:", reply_prefix=" ", stop="###", training=VICUNA_V0_TRAINING,
    examples=VICUNA_V0_EXAMPLE)
LLAVA_V0 = VICUNA_V0.replace(name="llava_v0", examples=())
VICUNA_V1 = Template(
    name="vicuna_v1", system=SYSTEM_USER, system_format="{system} ", user_prefix="USER: ", user_suffix=" ",
    assistant_prefix="ASSISTANT:", reply_prefix=" ", stop="</s>")
LLAVA_V1 = VICUNA_V1.replace(name="llava_v1", system=SYSTEM_HUMAN)
LLAMA_2 = Template(
    name="llama_2", system=SYSTEM_LLAMA_2, system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
    system_in_first_user=True, first_user_prefix="[INST] ", user_prefix="<s>[INST] ", user_suffix=" [/INST]",
    assistant_prefix="", reply_prefix=" ", stop=" </s>", stop_strings=("</s>",))
LLAVA_LLAMA_2 = LLAMA_2.replace(name="llava_llama_2", system=SYSTEM_LLAVA_LLAMA_2)
PLAIN = Template(name="plain", system="", system_format="", stop="\n", captions_only=True)
CHATML = Template(
    name="chatml", system=SYSTEM_CHATML, system_format="<|im_start|>system\n{system}<|im_end|>\n",
    user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n", assistant_prefix="<|im_start|>assistant\n",
    stop="<|im_end|>", assistant_suffix="\n")

for _t in (VICUNA_V0, LLAVA_V0, VICUNA_V1, LLAVA_V1, LLAMA_2, LLAVA_LLAMA_2, PLAIN, CHATML):
  register_template(_t.name, _t)
for _alias, _t in (("v0", VICUNA_V0), ("default", VICUNA_V0), ("v1", VICUNA_V1), ("v0_plain", PLAIN)):
  register_template(_alias, _t)
del _alias, _t


# ----------------------------------------------------------------------------------------------- turns

def normalize_turns(conversations: Any, *, sample_id=None,
                    for_generation: bool = False) -> Tuple[Optional[str], List[Tuple[str, str]]]:
  """Validate LLaVA-style turns → (system override or None, [(role 'user'|'assistant', text), ...]).

  Training conversations alternate user/assistant starting with the user and end with an assistant answer;
  generation conversations end with a user turn. Raises SampleError('malformed_conversation').
  """
  def bad(msg):
    return SampleError("malformed_conversation", msg, sample_id)

  if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
    raise bad(f"conversations must be a list of turns, got {type(conversations).__name__}")
  system = None
  turns: List[Tuple[str, str]] = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict):
      raise bad(f"turn {i} is a {type(turn).__name__}, expected a dict with 'from' and 'value'")
    raw_role = turn.get("from", turn.get("role"))
    value = turn.get("value", turn.get("content"))
    role = ROLE_ALIASES.get(raw_role.lower()) if isinstance(raw_role, str) else None
    if role is None:
      raise bad(f"turn {i} has unknown role {raw_role!r}; expected one of {sorted(ROLE_ALIASES)}")
    if not isinstance(value, str):
      raise bad(f"turn {i} ({raw_role}) value is a {type(value).__name__}, expected a string")
    if not value.strip():
      raise bad(f"turn {i} ({raw_role}) is empty")
    if role == "system":
      if i != 0:
        raise bad(f"a system turn may only come first (found at turn {i})")
      if IMAGE_TOKEN in value:
        raise bad(f"the system turn contains {IMAGE_TOKEN}")
      system = value
      continue
    expected = "user" if len(turns) % 2 == 0 else "assistant"
    if role != expected:
      where = "the first turn" if not turns else f"turn {i}"
      raise bad(f"{where} is from {raw_role!r}, expected {'human' if expected == 'user' else 'gpt'} "
                "(turns must alternate human, gpt, human, ...)")
    if role == "assistant" and IMAGE_TOKEN in value:
      raise bad(f"turn {i} ({raw_role}) contains {IMAGE_TOKEN}: images belong in human turns")
    turns.append((role, value))
  if not turns:
    raise bad("empty conversation")
  if for_generation:
    if turns[-1][0] != "user":
      raise bad("a generation prompt needs a conversation that ends with a human turn")
  elif turns[-1][0] != "assistant":
    raise bad("the conversation ends with a human turn that has no answer" if len(turns) > 1
              else "one-sided conversation: a human turn with no answer")
  return system, turns


def move_images_to_front(value: str) -> str:
  """The reference's `preprocess_multimodal`: `<image>` moves to the front of its turn, followed by a newline.

  `("<image>\\n" + value.replace("<image>", "").strip()).strip()` for one image; a turn holding k images gets k
  leading `"<image>\\n"` (the reference collapses them into one). Turns without an image are unchanged.
  """
  k = value.count(IMAGE_TOKEN)
  if k == 0:
    return value
  return ((IMAGE_TOKEN + "\n") * k + value.replace(IMAGE_TOKEN, "").strip()).strip()


def _user_content(text: str) -> List[Segment]:
  """User text → text segments with one 'image' segment per `<image>`."""
  out = []
  for j, piece in enumerate(text.split(IMAGE_TOKEN)):
    if j:
      out.append(Segment(IMAGE_TOKEN, "user", False, "image"))
    if piece:
      out.append(Segment(piece, "user", False, "text"))
  return out


def _tag(text: str, role: str, out: List[Segment]):
  if text:
    out.append(Segment(text, role, False, "tag"))


def _render(conversations, template, *, sample_id, images_to_front: bool, for_generation: bool) -> List[Segment]:
  tpl = get_template(template)
  if not for_generation:
    tpl = tpl.training_format
  system_override, turns = normalize_turns(conversations, sample_id=sample_id, for_generation=for_generation)
  system = tpl.system if system_override is None else system_override
  if tpl.captions_only:
    return _render_captions_only(tpl, turns, sample_id=sample_id, for_generation=for_generation)
  n_example_turns = 0
  if for_generation and tpl.examples:  # the reference's worked example, before the real conversation
    example_turns = [(role, text) for q, a in tpl.examples for role, text in (("user", q), ("assistant", a))]
    turns, n_example_turns = example_turns + turns, len(example_turns)
  out: List[Segment] = []
  system_text = tpl.system_format.replace("{system}", system)
  if system_text and not tpl.system_in_first_user:
    out.append(Segment(system_text, "system", False, "system"))
  for i in range(0, len(turns), 2):
    question = turns[i][1]
    first = i == 0
    if images_to_front:
      question = move_images_to_front(question)
    _tag(tpl.first_user_prefix if first and tpl.first_user_prefix is not None else tpl.user_prefix, "user", out)
    if first and system_text and tpl.system_in_first_user:
      out.append(Segment(system_text, "system", False, "system"))
    out.extend(_user_content(question))
    _tag(tpl.user_suffix, "user", out)
    _tag(tpl.assistant_prefix, "assistant", out)
    if i + 1 == len(turns):  # generation prompt: stop after the assistant tag
      break
    supervised = i >= n_example_turns
    out.append(Segment(tpl.reply_prefix + turns[i + 1][1], "assistant", supervised, "text"))
    out.append(Segment(tpl.stop, "assistant", supervised, "stop"))
    _tag(tpl.assistant_suffix, "assistant", out)
  return out


def _render_captions_only(tpl, turns, *, sample_id, for_generation: bool) -> List[Segment]:
  """'plain' (the reference's preprocess_plain / PLAIN get_prompt): training `<image>{caption}{stop}` with the
  instruction dropped; generation `<image>\\n{question}{stop}`, or the `<image>` alone when the human turn holds
  nothing else. The human turn must hold an image: a caption of no image teaches nothing (the reference asserts)."""
  if len(turns) > (1 if for_generation else 2):
    raise SampleError("malformed_conversation",
                      f"template {tpl.name!r} takes exactly one human turn and one answer, got {len(turns)} turns",
                      sample_id)
  question = turns[0][1]
  n_images = question.count(IMAGE_TOKEN)
  if n_images == 0:
    raise SampleError("caption_without_image", f"template {tpl.name!r} captions images, but the human turn holds "
                      f"no {IMAGE_TOKEN} (a text-only row)", sample_id)
  out = [Segment(IMAGE_TOKEN, "user", False, "image") for _ in range(n_images)]
  if for_generation:
    text = question.replace(IMAGE_TOKEN, "").strip()
    if text:  # the reference's PLAIN get_prompt: system "" + "<image>\\n" + question + sep "\\n"
      out += [Segment("\n" + text, "user", False, "text"), Segment(tpl.stop, "user", False, "tag")]
    return out
  out.append(Segment(turns[1][1], "assistant", True, "text"))
  out.append(Segment(tpl.stop, "assistant", True, "stop"))
  return out


def render(conversations, template, *, sample_id=None, images_to_front: bool = True) -> List[Segment]:
  """A training conversation (ending with an answer) → segments of the template's training text
  (`Template.training_format`); `prompt_text(segments)` is the full prompt.

  images_to_front: move each human turn's `<image>`s to its front as the reference does (False keeps them
    where the data put them, for interleaved multi-image data).
  """
  return _render(conversations, template, sample_id=sample_id, images_to_front=images_to_front,
                 for_generation=False)


def render_generation(conversations, template, *, sample_id=None, images_to_front: bool = True) -> List[Segment]:
  """A conversation ending with a human turn → segments of the prompt the model continues (ends with the
  template's generation prefix: 'ASSISTANT:' for v1, '###Assistant:' for v0, '[/INST]' for llama_2). This is the
  inference prompt: v0 / default start with the reference's worked example (`Template.examples`), and v0 uses its
  `###` form, not the training text (`Template.training`)."""
  return _render(conversations, template, sample_id=sample_id, images_to_front=images_to_front,
                 for_generation=True)


def prompt_text(segments: Sequence[Segment]) -> str:
  return "".join(s.text for s in segments)


def generation_prompt(conversations, template, *, images_to_front: bool = True) -> str:
  """The generation prompt string (see `render_generation`)."""
  return prompt_text(render_generation(conversations, template, images_to_front=images_to_front))


def stop_strings(template) -> Tuple[str, ...]:
  """Strings that end a generated answer for `template` ('</s>' for v1 / llama_2, '###' for v0, ...)."""
  return get_template(template).stop_strings
