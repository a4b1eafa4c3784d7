"""Encoding: token ids equal the reference's `tokenizer_image_token`; loss masks equal the reference's
masking rules (original LLaVA llava/train/train.py preprocess_v1 / preprocess_llama_2 / preprocess_plain,
re-implemented below as the oracle) wherever those rules do not hit their "tokenization mismatch", and stay
right where they do. Plus image runs, truncation and errors with reasons."""
import numpy as np
import pytest

from llava_jax.data import conversation as C
from llava_jax.data import tokenize as T
from llava_jax.data.errors import SampleError
from tests.fixtures import reference_tokenize, tokenizer_image_token

IGNORE = -100
REF_IMAGE_ID = -200


# ---------------------------------------------------------------------------------------------- oracle

def ref_tokenizer_image_token(tok, prompt):
  """The reference's tokenization (one -200 per <image>): the shared oracle in tests/fixtures/__init__.py."""
  return tokenizer_image_token(tok, prompt, image_token=REF_IMAGE_ID)


def ref_rounds_labels(tok, prompt, answer_sep, round_sep="</s>"):
  """preprocess_v1 (answer_sep ' ASSISTANT: ') / preprocess_llama_2 (answer_sep '[/INST] ') masking:
  split the prompt into rounds at '</s>', re-tokenize each round and its instruction, count lengths.
  Returns (ids, labels, mismatch)."""
  has_image = "<image>" in prompt
  tokenize = ref_tokenizer_image_token if has_image else reference_tokenize
  count = lambda s: len(tokenize(tok, s))  # noqa: E731
  ids = tokenize(tok, prompt)
  labels = list(ids)
  total = sum(1 for x in ids if x != tok.unk_token_id)  # pad = unk in the reference
  cur = 1
  labels[0] = IGNORE
  for rnd in prompt.split(round_sep):
    if rnd == "":
      break
    parts = rnd.split(answer_sep)
    if len(parts) != 2:
      break
    instruction = count(parts[0] + answer_sep) - 2
    labels[cur:cur + instruction] = [IGNORE] * len(labels[cur:cur + instruction])
    cur += count(rnd)
  labels[cur:] = [IGNORE] * len(labels[cur:])
  mismatch = cur != total
  if mismatch:
    labels = [IGNORE] * len(labels)
  return ids, labels, mismatch


def ref_plain_labels(tok, image_value, caption):
  """preprocess_plain: '<image>' + caption + '\\n'; the tokens of '<image>' (BOS + image) are ignored."""
  ids = ref_tokenizer_image_token(tok, image_value + caption + "\n")
  labels = list(ids)
  n = len(ref_tokenizer_image_token(tok, image_value))
  labels[:n] = [IGNORE] * n
  return ids, labels


def ref_v0_labels(tok, turns):
  """The reference's generic `preprocess` for v0 (`_add_speaker_and_signal`, `_tokenize_fn` / `get_tokenize_len`,
  `_mask_targets`) on turns after its image move. Returns (ids, labels)."""
  header = C.SYSTEM_HUMAN + "\n\n"
  values = ["### " + {"human": "Human", "gpt": "Assistant"}[t["from"]] + ": " + t["value"] + "\n" for t in turns]
  conversation = header + "".join(values) + "### "
  tokenize = ref_tokenizer_image_token if "<image>" in conversation else reference_tokenize
  ids = tokenize(tok, conversation)
  lens = [len(tokenize(tok, s)) for s in [header] + values]
  labels = list(ids)
  cur = lens[0]
  labels[:cur] = [IGNORE] * cur
  for n, t in zip(lens[1:], turns):
    if t["from"] == "human":
      labels[cur + 2:cur + n] = [IGNORE] * len(labels[cur + 2:cur + n])
    cur += n
  return ids, labels


ANSWER_SEP = {"vicuna_v1": " ASSISTANT: ", "llava_v1": " ASSISTANT: ", "llama_2": "[/INST] ",
              "llava_llama_2": "[/INST] "}


def H(v):
  return {"from": "human", "value": v}


def G(v):
  return {"from": "gpt", "value": v}


