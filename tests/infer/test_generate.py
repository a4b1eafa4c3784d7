"""KV-cache generation against transformers' LlavaForConditionalGeneration.generate on the same tiny weights.

One tiny random model (vocab 512 = the tiny tokenizer's, so generated ids decode to text) serves every test,
and the calls share shape buckets so the file compiles only a handful of programs.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from llava_jax import parallel
from llava_jax.infer import generate as gen
from llava_jax.infer.sampling import filter_logits
from llava_jax.models.llama import LlamaForCausalLM, init_kv_cache
from llava_jax.models.llava import LlavaModel
from tests import fixtures

VOCAB = 512
IMAGE_TOKEN = 511  # in the model's vocab (as llava-hf's 32000); the tiny tokenizer never emits it for our text
EOS = 2
MAX_NEW = 10


@functools.lru_cache(maxsize=None)
def tiny():
  """(HF model, our config, our params), built once."""
  model = fixtures.tiny_hf_llava(seed=3, text=dict(vocab_size=VOCAB), image_token_index=IMAGE_TOKEN)
  config = fixtures.llava_config_from_hf_model(model)
  return model, config, fixtures.llava_params_from_hf_model(model, config)


def _image_prompt(pre, post):
  k = tiny()[1].num_image_tokens
  return np.asarray(pre + [IMAGE_TOKEN] * k + post, np.int32)


def _pixels(n, seed):
  return np.random.RandomState(seed).randn(n, 28, 28, 3).astype(np.float32)  # NHWC


def hf_generate(ids, pixels_nhwc=None, **kw):
  """transformers' generate on one prompt alone → the new token ids."""
  model = tiny()[0]
  ids_t = torch.tensor(np.asarray(ids, np.int64)[None])
  args = dict(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), do_sample=False, pad_token_id=0,
              eos_token_id=EOS, max_new_tokens=MAX_NEW)
  if pixels_nhwc is not None:
    args["pixel_values"] = torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))
  args.update(kw)
  with torch.no_grad():
    out = model.generate(**args)
  return out[0, ids_t.shape[1]:].tolist()


def llava_tokenize(tokenizer, text):
  """The reference's `tokenizer_image_token` with each image a run of num_image_tokens placeholders
  (llava-hf's expanded form) → int32 [T]."""
  k = tiny()[1].num_image_tokens
  ids = fixtures.tokenizer_image_token(tokenizer, text, IMAGE_TOKEN, k)
  assert ids.count(IMAGE_TOKEN) == k * text.count("<image>")
  return np.asarray(ids, np.int32)


# a batch of four prompts of different lengths: image, text-only, two images, short text (3 images → the
# image bucket of 4 holds a masked padding image)
BATCH = ["USER: <image>\nWhat color is the square? ASSISTANT:",
         "A chat between a curious human and an artificial intelligence assistant.",
         "Human: What is in the image?<image> and<image>###Assistant:", "The answer is"]
BATCH_PIXELS = [_pixels(1, 0), None, _pixels(2, 1), None]


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
  """(prompt ids per row, our result on the whole batch from the prompt strings)."""
  _, config, params = tiny()
  res = gen.generate(config, params, prompts=BATCH, pixel_values=BATCH_PIXELS, tokenizer=tiny_tokenizer,
                     max_new_tokens=MAX_NEW, stop_token_ids=[EOS], output_scores=True)
  return [llava_tokenize(tiny_tokenizer, p) for p in BATCH], res


def test_greedy_batch_equals_hf_each_row_alone(batch):
  ids, res = batch
  assert len({len(i) for i in ids}) == 4 and res.prompt_lengths == [len(i) for i in ids]
  for r, pix in enumerate(BATCH_PIXELS):
    want = hf_generate(ids[r], pix)
    assert res.token_ids[r] == want, f"row {r}"
    assert res.finish_reasons[r] == ("stop" if want[-1] == EOS else "length")


