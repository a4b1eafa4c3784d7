"""grain pipeline: fixed shapes and buckets, batch contents equal to the per-sample encoders, shuffle and
sharding, packing (first-fit) and packed-vs-alone logits, grouping by modality, resume equality, hostile
data with exact skip counts, strict mode, workers, and the inspect helper."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import image as image_lib
from llava_jax.data import pipeline
from llava_jax.data.errors import REASONS, SampleError
from llava_jax.data.sources import LlavaJsonSource
from llava_jax.data.tokenize import encode_conversation

TEMPLATE = "vicuna_v1"
IMAGE_SIZE = 28
NUM_IMAGE_TOKENS = 4
IMAGE_TOKEN = -200
MAX_PIXELS = 50_000
KEYS = {"input_ids": np.int32, "loss_mask": np.bool_, "segment_ids": np.int32, "positions": np.int32,
        "pixel_values": np.float32, "image_valid": np.bool_}
WORDS = ["red", "blue", "green", "square", "circle", "left", "right", "two", "three", "the", "is", "a"]


# ------------------------------------------------------------------------------------------------ corpus

def _turns(question, answer, image=False):
  return [{"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]


def _answer(i, rng):
  return " ".join(rng.choice(WORDS) for _ in range(1 + (i * 7) % 23)) + "."


def _save_png(path, rng, size=(32, 24)):
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_corpus(root, n_image=10, n_text=5, seed=0):
  """LLaVA records: image samples (one PNG each, under root) and text-only samples, answers of varied length."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  records = []
  for i in range(n_image + n_text):
    if i < n_image:
      _save_png(os.path.join(root, f"img{i}.png"), rng, size=(24 + i, 20 + 2 * i))
      records.append({"id": f"img-{i}", "image": f"img{i}.png",
                      "conversations": _turns(f"What is shown {i}?", _answer(i, rng), image=True)})
    else:
      records.append({"id": f"txt-{i}", "conversations": _turns(f"Say something {i}.", _answer(i, rng))})
  order = rng.permutation(len(records))  # interleave the modalities
  return [records[k] for k in order]


def _source(records, root, name="data.json"):
  """The records as a LLaVA JSON file read back by LlavaJsonSource (image paths relative to root)."""
  path = os.path.join(root, name)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(records, f)
  return LlavaJsonSource(path, image_root=root)


def _kw(tok, **over):
  kw = dict(tokenizer=tok, template=TEMPLATE, image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS,
            image_token_index=IMAGE_TOKEN, max_length=128, global_batch_size=4, seed=0,
            max_pixels=MAX_PIXELS, process_index=0, process_count=1, bucket_lengths=(64, 96))
  kw.update(over)
  return kw


def _expected(record, tok, root, max_length):
  """The per-sample reference: encode_conversation + load_image/preprocess, as a sample would be alone."""
  paths = record.get("image")
  paths = [] if paths is None else [paths] if isinstance(paths, str) else list(paths)
  enc = encode_conversation(record["conversations"], TEMPLATE, tok, num_image_tokens=NUM_IMAGE_TOKENS,
                            image_token_index=IMAGE_TOKEN, max_length=max_length, num_images=len(paths))
  pixels = [image_lib.preprocess(image_lib.load_image(os.path.join(root, p)), image_size=IMAGE_SIZE,
                                 aspect_ratio="square") for p in paths]
  return enc.input_ids, enc.loss_mask, pixels