PARITY_CASES = {
    "image_last_multi_turn": [H("What is in the picture?\n<image>"), G("A red square."), H("Where is it?"),
                              G("On the left side of the image.")],
    "image_first": [H("<image>\nDescribe the image."), G("The answer is A. There are three circles.")],
    "answer_without_space_merge": [H("<image>\nColour?"), G("red")],  # ':' '▁' 'red': the lone '▁' is a target
    "unicode": [H("Was ist das? 日本語 ü <image>"), G("Ein Würfel 😀 ñ é."), H("Noch?"), G("日本語")],
    "newlines": [H("Line one\nLine two\n\n<image>"), G("First.\nSecond.\n\nThird."), H("ok\n"), G("\nDone\n")],
    "text_only": [H("What is the capital of France?"), G("Paris."), H("And Spain?"), G("Madrid.")],
    "multi_image": [H("Compare <image> and <image>."), G("Same shape."), H("<image> this one?"), G("Smaller.")],
}


def supervised_runs(ids, mask):
  runs, cur = [], []
  for i, m in zip(ids, mask):
    if m:
      cur.append(int(i))
    elif cur:
      runs.append(cur)
      cur = []
  if cur:
    runs.append(cur)
  return runs


def encode(turns, name, tok, n_img=1, img_id=REF_IMAGE_ID, max_length=100_000, **kw):
  return T.encode_conversation(turns, name, tok, num_image_tokens=n_img, image_token_index=img_id,
                               max_length=max_length, **kw)


# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("name", sorted(ANSWER_SEP))
@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_ids_and_masks_equal_reference(tiny_tokenizer, name, case):
  turns = PARITY_CASES[case]
  prompt = C.prompt_text(C.render(turns, name))
  ref_ids, ref_labels, mismatch = ref_rounds_labels(tiny_tokenizer, prompt, ANSWER_SEP[name])
  assert not mismatch, "these cases must be inside the reference's counting assumptions"
  assert any(lab != IGNORE for lab in ref_labels)
  enc = encode(turns, name, tiny_tokenizer)
  assert enc.input_ids.dtype == np.int32 and enc.loss_mask.dtype == np.bool_
  np.testing.assert_array_equal(enc.input_ids, ref_ids)
  np.testing.assert_array_equal(enc.loss_mask, [lab != IGNORE for lab in ref_labels])
  assert enc.prompt == prompt and enc.num_images == prompt.count("<image>") and not enc.truncated


@pytest.mark.parametrize("caption", ["A dog on a beach.", "Ein Würfel 😀\nzwei Zeilen", " leading space", "red"])
@pytest.mark.parametrize("instruction", ["<image>\nDescribe the image briefly.", "Describe it.\n<image>"])
def test_plain_equals_reference(tiny_tokenizer, caption, instruction):
  ref_ids, ref_labels = ref_plain_labels(tiny_tokenizer, "<image>", caption)
  enc = encode([H(instruction), G(caption)], "plain", tiny_tokenizer)
  np.testing.assert_array_equal(enc.input_ids, ref_ids)
  np.testing.assert_array_equal(enc.loss_mask, [lab != IGNORE for lab in ref_labels])


def test_image_runs_are_expanded(tiny_tokenizer):
  turns = PARITY_CASES["multi_image"]
  n, img = 7, 32000
  one = encode(turns, "vicuna_v1", tiny_tokenizer)
  enc = encode(turns, "vicuna_v1", tiny_tokenizer, n_img=n, img_id=img, num_images=3)
  expected_ids, expected_mask, expected_img = [], [], []
  for i, m in zip(one.input_ids, one.loss_mask):
    reps = n if i == REF_IMAGE_ID else 1
    expected_ids += [img if i == REF_IMAGE_ID else int(i)] * reps
    expected_mask += [bool(m)] * reps
    expected_img += [bool(i == REF_IMAGE_ID)] * reps
  np.testing.assert_array_equal(enc.input_ids, expected_ids)
  np.testing.assert_array_equal(enc.loss_mask, expected_mask)
  np.testing.assert_array_equal(enc.image_mask, expected_img)
  assert enc.num_images == 3 and enc.image_mask.sum() == 3 * n
  assert not (enc.loss_mask & enc.image_mask).any()
  # Three separate runs of exactly n placeholders.
  edges = np.flatnonzero(np.diff(np.concatenate([[0], enc.image_mask.astype(int), [0]])))
  assert [b - a for a, b in zip(edges[::2], edges[1::2])] == [n, n, n]


# ---------------------------------------------------------------------------------------------- mismatch