def test_cache_logits_equal_full_rerun_at_every_step(batch):
  _, config, params = tiny()
  prompts, res = batch
  seqs = [np.concatenate([p, np.asarray(t, np.int32)]) for p, t in zip(prompts, res.token_ids)]
  t = max(len(s) for s in seqs)
  ids = np.zeros((len(seqs), t), np.int32)
  mask = np.zeros((len(seqs), t), np.int32)
  for r, s in enumerate(seqs):
    ids[r, :len(s)], mask[r, :len(s)] = s, 1
  pixels = np.concatenate([p for p in BATCH_PIXELS if p is not None])
  full = np.asarray(jax.jit(lambda p, i, x, m: LlavaModel(config).apply({"params": p}, i, x, m))(
      params, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)))
  for r, prompt in enumerate(prompts):
    n = len(res.token_ids[r])
    assert res.scores[r].shape == (n, VOCAB)
    want = full[r, len(prompt) - 1:len(prompt) - 1 + n]
    np.testing.assert_allclose(res.scores[r], want, atol=1e-4, rtol=0, err_msg=f"row {r}")


def test_llama_extend_in_pieces_unscanned_equals_full_call():
  """Chunked prefill (pieces at slots 0 and 5, row 0 left-padded) then one decode token through unscanned
  remat layers (generation covers the scanned ones): every logit equals LlamaForCausalLM.__call__ on the
  valid tokens with the same positions."""
  model, config, _ = tiny()
  config = config.with_runtime(scan_layers=False, remat_policy="full")
  variables = {"params": fixtures.llava_params_from_hf_model(model, config)["language_model"]}
  lm = LlamaForCausalLM(config.text, config.runtime)
  ids = np.asarray([[0, 0, 1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]], np.int32)
  mask = np.ones_like(ids)
  mask[0, :2] = 0
  nxt = np.asarray([[13], [50]], np.int32)
  full_ids = np.concatenate([ids, nxt], 1)
  full_mask = np.concatenate([mask, np.ones((2, 1), np.int32)], 1)
  positions = np.maximum(np.cumsum(full_mask, -1) - 1, 0).astype(np.int32)

  @jax.jit
  def run(v):  # one program: the pieces through the cache, and the full call
    embed = lambda i: lm.apply(v, i, method=lm.embed)
    cache = init_kv_cache(config.text, 2, 16)
    out = []
    for lo, hi in ((0, 5), (5, 11), (11, 12)):
      logits, cache = lm.apply(v, embed(full_ids[:, lo:hi]), positions[:, lo:hi], cache, lo, full_mask[:, lo:hi],
                               method=lm.extend)
      out.append(logits)
    return jnp.concatenate(out, axis=1), lm.apply(v, embed(full_ids), positions, full_mask)

  got, want = (np.asarray(x) for x in run(variables))
  real = full_mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


TEXT_ROWS = [np.asarray([1, 270, 280, 290, 300], np.int32), np.asarray([1, 400, 410, 420, 430, 440, 450, 460], np.int32)]


def test_one_compilation_per_shape_bucket():
  """Runs before the other two-row text tests, so its first call compiles the bucket they all share."""
  _, config, params = tiny()
  before = gen.compile_counts()
  # prompt lengths 5 / 9 (bucket 16), max_new_tokens 5 / 12 (bucket 16), different stops and sampling settings
  a = gen.generate(config, params, [[1, 5, 6, 7, 8], [1, 9]], max_new_tokens=5, stop_token_ids=[EOS])
  mid = gen.compile_counts()
  b = gen.generate(config, params, [[1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 9, 10]], max_new_tokens=12,
                   stop_token_ids=[EOS, 3], temperature=0.7, top_p=0.9, seed=4)
  after = gen.compile_counts()
  assert all(0 <= m - b0 <= 1 for m, b0 in zip(mid, before))  # exactly 1 when run in file order
  assert after == mid, f"second call in the same buckets recompiled: {mid} → {after}"
  assert len(a.token_ids[0]) <= 5 and len(b.token_ids[0]) <= 12
  assert gen.bucket_size(5) == gen.bucket_size(9) == gen.bucket_size(12) == 16 and gen.bucket_size(17) == 32
  assert gen.bucket_size(600) == 768