def check_batch(batch, ids, by_id, tok, root, *, rows, image_slots, t=None, max_length=128):
  """Shapes, dtypes and every value of a batch against the per-sample encoders (row-major image order)."""
  assert set(batch) == set(KEYS)
  for k, dt in KEYS.items():
    assert batch[k].dtype == dt, k
  b, T = batch["input_ids"].shape
  assert b == rows and (t is None or T == t)
  for k in ("loss_mask", "segment_ids", "positions"):
    assert batch[k].shape == (b, T)
  assert batch["pixel_values"].shape == (image_slots, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert batch["image_valid"].shape == (image_slots,)
  assert len(ids) <= rows
  images = []
  for r in range(rows):
    row_ids = ids[r] if r < len(ids) else []
    start = 0
    for seg, sid in enumerate(row_ids, start=1):
      x_ids, x_mask, x_pix = _expected(by_id[sid], tok, root, max_length)
      n = len(x_ids)
      sl = slice(start, start + n)
      np.testing.assert_array_equal(batch["input_ids"][r, sl], x_ids)
      want_mask = x_mask.copy()
      want_mask[0] = False
      np.testing.assert_array_equal(batch["loss_mask"][r, sl], want_mask)
      assert (batch["segment_ids"][r, sl] == seg).all()
      np.testing.assert_array_equal(batch["positions"][r, sl], np.arange(n))
      images += x_pix
      start += n
    assert (batch["segment_ids"][r, start:] == 0).all() and not batch["loss_mask"][r, start:].any()
    assert (batch["input_ids"][r, start:] == 0).all() and (batch["positions"][r, start:] == 0).all()
  k = len(images)
  assert batch["image_valid"][:k].all() and not batch["image_valid"][k:].any()
  if k:
    np.testing.assert_array_equal(batch["pixel_values"][:k], np.stack(images))
  assert not batch["pixel_values"][k:].any()
  assert int((batch["input_ids"] == IMAGE_TOKEN).sum()) == k * NUM_IMAGE_TOKENS


def take(it, n):
  out = []
  for _ in range(n):
    out.append((next(it), it.last_ids))
  return out


def drain(it):
  out = []
  for b in it:
    out.append((b, it.last_ids))
  return out


def flat(batches):
  return [sid for _, ids in batches for row in ids for sid in row]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("corpus"))
  records = make_corpus(root)
  return root, records, {r["id"]: r for r in records}


# ------------------------------------------------------------------------------------------------ padding