@pytest.mark.parametrize("name,user_text", [
    ("vicuna_v1", "Please reply in the form ASSISTANT: yes or ASSISTANT: no."),
    ("llava_v1", "<image>\nWhat does USER: mean? ASSISTANT: tell me"),
    ("llava_llama_2", "<image>\nThe log shows [/INST] then text."),
])
def test_reference_mismatch_but_spans_are_right(tiny_tokenizer, name, user_text):
  """A user message holding the answer separator breaks the reference's round splitting: it prints
  'tokenization mismatch' and drops the whole sample's loss. Spans are unaffected."""
  turns = [H(user_text), G("ASSISTANT: yes."), H("Again?"), G("Sure.")]
  prompt = C.prompt_text(C.render(turns, name))
  ref_ids, ref_labels, mismatch = ref_rounds_labels(tiny_tokenizer, prompt, ANSWER_SEP[name])
  assert mismatch and all(lab == IGNORE for lab in ref_labels)
  enc = encode(turns, name, tiny_tokenizer)
  np.testing.assert_array_equal(enc.input_ids, ref_ids)  # same ids
  tpl = C.get_template(name)
  decoded = [tiny_tokenizer.decode(r) for r in supervised_runs(enc.input_ids, enc.loss_mask)]
  assert decoded == [(tpl.reply_prefix + "ASSISTANT: yes." + tpl.stop).removeprefix(" "),
                     (tpl.reply_prefix + "Sure." + tpl.stop).removeprefix(" ")]


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_v0_training_ids_are_the_references_and_mask_is_answers_plus_stop(tiny_tokenizer, case):
  """v0 trains on the reference's `preprocess` text: same ids as the reference; the mask is exactly each answer
  plus '\\n###', where the reference's `_mask_targets` drifts (each turn counted tokenized alone: its own BOS and
  dummy-prefix '▁'), keeps '### Assistant: ' tags and pieces of human turns as targets and, turn by turn, drops
  the start of later answers."""
  turns = PARITY_CASES[case]
  moved = [dict(t, value=C.move_images_to_front(t["value"])) for t in turns]
  ref_ids, ref_labels = ref_v0_labels(tiny_tokenizer, moved)
  enc = encode(turns, "v0", tiny_tokenizer)
  np.testing.assert_array_equal(enc.input_ids, ref_ids)
  runs = supervised_runs(enc.input_ids, enc.loss_mask)
  assert [tiny_tokenizer.decode(r) for r in runs] == [t["value"] + "\n###" for t in turns[1::2]]
  ref_mask = np.array([lab != IGNORE for lab in ref_labels])
  assert (ref_mask & ~enc.loss_mask).any()  # the reference supervises tags / human text we do not
  if len(turns) >= 4:  # by the second answer the drift has eaten its first tokens
    assert (enc.loss_mask & ~ref_mask).any()


# ---------------------------------------------------------------------------------------------- masks

TRICKY = [H("Say ### and ASSISTANT: and Assistant: and [/INST] please\n<image>"), G("Done ### ok."),
          H("Ünïcødé 日本語 😀\nnewline"), G("ü é\nñ 😀"), H("last"), G(" spaced answer ")]


@pytest.mark.parametrize("name", ["vicuna_v0", "vicuna_v1", "llava_v1", "llama_2", "llava_llama_2", "chatml"])
def test_supervised_runs_are_answers_plus_stop(tiny_tokenizer, name):
  tpl = C.get_template(name).training_format  # v0 trains on its own text (`{a}\\n###`), see conversation.py
  enc = encode(TRICKY, name, tiny_tokenizer, n_img=3, img_id=32000, num_images=1)
  runs = supervised_runs(enc.input_ids, enc.loss_mask)
  answers = [t["value"] for t in TRICKY[1::2]]
  # (decode drops the first '▁' of a sequence, hence removeprefix)
  assert [tiny_tokenizer.decode(r) for r in runs] == [(tpl.reply_prefix + a + tpl.stop).removeprefix(" ")
                                                      for a in answers]
  assert enc.input_ids[0] == tiny_tokenizer.bos_token_id and not enc.loss_mask[0]
  assert not enc.loss_mask[enc.image_mask].any()
  # Whole-prompt tokenization (the image chunk split aside) gives the same ids as the reference's.
  np.testing.assert_array_equal(
      encode(TRICKY, name, tiny_tokenizer).input_ids, ref_tokenizer_image_token(tiny_tokenizer, enc.prompt))


