"""Hostile image paths and values (issue 14): a path through a file, a 300-byte name, a symlink loop, a NUL byte,
a FIFO, a directory, an empty string, a non-string, a truncated PNG, a huge declared size (pixels and bytes); and
JSON Lines data files with U+2028 in a string or a line that is not UTF-8.

Non-strict: each is a counted skip with the right reason, logged with its id and its line in the data file, and
the good rows are batched intact (in-process and through worker processes). Strict: a SampleError naming the
row (id and line) and the reason. Reading never blocks: a FIFO is fed a valid PNG by `fifo_feeder` whenever a
reader blocks on it, so a regression shows as an accepted sample / a recorded feed instead of a hang.
Inspect and training use the same decision (a 2-image row near the length limit).
"""
import contextlib
import errno
import io
import json
import os
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import image as image_lib
from llava_jax.data import pipeline
from llava_jax.data.errors import REASONS, SampleError
from llava_jax.data.sources import LlavaJsonSource
from tests.data.test_pipeline import _kw, _save_png, _turns, check_batch, drain, flat
from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPARSE_BYTES = 1 << 28  # a sparse file above the default max_image_bytes (128 MiB); takes no disk space

# case → (the record's "image" value, expected reason)
CASES = {
    "through_file": ("plain.png/x.png", "missing_file"),
    "long_name": ("n" * 296 + ".png", "unreadable_image"),
    "symlink_loop": ("loop_a.png", "unreadable_image"),
    "nul_byte": ("ok.png\x00.png", "malformed_conversation"),
    "fifo": ("fifo.png", "unreadable_image"),
    "directory": ("adir.png", "unreadable_image"),
    "empty_string": ("", "malformed_conversation"),
    "non_string": (["ok.png", 5], "malformed_conversation"),
    "truncated_png": ("truncated.png", "unreadable_image"),
    "declared_dims": ("declared.png", "unreadable_image"),
    "sparse_huge_file": ("sparse.png", "unreadable_image"),
}
# the reason's wording in the message (the OS error or the check that refused it)
MESSAGES = {"through_file": "ENOTDIR", "long_name": "ENAMETOOLONG", "symlink_loop": "ELOOP", "nul_byte": "NUL",
            "fifo": "not a regular file (a FIFO)", "directory": "not a regular file (a directory)",
            "empty_string": "empty", "non_string": "int", "truncated_png": "truncated", "declared_dims": "pixels",
            "sparse_huge_file": "max_bytes"}


def _png_bytes(size=(8, 6)):
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _declared_png(width, height) -> bytes:
  """A PNG whose header declares width x height RGB pixels, with only a few bytes of data."""
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
          + _chunk(b"IEND", b""))