def test_padding_batches_have_fixed_shapes_buckets_and_exact_contents(corpus, tiny_tokenizer):
  root, records, by_id = corpus
  it = pipeline.make_pipeline(_source(records, root), num_epochs=1, **_kw(tiny_tokenizer))
  assert it.spec.buckets == (64, 96, 128) and it.spec.image_slots == 4
  batches = drain(it)
  seen_t = set()
  for batch, ids in batches:
    lengths = [len(_expected(by_id[r[0]], tiny_tokenizer, root, 128)[0]) for r in ids]
    t = min(n for n in (64, 96, 128) if n >= max(lengths))  # the smallest bucket that holds the longest row
    seen_t.add(t)
    check_batch(batch, ids, by_id, tiny_tokenizer, root, rows=4, image_slots=4, t=t)
    assert all(len(r) == 1 for r in ids)
  assert len(seen_t) >= 2, "the corpus should exercise more than one bucket"
  assert sorted(flat(batches)) == sorted(by_id)  # one epoch: every sample once (last batch partly empty)
  assert len(batches) == -(-len(records) // 4)


def test_image_slots_bound_a_padding_batch(corpus, tiny_tokenizer):
  root, records, by_id = corpus
  image_only = [r for r in records if "image" in r]
  it = pipeline.make_pipeline(_source(image_only, root), num_epochs=1, images_per_batch=2,
                              **_kw(tiny_tokenizer))
  batches = drain(it)
  for batch, ids in batches:
    check_batch(batch, ids, by_id, tiny_tokenizer, root, rows=4, image_slots=2)
    assert len(ids) == 2  # two images fill the slots: the batch closes with two empty rows
  assert sorted(flat(batches)) == sorted(r["id"] for r in image_only)


def test_in_memory_images_from_the_synthetic_source(tiny_tokenizer):
  """Records carrying PIL images ("images") instead of paths; placeholder order = image order."""
  from llava_jax.data.sources import SyntheticShapesSource
  source = SyntheticShapesSource(8, seed=3, image_size=40, multi_turn=True)
  it = pipeline.make_pipeline(source, num_epochs=1, **_kw(tiny_tokenizer, global_batch_size=4))
  batches = drain(it)
  assert sorted(flat(batches)) == sorted(source[i]["id"] for i in range(8))
  by_id = {source[i]["id"]: source[i] for i in range(8)}
  for batch, ids in batches:
    want = [image_lib.preprocess(image_lib.load_image(by_id[r[0]]["images"][0]), image_size=IMAGE_SIZE)
            for r in ids]
    np.testing.assert_array_equal(batch["pixel_values"][:len(want)], np.stack(want))
    assert batch["image_valid"].tolist() == [True] * len(want) + [False] * (4 - len(want))
    for r, row in enumerate(ids):
      enc = encode_conversation(by_id[row[0]]["conversations"], TEMPLATE, tiny_tokenizer,
                                num_image_tokens=NUM_IMAGE_TOKENS, image_token_index=IMAGE_TOKEN, max_length=128)
      np.testing.assert_array_equal(batch["input_ids"][r, :len(enc.input_ids)], enc.input_ids)


# ------------------------------------------------------------------------------------------------ photos

def _photo_records():
  """Real photos (skimage astronaut / chelsea / coffee) in landscape, portrait and square crops, in memory;
  one text-only sample and one two-image sample so padding slots and image order are exercised."""
  from tests import fixtures
  records = []
  for name in ("astronaut", "chelsea", "coffee"):
    photo = fixtures.photo(name)
    h, w = photo.shape[:2]
    for crop_name, crop in (("wide", photo[: h // 3]), ("tall", photo[:, : w // 4 + 1]), ("full", photo)):
      records.append({"id": f"{name}-{crop_name}", "images": [np.ascontiguousarray(crop)],
                      "conversations": _turns(f"What is in {name}?", f"A {crop_name} photo.", image=True)})
  records.insert(4, {"id": "text", "conversations": _turns("Say hi.", "Hi.")})
  records.insert(7, {"id": "two", "images": [records[0]["images"][0], records[8]["images"][0]],
                     "conversations": _turns("What is this?", "A photo.", image=True)
                     + _turns("And this one <image>", "Another photo.")})
  return records


def _clip_reference(images, aspect_ratio, size=IMAGE_SIZE):
  """transformers' CLIPImageProcessorPil per image (after the reference's expand2square for 'pad'):
  (float32 pixels [k, S, S, 3], uint8 resized images [k, S, S, 3] from the processor without rescale and
  normalize)."""
  from tests.data.test_image import _hf_pixels, _hf_processor, _hf_uint8_processor, _reference_expand2square
  processor, processor_uint8 = _hf_processor(size), _hf_uint8_processor(size)
  floats, uint8s = [], []
  for array in images:
    pil = Image.fromarray(array)
    if aspect_ratio == "pad":
      pil = _reference_expand2square(pil, image_lib.pad_background())
    floats.append(_hf_pixels(processor, pil))
    uint8s.append(_hf_pixels(processor_uint8, pil))
  return np.stack(floats), np.stack(uint8s)


def _check_photo_batches(batches, by_id, aspect_ratio, image_slots):
  for batch, ids in batches:
    assert batch["pixel_values"].dtype == np.float32
    images = [im for row in ids for sid in row for im in by_id[sid].get("images", [])]
    k = len(images)
    assert batch["image_valid"].tolist() == [True] * k + [False] * (image_slots - k)
    if k:
      want, _ = _clip_reference(images, aspect_ratio)
      np.testing.assert_allclose(batch["pixel_values"][:k], want, atol=1e-5, rtol=0, err_msg=str(ids))
    assert not batch["pixel_values"][k:].any()  # padding slots are 0.0, not a normalized black image


@pytest.mark.parametrize("aspect_ratio", ["square", "pad"])
def test_batches_equal_clip_image_processor_on_photos(tiny_tokenizer, aspect_ratio):
  """Pixel batches (uint8 per sample, normalized once per batch) equal transformers' CLIPImageProcessor run
  on each photo alone, image by image in placeholder order, with zero padding slots."""
  records = _photo_records()
  by_id = {r["id"]: r for r in records}
  it = pipeline.make_pipeline(records, num_epochs=1, shuffle=False, aspect_ratio=aspect_ratio,
                              max_images_per_sample=2, **_kw(tiny_tokenizer, global_batch_size=2, max_pixels=None))
  batches = drain(it)
  assert sorted(flat(batches)) == sorted(by_id)
  assert any(len(ids) < 2 or not batch["image_valid"].all() for batch, ids in batches)  # padding slots seen
  _check_photo_batches(batches, by_id, aspect_ratio, it.spec.image_slots)


def test_workers_send_uint8_pixels_and_batches_are_normalized_after(tiny_tokenizer):
  """With 2 worker processes, the elements that cross the process boundary carry uint8 `pixels` equal to the
  processor's resized image (no float pixels at all), and the batches equal the processor's float32 output."""
  records = _photo_records()
  by_id = {r["id"]: r for r in records}
  ds = pipeline.make_dataset(records, num_epochs=1, aspect_ratio="pad", worker_count=2, max_images_per_sample=2,
                             **_kw(tiny_tokenizer, global_batch_size=2, max_pixels=None))
  received = []

  def record(element):  # runs in this process, on what the workers sent
    received.append(element)
    return element

  it = iter(pipeline.BatchIterDataset(ds.parents[0].map(record), spec=ds.spec))
  try:
    batches = drain(it)
  finally:
    it.close()
  assert sorted(e["id"] for e in received) == sorted(by_id)
  for element in received:
    assert "pixel_values" not in element
    assert not any(np.issubdtype(v.dtype, np.floating) for v in element.values() if isinstance(v, np.ndarray))
    images = by_id[element["id"]].get("images", [])
    assert element["pixels"].dtype == np.uint8
    assert element["pixels"].shape == (len(images), IMAGE_SIZE, IMAGE_SIZE, 3)
    if images:
      np.testing.assert_array_equal(element["pixels"], _clip_reference(images, "pad")[1])
  assert sorted(flat(batches)) == sorted(by_id)
  _check_photo_batches(batches, by_id, "pad", ds.spec.image_slots)


# ------------------------------------------------------------------------------------------------ order

def test_shuffle_is_seeded_and_differs_per_epoch(corpus, tiny_tokenizer):
  root, records, by_id = corpus
  def order(seed, shuffle=True):
    it = pipeline.make_pipeline(_source(records, root), num_epochs=2, **_kw(tiny_tokenizer, seed=seed,
                                                                              shuffle=shuffle, global_batch_size=1))
    return flat(drain(it))
  a, a2, b = order(0), order(0), order(1)
  n = len(records)
  assert a == a2
  assert a != b
  assert sorted(a[:n]) == sorted(by_id) and sorted(a[n:]) == sorted(by_id)
  assert a[:n] != a[n:]  # each epoch is shuffled differently
  assert order(0, shuffle=False) == [r["id"] for r in records] * 2


def test_processes_read_disjoint_covering_shards(corpus, tiny_tokenizer):
  root, records, by_id = corpus
  n, count = len(records), 4  # 15 samples over 4 hosts: 3 each, 3 left out of the epoch
  shards = []
  for index in range(count):
    it = pipeline.make_pipeline(_source(records, root), num_epochs=1,
                                **_kw(tiny_tokenizer, global_batch_size=8, process_index=index,
                                      process_count=count))
    assert it.spec.rows == 2
    shards.append(flat(drain(it)))
  assert all(len(s) == n // count for s in shards)
  union = set().union(*map(set, shards))
  assert len(union) == count * (n // count)  # disjoint
  assert union <= set(by_id)
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_pipeline(_source(records, root), **_kw(tiny_tokenizer, global_batch_size=6,
                                                         process_count=4))


# ------------------------------------------------------------------------------------------------ packing

def _first_fit(samples, rows, length, slots):
  """The documented rule, as an oracle: each sample → the first row of the open batch with room (tokens) and
  free image slots; a sample that fits nowhere closes the batch and opens the next."""
  batches, cur, used, imgs = [], [], [], 0
  for sid, n, k in samples:
    placed = False
    if imgs + k <= slots:
      for r in range(len(cur)):
        if used[r] + n <= length:
          cur[r].append(sid); used[r] += n; placed = True
          break
      if not placed and len(cur) < rows:
        cur.append([sid]); used.append(n); placed = True
    if placed:
      imgs += k
      continue
    batches.append(cur)
    cur, used, imgs = [[sid]], [n], k
  if cur:
    batches.append(cur)
  return batches


def test_packing_is_first_fit_with_segments_and_restarting_positions(corpus, tiny_tokenizer):
  root, records, by_id = corpus
  it = pipeline.make_pipeline(_source(records, root), num_epochs=1, packing=True, shuffle=False,
                              **_kw(tiny_tokenizer, global_batch_size=2, max_length=256))
  assert it.spec.image_slots == 2 * (256 // NUM_IMAGE_TOKENS)
  batches = drain(it)
  for batch, ids in batches:
    check_batch(batch, ids, by_id, tiny_tokenizer, root, rows=2, image_slots=it.spec.image_slots, t=256,
                max_length=256)
  assert max(len(r) for _, ids in batches for r in ids) >= 2, "no row was packed"
  samples = [(r["id"], len(_expected(r, tiny_tokenizer, root, 256)[0]), int("image" in r)) for r in records]
  assert [ids for _, ids in batches] == _first_fit(samples, 2, 256, it.spec.image_slots)


def test_packing_respects_image_slots(corpus, tiny_tokenizer):
  root, records, by_id = corpus
  it = pipeline.make_pipeline(_source(records, root), num_epochs=1, packing=True, shuffle=False,
                              images_per_batch=3, **_kw(tiny_tokenizer, global_batch_size=2, max_length=256))
  batches = drain(it)
  for batch, ids in batches:
    check_batch(batch, ids, by_id, tiny_tokenizer, root, rows=2, image_slots=3, t=256, max_length=256)
  samples = [(r["id"], len(_expected(r, tiny_tokenizer, root, 256)[0]), int("image" in r)) for r in records]
  assert [ids for _, ids in batches] == _first_fit(samples, 2, 256, 3)
  assert sorted(flat(batches)) == sorted(by_id)


def _tiny_llava_config():
  from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
  vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=IMAGE_SIZE, patch_size=14)
  text = TextConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
  cfg = LlavaConfig(vision=vision, text=text, projector_type="mlp2x_gelu", image_token_index=IMAGE_TOKEN)
  assert cfg.num_image_tokens == NUM_IMAGE_TOKENS
  return cfg


@pytest.fixture(scope="module")
def tiny_llava():
  """(params, jitted apply) of a tiny random LlavaModel whose image runs are NUM_IMAGE_TOKENS long."""
  import jax
  from llava_jax.models.llava import LlavaModel, init_params
  cfg = _tiny_llava_config()
  params = jax.jit(lambda rng: init_params(cfg, rng))(jax.random.PRNGKey(0))
  model = LlavaModel(cfg)

  @jax.jit
  def packed(params, input_ids, pixel_values, positions, segment_ids, image_valid):
    return model.apply({"params": params}, input_ids, pixel_values, positions=positions, segment_ids=segment_ids,
                       image_valid=image_valid)

  @jax.jit
  def alone(params, input_ids, pixel_values):
    return model.apply({"params": params}, input_ids, pixel_values)

  return params, packed, alone


@pytest.mark.parametrize("packing", [True, False])
def test_batch_logits_equal_each_sample_run_alone(corpus, tiny_tokenizer, tiny_llava, packing):
  """A packed row (segment-aware attention, restarting positions) and a padded row give, on every sample's
  tokens, the logits of that sample run alone through LlavaModel (alone = batch of one, no mask; the ids
  are right-padded to one length so a single compile serves all samples: causal attention makes positions
  < n independent of what follows)."""
  root, records, by_id = corpus
  params, packed, alone = tiny_llava
  it = pipeline.make_pipeline(_source(records, root), num_epochs=1, packing=packing, shuffle=False,
                              **_kw(tiny_tokenizer, global_batch_size=2, max_length=256,
                                    images_per_batch=4))
  batch, ids = next(it), it.last_ids
  if packing:
    assert max(len(r) for r in ids) >= 2
  logits = np.asarray(packed(params, batch["input_ids"], batch["pixel_values"], batch["positions"],
                             batch["segment_ids"], batch["image_valid"]))
  assert np.isfinite(logits).all()
  for r, row in enumerate(ids):
    start = 0
    for sid in row:
      x_ids, _, x_pix = _expected(by_id[sid], tiny_tokenizer, root, 256)
      n = len(x_ids)
      padded = np.zeros((1, 256), np.int32)
      padded[0, :n] = x_ids
      pix = np.stack(x_pix) if x_pix else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
      want = np.asarray(alone(params, padded, pix))[0, :n]
      np.testing.assert_allclose(logits[r, start:start + n], want, atol=2e-5, rtol=1e-5)
      start += n


# ------------------------------------------------------------------------------------------------ modality

def _is_image_row(batch, r):
  return bool((batch["input_ids"][r] == IMAGE_TOKEN).any())


@pytest.mark.parametrize("packing", [False, True])
def test_group_by_modality(corpus, tiny_tokenizer, packing):
  root, records, by_id = corpus
  kw = _kw(tiny_tokenizer, max_length=256) if packing else _kw(tiny_tokenizer)
  it = pipeline.make_pipeline(_source(records, root), num_epochs=1, packing=packing, group_by_modality=True, **kw)
  batches = drain(it)
  kinds = []
  for batch, ids in batches:
    check_batch(batch, ids, by_id, tiny_tokenizer, root, rows=4, image_slots=it.spec.image_slots,
                max_length=kw["max_length"])
    row_kinds = {_is_image_row(batch, r) for r in range(len(ids))}
    assert len(row_kinds) == 1, f"a batch mixes modalities: {ids}"
    assert row_kinds == {"image" in by_id[ids[0][0]]}
    kinds.append(row_kinds.pop())
  assert set(kinds) == {True, False}
  assert sorted(flat(batches)) == sorted(by_id)
  # One modality absent (the reference crashes here): text only, then images only.
  for keep_images in (False, True):
    subset = [r for r in records if ("image" in r) == keep_images]
    it = pipeline.make_pipeline(_source(subset, root), num_epochs=1, packing=packing, group_by_modality=True,
                                **kw)
    got = drain(it)
    assert sorted(flat(got)) == sorted(r["id"] for r in subset)
    assert all(_is_image_row(b, r) == keep_images for b, ids in got for r in range(len(ids)))


def test_group_waiting_too_long_is_emitted_early(corpus, tiny_tokenizer):
  root, records, by_id = corpus
  images = [r for r in records if "image" in r]
  text = [r for r in records if "image" not in r][0]
  source = images[:5] + [text] + images[5:] * 3
  for i, r in enumerate(source):
    source[i] = dict(r, id=f"{r['id']}#{i}")
  by_id2 = {r["id"]: dict(r) for r in source}
  it = pipeline.make_pipeline(_source(source, root), num_epochs=None, shuffle=False, group_by_modality=True,
                              max_group_wait=6, **_kw(tiny_tokenizer, global_batch_size=2))
  got = take(it, 6)
  # The text sample (fetch 5) has waited > 6 fetches once fetch 12 is due: 5 image batches went out before.
  pairs = [(0, 1), (2, 3), (4, 6), (7, 8), (9, 10)]
  assert [ids for _, ids in got[:5]] == [[[source[i]["id"]], [source[j]["id"]]] for i, j in pairs]
  assert got[5][1] == [[f"{text['id']}#5"]]
  check_batch(*got[5], by_id2, tiny_tokenizer, root, rows=2, image_slots=2)
  # With the default bound (32 x rows fetches) it waits for the next epoch's text sample
  # (fetch 21 + 5): a full batch, the 13th.
  it = pipeline.make_pipeline(_source(source, root), num_epochs=None, shuffle=False, group_by_modality=True,
                              **_kw(tiny_tokenizer, global_batch_size=2))
  ids = [ids for _, ids in take(it, 13)]
  assert ids[12] == [[f"{text['id']}#5"], [f"{text['id']}#5"]]
  assert all("txt" not in sid for row in ids[:12] for sid in row)


# ------------------------------------------------------------------------------------------------ resume

def _assert_same_batches(got, want):
  assert len(got) == len(want)
  for (b1, ids1), (b2, ids2) in zip(got, want):
    assert ids1 == ids2
    assert set(b1) == set(b2)
    for k in b1:
      assert b1[k].dtype == b2[k].dtype and b1[k].shape == b2[k].shape, k
      assert b1[k].tobytes() == b2[k].tobytes(), k


@pytest.mark.parametrize("mode", [dict(), dict(packing=True, max_length=256), dict(group_by_modality=True),
                                  dict(packing=True, group_by_modality=True, max_length=256)],
                         ids=["padding", "packing", "grouped", "packing-grouped"])
def test_restored_state_resumes_at_exactly_the_next_batch(corpus, tiny_tokenizer, mode):
  root, records, by_id = corpus
  source = records + [{"id": "gone", "image": "gone.png", "conversations": _turns("Hm?", "No.", image=True)}]
  kw = _kw(tiny_tokenizer, **mode)
  it = pipeline.make_pipeline(_source(source, root), num_epochs=None, **kw)
  reference, states, counts = [], [], []
  for _ in range(9):
    states.append(json.loads(json.dumps(it.get_state())))  # the state is JSON-serializable
    counts.append(it.skip_counts())
    reference.append((next(it), it.last_ids))
  assert counts[-1]["missing_file"] >= 1
  waiting = 0
  for k in (1, 3, 5, 6):
    restored = pipeline.make_pipeline(_source(source, root), num_epochs=None, **kw)
    restored.set_state(states[k])
    assert restored.skip_counts() == counts[k]
    _assert_same_batches(take(restored, 3), reference[k:k + 3])
    waiting += bool(states[k]["keep"])
  if mode.get("packing") or mode.get("group_by_modality"):
    assert waiting, "no checkpoint was taken with samples waiting in an open batch: the replay went untested"


# ------------------------------------------------------------------------------------------------ bad data

HOSTILE_COUNTS = {"missing_file": 1, "unreadable_image": 3, "malformed_conversation": 3, "image_mismatch": 2,
                  "too_long": 2, "no_supervised_tokens": 1}


def make_hostile(root):
  """LLaVA records with every kind of bad sample, and odd but valid images. Returns (records, good ids)."""
  rng = np.random.default_rng(1)
  os.makedirs(root, exist_ok=True)
  p = lambda name: os.path.join(root, name)  # noqa: E731
  _save_png(p("ok.png"), rng)
  Image.fromarray(rng.integers(0, 65536, (20, 30)).astype("<u2")).save(p("gray16.png"))  # mode I;16
  Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).convert("CMYK").save(p("cmyk.jpg"))
  Image.fromarray(rng.integers(0, 256, (25, 25, 4), dtype=np.uint8)).save(p("rgba.png"))
  Image.fromarray(np.array([[[200, 10, 10]]], np.uint8)).save(p("one.png"))
  _save_png(p("big.png"), rng, size=(300, 200))  # 60000 pixels > MAX_PIXELS
  for name, mode in (("gray16.png", "I;16"), ("cmyk.jpg", "CMYK"), ("rgba.png", "RGBA")):
    assert Image.open(p(name)).mode == mode
  _save_png(p("full.png"), rng, size=(40, 40))
  with open(p("full.png"), "rb") as f:
    data = f.read()
  with open(p("truncated.png"), "wb") as f:
    f.write(data[:len(data) // 2])
  with open(p("fake.jpg"), "w") as f:
    f.write("this is not a JPEG")
  q = lambda i: _turns("What is this?", "A picture.", image=True)  # noqa: E731
  long_answer = " ".join(WORDS * 12)
  good = [
      {"id": "good-png", "image": "ok.png", "conversations": q(0)},
      {"id": "good-16bit", "image": "gray16.png", "conversations": q(0)},
      {"id": "good-cmyk", "image": "cmyk.jpg", "conversations": q(0)},
      {"id": "good-rgba", "image": "rgba.png", "conversations": q(0)},
      {"id": "good-1x1", "image": "one.png", "conversations": q(0)},
      {"id": "good-text", "conversations": _turns("Hello there.", "Hi.")},
      {"id": "good-two-images", "image": ["ok.png", "rgba.png"],
       "conversations": q(0) + _turns("And this one <image>", "Another picture.")},
      {"id": "good-long", "conversations": _turns("Tell me.", long_answer)},  # truncated, still supervised
  ]
  bad = [
      {"id": "bad-missing", "image": "nowhere.png", "conversations": q(0)},
      {"id": "bad-truncated", "image": "truncated.png", "conversations": q(0)},
      {"id": "bad-not-image", "image": "fake.jpg", "conversations": q(0)},
      {"id": "bad-oversized", "image": "big.png", "conversations": q(0)},
      {"id": "bad-empty", "conversations": []},
      {"id": "bad-one-sided", "conversations": [{"from": "human", "value": "Anyone?"}]},
      {"id": "bad-non-alternating", "conversations": [{"from": "human", "value": "One."},
                                                      {"from": "human", "value": "Two."},
                                                      {"from": "gpt", "value": "Three."}]},
      {"id": "bad-question-too-long", "conversations": _turns(long_answer, "Ok.")},
      {"id": "bad-image-cut", "image": ["ok.png", "one.png"],
       "conversations": _turns("<image>\nFirst?", long_answer) + _turns("<image>\nSecond?", "No.")},
      {"id": "bad-three-images", "image": ["ok.png", "ok.png", "ok.png"],
       "conversations": _turns("<image><image><image>\nThree?", "Yes.")},
      {"id": "bad-no-placeholder", "image": "ok.png", "conversations": _turns("No placeholder here.", "Right.")},
      {"id": "bad-no-image", "conversations": _turns("<image>\nWhere is the image?", "Missing.")},
  ]
  records = []
  for i in range(max(len(good), len(bad))):  # interleaved: bad samples sit between good ones
    records += good[i:i + 1] + bad[i:i + 1]
  return records, [r["id"] for r in good]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("hostile"))
  records, good = make_hostile(root)
  return root, records, good, {r["id"]: r for r in records}


def _hostile_kw(tok, **over):
  return _kw(tok, max_images_per_sample=2, **over)


def test_hostile_corpus_is_skipped_and_counted_per_reason(hostile, tiny_tokenizer, caplog):
  root, records, good, by_id = hostile
  with caplog.at_level("WARNING", logger="llava_jax.data.pipeline"):
    it = pipeline.make_pipeline(_source(records, root), num_epochs=1, **_hostile_kw(tiny_tokenizer))
    batches = drain(it)
  assert it.skip_counts() == {r: HOSTILE_COUNTS.get(r, 0) for r in REASONS}
  assert sorted(flat(batches)) == sorted(good)
  metrics = it.metrics()
  assert metrics["data/samples"] == len(good) and metrics["data/batches"] == len(batches)
  assert metrics["data/skipped/unreadable_image"] == 3
  for batch, ids in batches:
    check_batch(batch, ids, by_id, tiny_tokenizer, root, rows=4, image_slots=8)
  logged = caplog.text
  for r in records:
    if r["id"].startswith("bad-"):
      assert r["id"] in logged
  assert "[missing_file]" in logged and "[too_long]" in logged


def test_strict_mode_raises_naming_the_sample(hostile, tiny_tokenizer):
  root, records, good, by_id = hostile
  it = pipeline.make_pipeline(_source(records, root), num_epochs=1, shuffle=False, strict=True,
                              **_hostile_kw(tiny_tokenizer))
  with pytest.raises(SampleError, match="bad-missing") as e:
    drain(it)
  assert e.value.reason == "missing_file" and e.value.sample_id == "bad-missing"
  assert "nowhere.png" in str(e.value)


def test_all_bad_data_fails_instead_of_spinning(hostile, tiny_tokenizer):
  root, records, good, by_id = hostile
  bad = [r for r in records if r["id"].startswith("bad-")]
  it = pipeline.make_pipeline(_source(bad, root, "bad.json"), num_epochs=None, **_hostile_kw(tiny_tokenizer))
  with pytest.raises(RuntimeError, match="skipped"):
    next(it)


def test_workers_give_the_same_batches_and_counts(hostile, tiny_tokenizer):
  """Decoding in 2 worker processes gives the same batches, byte for byte, and the same skip counts as
  in-process decoding; a state taken with samples waiting in an open batch restores through the workers."""
  root, records, good, by_id = hostile
  source = _source(records, root)
  kw = _hostile_kw(tiny_tokenizer, packing=True, group_by_modality=True, num_epochs=1)
  want_it = pipeline.make_pipeline(source, **kw)
  want = drain(want_it)
  it = pipeline.make_pipeline(source, worker_count=2, **kw)
  try:
    got = take(it, 1)
    state = json.loads(json.dumps(it.get_state()))
    assert state["keep"], "the checkpoint should hold a waiting sample"
    got += drain(it)
    assert it.skip_counts() == want_it.skip_counts() == {r: HOSTILE_COUNTS.get(r, 0) for r in REASONS}
    _assert_same_batches(got, want)
    it.set_state(state)
    _assert_same_batches(drain(it), want[1:])
  finally:
    it.close()
  assert sorted(flat(want)) == sorted(good)


# ------------------------------------------------------------------------------------------------ inspect

def test_inspect_writes_jsonl_and_marks_supervised_spans(hostile, tiny_tokenizer, tmp_path):
  from llava_jax.data.inspect import describe, inspect_samples
  root, records, good, by_id = hostile
  chosen = [by_id["good-two-images"], by_id["good-text"], by_id["bad-missing"]]
  out = tmp_path / "inspect" / "samples.jsonl"
  printed = []
  counts = inspect_samples(_source(chosen, root, "inspect.json"), tiny_tokenizer, TEMPLATE,
                           num_image_tokens=NUM_IMAGE_TOKENS, image_token_index=IMAGE_TOKEN, max_length=128,
                           out_path=str(out), limit=None, max_images_per_sample=2, print_fn=printed.append)
  assert counts["samples"] == 2 and counts["missing_file"] == 1
  lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
  assert [line["id"] for line in lines] == ["good-two-images", "good-text", "bad-missing"]
  for line in lines[:2]:
    assert set(line) == {"id", "input_ids", "loss_mask", "text", "supervised_text"}
    x_ids, x_mask, _ = _expected(by_id[line["id"]], tiny_tokenizer, root, 128)
    assert line["input_ids"] == x_ids.tolist() and line["loss_mask"] == x_mask.astype(int).tolist()
  two = lines[0]
  # The reference prompt (vicuna_v1), decoded: images compact, answers + "</s>" the only supervised text.
  system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the user's questions.")
  img = f"<image×{NUM_IMAGE_TOKENS}>"
  assert two["text"] == (f"<s> {system} USER: {img}\nWhat is this? ASSISTANT: A picture.</s>"
                         f"USER: {img}\nAnd this one ASSISTANT: Another picture.</s>")
  assert [s.strip() for s in two["supervised_text"]] == ["A picture.</s>", "Another picture.</s>"]
  assert lines[1]["supervised_text"][0].strip() == "Hi.</s>"
  assert lines[2]["skip"] == "missing_file" and "nowhere.png" in lines[2]["error"]
  assert "[[ A picture.</s>]]" in printed[0] and img in printed[0]
  assert "SKIPPED [missing_file]" in printed[2]
  colored = describe(two["input_ids"], two["loss_mask"], tiny_tokenizer, image_token_index=IMAGE_TOKEN,
                     num_image_tokens=NUM_IMAGE_TOKENS, color=True)
  assert colored["marked"].count("\x1b[1;32m") == 2 and colored["text"] == two["text"]