@pytest.mark.parametrize("name", ["vicuna_v0", "vicuna_v1", "llama_2", "chatml"])
def test_generation_prompt_is_prefix_and_supervision_starts_after_it(tiny_tokenizer, name):
  """Everything the model must generate after a generation prompt is supervised, nothing before it."""
  enc = encode(TRICKY, name, tiny_tokenizer)
  starts = [i for i in range(1, len(enc)) if enc.loss_mask[i] and not enc.loss_mask[i - 1]]
  tpl = C.get_template(name).training_format  # (v0's inference prompt is another string: no prefix of its text)
  for k, start in enumerate(starts):
    gen = T.encode_generation_prompt(TRICKY[:2 * k + 1], tpl, tiny_tokenizer, num_image_tokens=1,
                                     image_token_index=REF_IMAGE_ID)
    assert gen.dtype == np.int32
    np.testing.assert_array_equal(gen, enc.input_ids[:len(gen)])
    assert start == len(gen)
    np.testing.assert_array_equal(gen, ref_tokenizer_image_token(
        tiny_tokenizer, C.generation_prompt(TRICKY[:2 * k + 1], tpl)))


def test_text_only_equals_whole_prompt_tokenization(tiny_tokenizer):
  turns = PARITY_CASES["text_only"]
  for name in ("vicuna_v0", "vicuna_v1", "llama_2", "chatml"):
    segs = C.render(turns, name)
    enc = encode(turns, name, tiny_tokenizer, num_images=0)
    np.testing.assert_array_equal(enc.input_ids, reference_tokenize(tiny_tokenizer, C.prompt_text(segs)))
    # Tokenizing segment by segment (SentencePiece adds a leading '▁' to each piece) would not.
    naive = [1] + [i for s in segs for i in tiny_tokenizer(s.text, add_special_tokens=False).input_ids]
    assert naive != list(enc.input_ids)


def test_chatml_with_added_special_tokens(tiny_tokenizer_dir):
  from transformers import LlamaTokenizer
  tok = LlamaTokenizer.from_pretrained(tiny_tokenizer_dir, add_bos_token=True)
  tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
  im_end = tok.convert_tokens_to_ids("<|im_end|>")
  enc = encode(PARITY_CASES["text_only"], "chatml", tok)
  np.testing.assert_array_equal(enc.input_ids, reference_tokenize(tok, enc.prompt))
  runs = supervised_runs(enc.input_ids, enc.loss_mask)
  assert [r[-1] for r in runs] == [im_end, im_end]  # the stop token ends each supervised run; "\n" after it does not
  assert T.stop_token_ids("chatml", tok) == (tok.eos_token_id, im_end)
  assert T.stop_token_ids("vicuna_v1", tok) == (2,)
  assert T.stop_token_ids("vicuna_v0", tok) == (2,)  # '###' is matched on text, not as a token


# ---------------------------------------------------------------------------------------------- sentencepiece

SP_CHUNKS = [" ASSISTANT:", " What is in the image?", "  two spaces", "a  b", " ", "\n", "\nWhat?", "x\n ",
             "\n\n### Human: hi\n### Assistant:", "###Human: q###Assistant:", "日本語 ü 😀 ñ",
             "The answer is A.", "trailing space "]


@pytest.fixture(scope="module")
def sp_model(tiny_tokenizer_dir):
  import sentencepiece as spm
  return spm.SentencePieceProcessor(model_file=f"{tiny_tokenizer_dir}/tokenizer.model")


@pytest.mark.parametrize("text", SP_CHUNKS)
def test_chunk_ids_are_sentencepiece_encoding(tiny_tokenizer, sp_model, text):
  """Every chunk is encoded as SentencePiece itself encodes it (transformers 5's LlamaTokenizer drops the
  dummy-prefix '▁' before a leading space: ' ASSISTANT' → ['▁ASSISTANT'] instead of ['▁', '▁ASSISTANT'])."""
  from llava_jax.data.tokenizer import encode_text, encode_with_offsets
  assert encode_text(tiny_tokenizer, text, add_special_tokens=False) == sp_model.encode(text)
  ids, offsets = encode_with_offsets(tiny_tokenizer, text)
  assert ids == [tiny_tokenizer.bos_token_id] + sp_model.encode(text)
  assert offsets.shape == (len(ids), 2) and (offsets[:, 0] <= offsets[:, 1]).all() and offsets.max() <= len(text)