def test_stop_token_ids_end_rows_independently():
  _, config, params = tiny()
  free = [hf_generate(r, eos_token_id=None, max_new_tokens=MAX_NEW) for r in TEXT_ROWS]
  # a token HF's greedy run of row 0 first produces at step i >= 2
  i, stop = next((i, t) for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i])
  res = gen.generate(config, params, TEXT_ROWS, max_new_tokens=MAX_NEW, stop_token_ids=[stop, EOS])
  for r, ids in enumerate(TEXT_ROWS):
    want = hf_generate(ids, eos_token_id=[stop, EOS])
    assert res.token_ids[r] == want, f"row {r}"
    assert res.finish_reasons[r] == ("stop" if want[-1] in (stop, EOS) else "length")
  assert res.finish_reasons[0] == "stop" and res.token_ids[0] == free[0][:i + 1]


def _pick_stop_string(tokenizer, tokens):
  """A stop string of letters that first appears in the decoded greedy text at a token after the first."""
  for i in range(2, len(tokens)):
    piece = tokenizer.convert_ids_to_tokens(tokens[i]).replace("▁", "")
    if len(piece) >= 2 and piece.isalpha():
      before = tokenizer.decode(tokens[:i], skip_special_tokens=True)
      if piece not in before:
        return piece
  pytest.fail(f"no usable stop string in greedy tokens {tokens}")


def test_stop_strings_end_rows_independently_like_hf(tiny_tokenizer):
  _, config, params = tiny()
  free = hf_generate(TEXT_ROWS[0], eos_token_id=None)
  stop = _pick_stop_string(tiny_tokenizer, free)
  res = gen.generate(config, params, TEXT_ROWS, max_new_tokens=MAX_NEW, stop_token_ids=[EOS], stop_strings=[stop],
                     tokenizer=tiny_tokenizer)
  for r, ids in enumerate(TEXT_ROWS):
    want = hf_generate(ids, stop_strings=[stop], tokenizer=tiny_tokenizer)
    assert res.token_ids[r] == want, f"row {r}"
    full_text = tiny_tokenizer.decode([t for t in want if t != EOS], skip_special_tokens=True)
    hit = full_text.find(stop)
    assert res.texts[r] == (full_text if hit < 0 else full_text[:hit])
    assert res.finish_reasons[r] == ("stop" if hit >= 0 or want[-1] == EOS else "length")
  assert res.finish_reasons[0] == "stop" and stop not in res.texts[0]


def test_sampling_is_seeded_and_top_k_1_is_greedy():
  _, config, params = tiny()
  def run(input_ids=TEXT_ROWS, **kw):
    return gen.generate(config, params, input_ids, max_new_tokens=MAX_NEW, stop_token_ids=[-5], **kw)

  a = run(temperature=1.5, top_p=0.95, seed=7).token_ids
  assert a == run(temperature=1.5, top_p=0.95, seed=7).token_ids
  assert a != run(temperature=1.5, top_p=0.95, seed=8).token_ids
  twins = run(temperature=1.5, top_p=0.95, seed=7, input_ids=[TEXT_ROWS[0]] * 2).token_ids
  assert twins[0] == a[0] and twins[1] != twins[0]  # a row's draws depend on its key, not on the other rows
  assert run(temperature=1.5, top_p=0.95, seed=[7, 7], input_ids=[TEXT_ROWS[0]] * 2).token_ids == [a[0], a[0]]
  greedy = run().token_ids
  assert run(temperature=2.0, top_k=1, seed=3).token_ids == greedy
  assert greedy == [hf_generate(r, eos_token_id=None) for r in TEXT_ROWS]
  # per-row settings: row 0 greedy, row 1 sampled
  mixed = run(temperature=[0.0, 1.5], top_p=0.95, seed=7).token_ids
  assert mixed[0] == greedy[0] and mixed[1] == a[1]