def make_files(root):
  """The files the CASES point at, and ok.png."""
  rng = np.random.default_rng(3)
  p = lambda name: os.path.join(root, name)  # noqa: E731
  _save_png(p("ok.png"), rng)
  _save_png(p("plain.png"), rng)
  os.symlink("loop_b.png", p("loop_a.png"))
  os.symlink("loop_a.png", p("loop_b.png"))
  os.mkfifo(p("fifo.png"))
  os.mkdir(p("adir.png"))
  data = _png_bytes((40, 40))
  with open(p("truncated.png"), "wb") as f:
    f.write(data[:len(data) // 2])
  with open(p("declared.png"), "wb") as f:
    f.write(_declared_png(100_000, 100_000))
  with open(p("sparse.png"), "wb") as f:  # a valid PNG, then a hole: PIL alone would decode it
    f.write(_png_bytes())
    f.truncate(SPARSE_BYTES)


@contextlib.contextmanager
def fifo_feeder(path, payload: bytes):
  """While active, whoever blocks opening the FIFO `path` for reading is released and fed `payload` (a valid
  PNG). Yields the list of feeds: non-empty means a reader blocked on the FIFO (the bug this guards against)."""
  stop, fed = threading.Event(), []

  def run():
    while not stop.is_set():
      try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader has it open
      except OSError as e:
        assert e.errno == errno.ENXIO, e
        stop.wait(0.02)
        continue
      fed.append(path)
      try:
        os.write(fd, payload)
      except (BlockingIOError, BrokenPipeError):  # the reader gave up meanwhile
        pass
      finally:
        os.close(fd)

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  try:
    yield fed
  finally:
    stop.set()
    thread.join()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("hostile_paths"))
  make_files(root)
  return root


def _record(case, rid=None):
  image, _ = CASES[case]
  n = len(image) if isinstance(image, list) else 1
  return {"id": rid or f"bad-{case}", "image": image,
          "conversations": _turns("<image>" * n + "\nWhat is this?", "A picture.")}


def _good(i, image=True):
  if image:
    return {"id": f"good-{i}", "image": "ok.png", "conversations": _turns("<image>\nWhat is it?", f"Shape {i}.")}
  return {"id": f"good-text-{i}", "conversations": _turns(f"Say {i}.", "Hello.")}


def _jsonl_source(records, root, name):
  """The records as JSON Lines (one per line, from line 1) read back by LlavaJsonSource."""
  path = os.path.join(root, name)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return LlavaJsonSource(path, image_root=root)


def _corpus():
  """Good rows interleaved with one row per case. Returns (records, good ids)."""
  records, good = [], []
  for i, case in enumerate(CASES):
    g = _good(i, image=i % 3 != 2)
    records += [g, _record(case)]
    good.append(g["id"])
  return records, good


# ---------------------------------------------------------------------------------------------- load_image

@pytest.mark.parametrize("case", ["through_file", "long_name", "symlink_loop", "fifo", "directory",
                                  "sparse_huge_file"])
def test_load_image_refuses_hostile_paths_with_a_reason(files, case):
  image, reason = CASES[case]
  with fifo_feeder(os.path.join(files, "fifo.png"), _png_bytes()) as fed:
    with pytest.raises(SampleError) as e:
      image_lib.load_image(os.path.join(files, image), sample_id="s1")
  assert not fed, "reading blocked on a FIFO"
  assert e.value.reason == reason and e.value.sample_id == "s1"
  assert MESSAGES[case] in str(e.value)


def test_load_image_refuses_a_nul_byte_and_reads_a_good_file(files):
  with pytest.raises(SampleError, match="NUL") as e:
    image_lib.load_image(os.path.join(files, "ok.png\x00.png"))
  assert e.value.reason == "unreadable_image"
  got = image_lib.load_image(os.path.join(files, "ok.png"))
  want = Image.open(os.path.join(files, "ok.png")).convert("RGB")  # the reference: LLaVA's Image.open(...)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ---------------------------------------------------------------------------------------------- non-strict

def _counts(cases):
  out = {r: 0 for r in REASONS}
  for case in cases:
    out[CASES[case][1]] += 1
  return out


@pytest.mark.parametrize("worker_count", [0, 2])
def test_hostile_paths_are_counted_skips_and_good_rows_are_intact(files, tiny_tokenizer, caplog, worker_count):
  records, good = _corpus()
  by_id = {r["id"]: r for r in records}
  source = _jsonl_source(records, files, f"hostile{worker_count}.jsonl")
  kw = _kw(tiny_tokenizer, num_epochs=1, shuffle=False, max_images_per_sample=2, worker_count=worker_count)
  with fifo_feeder(os.path.join(files, "fifo.png"), _png_bytes()) as fed, \
       caplog.at_level("WARNING", logger="llava_jax.data.pipeline"):
    it = pipeline.make_pipeline(source, **kw)
    try:
      batches = drain(it)
    finally:
      it.close()
  assert not fed, "reading blocked on a FIFO"
  assert it.skip_counts() == _counts(CASES)
  assert sorted(flat(batches)) == sorted(good)
  for batch, ids in batches:
    check_batch(batch, ids, by_id, tiny_tokenizer, files, rows=4, image_slots=8)
  for line, r in enumerate(records, start=1):  # each skip is logged with its id, its line and its reason
    if r["id"].startswith("bad-"):
      case = r["id"][len("bad-"):]
      assert f"skipping sample {r['id']!r} (hostile{worker_count}.jsonl line {line}) [{CASES[case][1]}]" \
          in caplog.text, case


# ---------------------------------------------------------------------------------------------- strict

@pytest.mark.parametrize("case", list(CASES))
def test_strict_mode_names_the_row_and_the_reason(files, tiny_tokenizer, case):
  source = _jsonl_source([_good(0), _record(case, rid=f"row-{case}")], files, f"strict-{case}.jsonl")
  kw = _kw(tiny_tokenizer, num_epochs=1, shuffle=False, strict=True, max_images_per_sample=2)
  with fifo_feeder(os.path.join(files, "fifo.png"), _png_bytes()) as fed:
    it = pipeline.make_pipeline(source, **kw)
    with pytest.raises(SampleError) as e:
      drain(it)
  assert not fed, "reading blocked on a FIFO"
  reason = CASES[case][1]
  assert (e.value.reason, e.value.sample_id, e.value.origin) == (reason, f"row-{case}", f"strict-{case}.jsonl line 2")
  text = str(e.value)
  assert text.startswith(f"[{reason}] sample 'row-{case}' (strict-{case}.jsonl line 2):")
  assert MESSAGES[case] in text


def test_jsonl_lines_are_split_at_newlines_only(files, tiny_tokenizer):
  """U+2028 / U+0085 inside a JSON string (legal unescaped) do not split a JSON Lines record."""
  odd = {"id": "odd", "conversations": _turns("Line\u2028separator\u0085next.", "Fine.")}
  path = os.path.join(files, "odd.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(odd, ensure_ascii=False) + "\n" + json.dumps(_good(1, image=False)) + "\n")
  source = LlavaJsonSource(path, image_root=files)
  assert len(source) == 2 and not source.malformed
  assert source[0]["conversations"] == odd["conversations"]
  assert source.origins(1) == "odd.jsonl line 2"


def test_a_jsonl_line_that_is_not_utf8_is_one_malformed_record(files, tiny_tokenizer, caplog):
  """A BOM is dropped; a line with invalid UTF-8 is a malformed record at its line (it failed the whole load)."""
  path = os.path.join(files, "latin1.jsonl")
  good, bad = _good(0), {"id": "bad-latin1", "conversations": _turns("Caf\u00e9?", "Oui.")}
  with open(path, "wb") as f:
    f.write(b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\r\n")
    f.write(json.dumps(bad, ensure_ascii=False).encode("latin-1") + b"\n")
  with caplog.at_level("WARNING"):
    source = LlavaJsonSource(path, image_root=files)
  assert len(source) == 2 and source[0]["id"] == "good-0"
  assert [i for i, _, _ in source.malformed] == [1]
  assert source.malformed[0][2].startswith("line 2 is not UTF-8 at byte 70")  # the byte of the latin-1 "é"
  assert "latin1.jsonl line 2" in caplog.text
  it = pipeline.make_pipeline(source, **_kw(tiny_tokenizer, num_epochs=1))
  assert flat(drain(it)) == ["good-0"]
  assert it.skip_counts()["malformed_conversation"] == 1


# ---------------------------------------------------------------------------------------------- inspect

def test_inspect_reports_every_hostile_row_with_its_line(files, tiny_tokenizer, tmp_path):
  from llava_jax.data.inspect import inspect_samples
  records, good = _corpus()
  source = _jsonl_source(records, files, "inspect-hostile.jsonl")
  out = tmp_path / "rows.jsonl"
  with fifo_feeder(os.path.join(files, "fifo.png"), _png_bytes()) as fed:
    counts = inspect_samples(source, tiny_tokenizer, "vicuna_v1", num_image_tokens=4, image_token_index=-200,
                             max_length=128, max_images_per_sample=2, out_path=str(out), limit=None, print_fn=None)
  assert not fed, "reading blocked on a FIFO"
  assert counts == {"samples": len(good), **_counts(CASES)}
  rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
  assert [r["id"] for r in rows] == [r["id"] for r in records]
  for line, row in enumerate(rows, start=1):
    if row["id"].startswith("bad-"):
      case = row["id"][len("bad-"):]
      assert (row["skip"], row["origin"]) == (CASES[case][1], f"inspect-hostile.jsonl line {line}"), case
      assert MESSAGES[case] in row["error"], case
    else:
      assert "skip" not in row and row["input_ids"], row["id"]


def _tiny_config(tokenizer_dir, json_path, image_root):
  config = fixtures.load_config("tiny")
  config.data.source = "llava_json"
  config.data.json_path = json_path
  config.data.image_root = image_root
  config.data.tokenizer = tokenizer_dir
  return config


def test_inspect_and_training_use_the_same_rows(files, tiny_tokenizer_dir, tmp_path):
  """A 2-image row a few tokens under max_length: inspect shows it as used iff training uses it (the config's
  default of one image per sample skips it as too_long in both; with max_images_per_sample=2 both use it),
  and they agree on every other row."""
  for max_images in (None, 2):
    _check_inspect_agrees(files, tiny_tokenizer_dir, tmp_path / f"max{max_images}", max_images)


def _check_inspect_agrees(files, tiny_tokenizer_dir, tmp_path, max_images):
  tmp_path.mkdir()
  from llava_jax import recipes
  from llava_jax.data import from_config
  from llava_jax.data.tokenize import encode_conversation
  records = [_good(0), _good(1, image=False), _record("directory"),
             {"id": "two-images", "image": ["ok.png", "plain.png"],
              "conversations": _turns("<image>\nFirst?", "One.") + _turns("<image>\nSecond?", "Two.")}]
  json_path = os.path.join(str(tmp_path), "agree.jsonl")
  config = _tiny_config(tiny_tokenizer_dir, json_path, files)
  if max_images is not None:
    config.data.max_images_per_sample = max_images
  model_config = recipes.llava_config(config.model)
  tokenizer = from_config.build_tokenizer(config, model_config, None)
  kw = from_config.pipeline_kwargs(config, model_config, tokenizer)
  two = encode_conversation(records[-1]["conversations"], kw["template"], tokenizer,
                            num_image_tokens=kw["num_image_tokens"], image_token_index=kw["image_token_index"],
                            max_length=10 ** 6)
  assert two.num_images == 2
  config.data.max_length = len(two) + 3  # the 2-image row ends 3 tokens under the limit
  config.data.bucket_lengths = (config.data.max_length,)
  kw = from_config.pipeline_kwargs(config, model_config, tokenizer)
  _jsonl_source(records, str(tmp_path), "agree.jsonl")
  out = tmp_path / "inspect.jsonl"
  counts = from_config.inspect_from_config(config, out_path=str(out), limit=None)
  shown = {row["id"]: row.get("skip") for row in map(json.loads, out.read_text(encoding="utf-8").splitlines())}

  source = from_config.build_source(config.data, model_config)
  it = pipeline.make_pipeline(source, **kw, global_batch_size=2, num_epochs=1, shuffle=False, seed=0,
                              process_index=0, process_count=1)
  used = set(flat(drain(it)))
  skipped = it.skip_counts()
  assert {sid for sid, skip in shown.items() if skip is None} == used
  assert {r: counts[r] for r in REASONS} == skipped
  assert (shown["two-images"] is None) == (max_images == 2)
  assert shown["two-images"] in (None, "too_long") and shown["bad-directory"] == "unreadable_image"


def test_an_eps_image_is_refused_before_any_external_program(tmp_path, monkeypatch):
  """PIL identifies EPS from its header and would run Ghostscript on load: such a file is not an image to us."""
  from PIL import EpsImagePlugin
  calls = []
  monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or Image.new("RGB", (1, 1)))
  monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
  eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"
  path = tmp_path / "x.png"
  path.write_bytes(eps)
  assert Image.open(io.BytesIO(eps)).format == "EPS"  # what PIL alone does with it
  for source in (str(path), eps):
    with pytest.raises(SampleError) as info:
      image_lib.load_image(source, sample_id="eps")
    assert info.value.reason == "unreadable_image"
  assert calls == []
  assert "PNG" in image_lib.decodable_formats() and "EPS" not in image_lib.decodable_formats()