def test_sentencepiece_splits_at_special_tokens_like_the_reference(tiny_tokenizer, sp_model):
  """Text around a special token: each piece is `sp.encode`d on its own (the reference's slow LlamaTokenizer)."""
  from llava_jax.data.tokenizer import encode_text
  text = "USER: hi ASSISTANT: a</s>USER: again </s><s>[INST] x"
  expected = ([1] + sp_model.encode("USER: hi ASSISTANT: a") + [2] + sp_model.encode("USER: again ") + [2, 1]
              + sp_model.encode("[INST] x"))
  assert encode_text(tiny_tokenizer, text) == expected


@pytest.mark.parametrize("name", ["vicuna_v1", "vicuna_v0", "llama_2", "plain"])
@pytest.mark.parametrize("images_to_front", [True, False])
def test_image_chunks_with_leading_space_are_sentencepiece(tiny_tokenizer, sp_model, name, images_to_front):
  """'<image> What…' (the image followed by a space) and multi-turn conversations: ids are BOS, then each chunk
  between images `sp.encode`d (cut at '</s>' / '<s>' too), images in between: the reference's ids."""
  turns = [H("<image> What is in the image?"), G(" A cat sitting on a couch."), H("And the colour?"), G("Red.")]
  if name == "plain":
    turns = turns[:2]
  def sp_ids(chunk):
    out = []
    for j, part in enumerate(chunk.split("</s>")):
      for k, sub in enumerate(part.split("<s>")):
        out += ([1] if k else []) + (sp_model.encode(sub) if sub else [])
      out += [2]
    return out[:-1]
  for enc_turns, prompt in ((turns, C.prompt_text(C.render(turns, name, images_to_front=images_to_front))),
                            (turns[:1], C.generation_prompt(turns[:1], name, images_to_front=images_to_front))):
    chunks = prompt.split("<image>")
    expected = [1] + sp_ids(chunks[0])
    for chunk in chunks[1:]:
      expected += [REF_IMAGE_ID] + sp_ids(chunk)
    if len(enc_turns) % 2 == 0:
      got = encode(enc_turns, name, tiny_tokenizer, images_to_front=images_to_front).input_ids
    else:
      got = T.encode_generation_prompt(enc_turns, name, tiny_tokenizer, num_image_tokens=1,
                                       image_token_index=REF_IMAGE_ID, images_to_front=images_to_front)
    assert list(got) == expected, prompt


def test_exported_tokenizer_keeps_the_sentencepiece_ids(tiny_tokenizer, sp_model, tmp_path):
  """transformers 5's save_pretrained writes no tokenizer.model; the export copies it so a reloaded tokenizer
  encodes as in training."""
  from llava_jax.checkpoints.export import _save_tokenizer
  from llava_jax.data.tokenizer import encode_text, load_tokenizer, sentencepiece_model
  _save_tokenizer(tiny_tokenizer, str(tmp_path))
  reloaded = load_tokenizer(str(tmp_path))
  assert sentencepiece_model(reloaded) is not None
  for text in SP_CHUNKS:
    assert encode_text(reloaded, text) == [1] + sp_model.encode(text)


def test_tokenizer_json_only_encodes_as_sentencepiece(tiny_tokenizer, sp_model, tmp_path):
  """A LLaMA tokenizer directory without tokenizer.model (transformers 5's save_pretrained writes only
  tokenizer.json) still encodes every piece as SentencePiece does, and gives the same loss masks."""
  import os
  from llava_jax.data.tokenizer import encode_text, encode_with_offsets, load_tokenizer, sentencepiece_model
  tiny_tokenizer.save_pretrained(str(tmp_path))
  assert not os.path.exists(tmp_path / "tokenizer.model")
  tok = load_tokenizer(str(tmp_path))
  assert sentencepiece_model(tok) is None
  for text in SP_CHUNKS:
    assert encode_text(tok, text, add_special_tokens=False) == sp_model.encode(text), text
    offsets = encode_with_offsets(tok, text)[1]  # (byte-fallback pieces of one char may span it differently)
    assert (offsets[:, 0] <= offsets[:, 1]).all() and (np.diff(offsets[:, 0]) >= 0).all() and offsets.max() <= len(text)
  text = "USER: hi ASSISTANT: a</s>USER: again </s><s>[INST] x"
  assert encode_text(tok, text) == encode_text(tiny_tokenizer, text)
  for name in ("vicuna_v1", "vicuna_v0"):
    a, b = encode(TRICKY, name, tok, n_img=3, img_id=32000), encode(TRICKY, name, tiny_tokenizer, n_img=3, img_id=32000)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)