def test_filter_logits_matches_hf_warpers():
  rng = np.random.RandomState(0)
  logits = (rng.randn(8, 200) * 3).astype(np.float32)
  settings = [(1.0, 0, 0.9), (0.7, 0, 0.5), (1.3, 5, 1.0), (1.0, 1, 1.0), (0.5, 20, 0.8), (2.0, 50, 0.3),
              (1.0, 300, 0.99), (0.9, 0, 0.0)]
  temps, ks, ps = (np.asarray(x) for x in zip(*settings))
  ours = np.asarray(jax.jit(filter_logits)(jnp.asarray(logits), temps.astype(np.float32), ks.astype(np.int32),
                                  ps.astype(np.float32)))
  for r, (temp, k, p) in enumerate(settings):
    scores = torch.from_numpy(logits[r:r + 1].copy())
    scores = TemperatureLogitsWarper(temp)(None, scores)  # HF generate's order: temperature, top-k, top-p
    if k:
      scores = TopKLogitsWarper(int(k))(None, scores)
    if p < 1.0:
      scores = TopPLogitsWarper(float(p))(None, scores)
    want = scores.numpy()[0]
    kept = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(ours[r]), kept, err_msg=f"row {r} {settings[r]}")
    assert 1 <= kept.sum() < 200 or (k == 0 and p == 1.0)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(ours[r].copy()), -1).numpy(),
                               torch.softmax(torch.from_numpy(want), -1).numpy(), atol=1e-6, rtol=0)


def test_stream_callback_yields_tokens_and_text_in_order(tiny_tokenizer):
  _, config, params = tiny()
  free = hf_generate(TEXT_ROWS[0], eos_token_id=None)
  stop = _pick_stop_string(tiny_tokenizer, free)
  events = []
  res = gen.generate(config, params, TEXT_ROWS, max_new_tokens=MAX_NEW, stop_token_ids=[EOS], stop_strings=[stop],
                     tokenizer=tiny_tokenizer, stream_callback=events.append, steps_per_chunk=3)
  for r in range(2):
    mine = [e for e in events if e.row == r]
    assert len(mine) >= 2 and all(e.finish_reason is None for e in mine[:-1])
    assert len(mine[0].token_ids) == 1  # the prefill's token is streamed before any decode chunk runs
    assert mine[-1].finish_reason == res.finish_reasons[r]
    assert [t for e in mine for t in e.token_ids] == res.token_ids[r]
    assert "".join(e.text for e in mine) == res.texts[r]
  assert stop not in "".join(e.text for e in events if e.row == 0)
  no_stream = gen.generate(config, params, TEXT_ROWS, max_new_tokens=MAX_NEW, stop_token_ids=[EOS],
                           stop_strings=[stop], tokenizer=tiny_tokenizer)
  assert no_stream.token_ids == res.token_ids and no_stream.texts == res.texts


def test_sharded_params_on_a_mesh_equal_unsharded():
  _, config, params = tiny()
  mesh = parallel.make_mesh((2, 2, 2))
  sharded = gen.shard_params(config, params, mesh)
  q = sharded["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.shard_shape(q.shape) != q.shape  # really split (fsdp × tensor)

  def run(p, **kw):  # text rows keep the compile short; the vision tower's sharding is tested in test_clip
    return gen.generate(config, p, TEXT_ROWS, max_new_tokens=MAX_NEW, stop_token_ids=[-5], **kw).token_ids

  before = gen.compile_counts()[1]
  greedy = run(sharded, mesh=mesh, steps_per_chunk=4)
  sampled = run(sharded, mesh=mesh, temperature=1.5, top_k=50, seed=11)
  assert gen.compile_counts()[1] - before <= 1  # chunks reuse one decode program (the state's shardings are pinned)
  assert greedy == run(params) == [hf_generate(r, eos_token_id=None) for r in TEXT_ROWS]
  assert sampled == run(params, temperature=1.5, top_k=50, seed=11)


def test_bad_inputs_are_clear_errors(tiny_tokenizer):
  _, config, params = tiny()
  run = functools.partial(gen.generate, config, params)
  with pytest.raises(ValueError, match="image placeholders"):
    run([_image_prompt([1, 5], [6])], None)
  with pytest.raises(ValueError, match="pixel_values must be"):
    run([_image_prompt([1, 5], [6])], np.zeros((1, 3, 28, 28), np.float32))
  with pytest.raises(ValueError, match="placeholder run of"):
    run([np.asarray([1, IMAGE_TOKEN, IMAGE_TOKEN, 5])], _pixels(1, 0))
  with pytest.raises(ValueError, match="top_p"):
    run([[1, 5]], top_p=1.5)
  with pytest.raises(ValueError, match="tokenizer"):
    run([[1, 5]], stop_strings=["###"])
  with pytest.raises(ValueError, match="outside the vocabulary"):
    run([[1, VOCAB + 3]])
  with pytest.raises(ValueError, match="max_position_embeddings"):
    run([[1, 5]], max_new_tokens=10_000)
  with pytest.raises(ValueError, match="exactly one of"):
    run([[1, 5]], prompts=["hi"], tokenizer=tiny_tokenizer)


def test_streamed_text_is_never_taken_back_on_byte_fallback(tiny_tokenizer):
  """`<0x20>` alone decodes to a space but `<0x20><0x92>` decodes as two U+FFFD (a byte run decodes as a
  whole): the stream must hold a byte run back until it ends, and the pieces concatenate to the final text."""
  from llava_jax.infer.streaming import AnswerStream
  vocab = tiny_tokenizer.get_vocab()
  word = tiny_tokenizer("the answer", add_special_tokens=False).input_ids
  tokens = (word + [vocab["<0x20>"], vocab["<0x92>"]] + word + [vocab["<0xC3>"], vocab["<0xA9>"]]
            + [vocab["<0xE6>"], vocab["<0x97>"], vocab["<0xA5>"]])
  row = AnswerStream(tiny_tokenizer, [tiny_tokenizer.eos_token_id], strip=False)  # as generate() uses it
  pieces = []
  for tok in tokens + [tiny_tokenizer.eos_token_id]:
    piece = row.add([tok])
    if piece:
      pieces.append(piece)
  assert row.finish_reason == "stop"
  assert "".join(pieces) == row.text == tiny_tokenizer.decode(tokens, skip_special_tokens=True)
  assert "é" in row.text and "日" in row.text


def test_reference_tokenizer_image_token_rule(tiny_tokenizer):
  """The shared oracle follows the reference's rule: BOS once at the front, every later chunk's first token
  (its BOS) dropped, one image id (or a placeholder run) per `<image>`; no BOS → nothing dropped."""
  tok = tiny_tokenizer
  a, b = tok("USER: ").input_ids, tok("\nWhat? ASSISTANT:").input_ids
  assert a[0] == b[0] == tok.bos_token_id
  got = fixtures.tokenizer_image_token(tok, "USER: <image>\nWhat? ASSISTANT:")
  assert got == a + [-200] + b[1:]
  assert fixtures.tokenizer_image_token(tok, "<image><image>x", 7, 3) == [1, 7, 7, 7, 7, 7, 7] + tok("x").input_ids[1:]
  no_bos = type(tok).from_pretrained(tok.name_or_path, add_bos_token=False)
  a2, b2 = no_bos("USER: ").input_ids, no_bos("\nWhat?").input_ids
  assert a2[0] != tok.bos_token_id
  assert fixtures.tokenizer_image_token(no_bos, "USER: <image>\nWhat?") == a2 + [-200] + b2