def test_token_flags_overlap_rule():
  """A token is supervised iff it overlaps a supervised character; zero-width tokens take the flag of the
  character they sit on (none past the end)."""
  chars = np.array([0, 0, 1, 1, 0], bool)
  offsets = np.array([[0, 0], [0, 2], [1, 3], [3, 5], [4, 5], [2, 2], [4, 4], [5, 5]])
  np.testing.assert_array_equal(T._token_flags(offsets, chars), [0, 0, 1, 1, 0, 1, 0, 0])


# ---------------------------------------------------------------------------------------------- images / errors

def test_image_count_mismatch(tiny_tokenizer):
  turns = PARITY_CASES["multi_image"]
  for n in (0, 2, 4):
    with pytest.raises(SampleError) as e:
      encode(turns, "vicuna_v1", tiny_tokenizer, num_images=n, sample_id=17)
    assert e.value.reason == "image_mismatch" and e.value.sample_id == 17
  with pytest.raises(SampleError) as e:
    encode(PARITY_CASES["text_only"], "vicuna_v1", tiny_tokenizer, num_images=1)
  assert e.value.reason == "image_mismatch"
  assert encode(turns, "vicuna_v1", tiny_tokenizer, num_images=3).num_images == 3


def test_malformed_reason_propagates(tiny_tokenizer):
  with pytest.raises(SampleError) as e:
    encode([H("only a question <image>")], "vicuna_v1", tiny_tokenizer, sample_id="a1")
  assert e.value.reason == "malformed_conversation" and e.value.sample_id == "a1"


# ---------------------------------------------------------------------------------------------- truncation

def test_truncation_keeps_mask_aligned(tiny_tokenizer):
  turns = PARITY_CASES["image_last_multi_turn"]
  full = encode(turns, "vicuna_v1", tiny_tokenizer, n_img=5, img_id=32000)
  same = encode(turns, "vicuna_v1", tiny_tokenizer, n_img=5, img_id=32000, max_length=len(full))
  assert not same.truncated
  np.testing.assert_array_equal(same.input_ids, full.input_ids)
  cut = len(full) - 4  # inside the last answer
  assert full.loss_mask[cut - 1] and full.loss_mask[cut]
  short = encode(turns, "vicuna_v1", tiny_tokenizer, n_img=5, img_id=32000, max_length=cut)
  assert short.truncated and len(short) == cut
  np.testing.assert_array_equal(short.input_ids, full.input_ids[:cut])
  np.testing.assert_array_equal(short.loss_mask, full.loss_mask[:cut])
  np.testing.assert_array_equal(short.image_mask, full.image_mask[:cut])


def test_truncation_never_cuts_an_image_run(tiny_tokenizer):
  turns = [H("Hi"), G("Hello there."), H("And now?\n<image>"), G("A cat.")]
  full = encode(turns, "vicuna_v1", tiny_tokenizer, n_img=6, img_id=32000)
  first, last = np.flatnonzero(full.image_mask)[[0, -1]]
  for max_length in (first, first + 3, last):  # before the run, inside it, one short of its end
    with pytest.raises(SampleError) as e:
      encode(turns, "vicuna_v1", tiny_tokenizer, n_img=6, img_id=32000, max_length=int(max_length), sample_id=3)
    assert e.value.reason == "too_long" and e.value.sample_id == 3
  kept = encode(turns, "vicuna_v1", tiny_tokenizer, n_img=6, img_id=32000, max_length=int(last) + 1)
  assert kept.truncated and kept.image_mask.sum() == 6 and kept.loss_mask.any()  # first answer survives


def test_truncation_leaving_no_answer(tiny_tokenizer):
  turns = PARITY_CASES["text_only"]
  full = encode(turns, "vicuna_v1", tiny_tokenizer)
  first_target = int(np.argmax(full.loss_mask))
  with pytest.raises(SampleError) as e:
    encode(turns, "vicuna_v1", tiny_tokenizer, max_length=first_target)
  assert e.value.reason == "no_supervised_tokens"
  assert encode(turns, "vicuna_v1", tiny_tokenizer, max_length=first_target + 1).loss_mask.sum() == 1
  with pytest.raises(ValueError):
    encode(turns, "vicuna_v1", tiny_tokenizer, max_length=0)
  with pytest.raises(ValueError):
    encode(turns, "vicuna_v1", tiny_tokenizer, n_img=0)
