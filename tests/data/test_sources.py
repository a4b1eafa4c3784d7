"""Data sources on small hand-made fixtures in the real file formats."""
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import image as image_lib
from llava_jax.data import sources
from llava_jax.data.errors import SampleError
from llava_jax.data.sources import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


# ------------------------------------------------------------------------------------------ LLaVA JSON

LLAVA_RECORDS = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
                       {"from": "gpt", "value": "The bus in the image is white and red."},
                       {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                       {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
    {"id": "text_only_1", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
    {"id": 4242, "image": "gqa/images/2354786.jpg",  # numeric id, mix665k-style folder prefix
     "conversations": [{"from": "human", "value": "<image>\nIs the sky blue?"}, {"from": "gpt", "value": "Yes"}]},
    {"id": "two_images", "image": ["ocr_vqa/images/a.jpg", "ocr_vqa/images/b.jpg"],
     "conversations": [{"from": "human", "value": "<image>\n<image>\nSame cover?"}, {"from": "gpt", "value": "No"}]},
    {"id": "no_conversations", "image": "coco/train2017/000000033471.jpg"},
    {"conversations": [{"from": "human", "value": "no id"}, {"from": "gpt", "value": "ok"}]},
    {"id": "bad_turn", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
]


@pytest.fixture()
def llava_dir(tmp_path):
  root = tmp_path / "images"
  rng = np.random.default_rng(0)
  for rel in ("coco/train2017/000000033471.jpg", "gqa/images/2354786.jpg", "ocr_vqa/images/a.jpg"):
    _write_png(str(root / rel), rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))  # PNG bytes, .jpg name
  (tmp_path / "data.json").write_text(json.dumps(LLAVA_RECORDS, indent=1))
  lines = [json.dumps(r) for r in LLAVA_RECORDS]
  lines.insert(3, "{not json")
  (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n\n")
  return tmp_path


def test_llava_json_records(llava_dir, caplog):
  with caplog.at_level("WARNING"):
    src = sources.LlavaJsonSource(llava_dir / "data.json", llava_dir / "images")
  assert len(src) == len(LLAVA_RECORDS)
  assert src.image_root == str(llava_dir / "images")
  assert src[0] == {**LLAVA_RECORDS[0]}
  assert src[-7] == src[0]
  assert src[1] == LLAVA_RECORDS[1] and "image" not in src[1]
  assert src[2]["id"] == "4242" and src[2]["image"] == "gqa/images/2354786.jpg"
  assert src[3]["image"] == ["ocr_vqa/images/a.jpg", "ocr_vqa/images/b.jpg"]
  # malformed ones are kept (the encoder rejects them), listed and logged, never dropped silently
  assert src[4]["id"] == "no_conversations" and src[4]["conversations"] is None
  assert src[5]["id"] == "data.json#5"
  assert [(i, rid) for i, rid, _ in src.malformed] == [(4, "no_conversations"), (6, "bad_turn")]
  assert "no 'conversations'" in src.malformed[0][2] and "'value'" in src.malformed[1][2]
  assert "2 of 7 records are malformed" in caplog.text and "bad_turn" in caplog.text
  with pytest.raises(IndexError):
    src[7]
  with pytest.raises(ValueError, match="no_conversations.*bad_turn"):
    sources.LlavaJsonSource(llava_dir / "data.json", llava_dir / "images", strict=True)


def test_llava_jsonl_and_bad_lines(llava_dir):
  src = sources.LlavaJsonSource(llava_dir / "data.jsonl", llava_dir / "images")
  assert len(src) == len(LLAVA_RECORDS) + 1
  assert src[0] == LLAVA_RECORDS[0]
  assert src[3] == {"id": "data.jsonl#3", "conversations": None}
  assert src.malformed[0][0] == 3 and "line 4 is not valid JSON" in src.malformed[0][2]
  assert src[4]["id"] == "two_images"


def test_llava_json_rejects_a_broken_file(tmp_path):
  (tmp_path / "x.json").write_text('[{"id": 1,')
  with pytest.raises(ValueError, match="not valid JSON"):
    sources.LlavaJsonSource(tmp_path / "x.json")
  (tmp_path / "y.json").write_text('{"id": 1}')
  with pytest.raises(ValueError, match="expected a JSON list"):
    sources.LlavaJsonSource(tmp_path / "y.json")


def test_llava_json_is_lazy_picklable_and_wraps_in_grain(llava_dir):
  # images are never touched at load: a record whose file does not exist is only an error when decoded
  src = sources.LlavaJsonSource(llava_dir / "data.json", llava_dir / "images")
  clone = pickle.loads(pickle.dumps(src))
  assert [clone[i] for i in range(len(clone))] == [src[i] for i in range(len(src))]
  import grain
  ds = grain.MapDataset.source(src)
  assert len(ds) == len(src) and ds[2] == src[2]
  first = image_lib.load_image(os.path.join(src.image_root, src[0]["image"]))
  assert first.size == (16, 12)
  with pytest.raises(SampleError) as e:
    image_lib.load_image(os.path.join(src.image_root, src[3]["image"][1]), sample_id=src[3]["id"])
  assert e.value.reason == "missing_file" and e.value.sample_id == "two_images"


# ------------------------------------------------------------------------------------------ ScienceQA

SQA_PROBLEMS = {
    "1": {"question": "Which of these is heavier?", "choices": ["feather", "rock", "leaf"], "answer": 1,
          "hint": "A rock and a feather.", "image": "image.png", "task": "closed choice", "grade": "grade3",
          "subject": "natural science", "topic": "physics", "category": "Weight", "skill": "x",
          "lecture": "Weight is a force.\nHeavier things weigh more.",
          "solution": "A rock weighs more than a feather.", "split": "train"},
    "2": {"question": "Which state is farthest north?", "choices": ["Utah", "Maine"], "answer": 1, "hint": "",
          "image": None, "task": "closed choice", "grade": "grade8", "subject": "social science",
          "topic": "geography", "category": "States", "skill": "y", "lecture": "", "solution": "",
          "split": "train"},
    "3": {"question": "Which word  is a noun?", "choices": ["run", "dog"], "answer": 1, "hint": "",
          "image": "image.png", "task": "closed choice", "grade": "grade10", "subject": "language science",
          "topic": "grammar", "category": "Nouns", "skill": "z", "lecture": "Nouns name things.",
          "solution": "Dog names an animal.", "split": "train"},
    "4": {"question": "Read the Question: which is it?", "choices": ["x", "y", "z", "w"], "answer": 3,
          "hint": "Look at the map.", "image": None, "task": "closed choice", "grade": "grade5",
          "subject": "social science", "topic": "maps", "category": "Maps", "skill": "w",
          "lecture": "Line one.\\nLine two.", "solution": "Because.", "split": "val"},
}
SQA_SPLITS = {"train": ["1", "2", "3"], "val": ["4"], "test": [], "trainval": ["1", "2", "3", "4"]}

# Expected strings, derived by hand from LLaVA's scripts/convert_sqa_to_llava*.py rules (see scienceqa.py).
SQA_HUMAN = {
    "1": "Which of these is heavier?\nContext: A rock and a feather.\nOptions: (A) feather (B) rock (C) leaf"
         "\n<image>",
    "2": "Which state is farthest north?\nContext: N/A\nOptions: (A) Utah (B) Maine",
    "3": "Which word is a noun?\nContext: N/A\nOptions: (A) run (B) dog\n<image>",  # "  " collapsed
    # input starts with "Question: ", so the reference removes *every* "Question: "
    "4": "Read the which is it?\nContext: Look at the map.\nOptions: (A) x (B) y (C) z (D) w",
}
SQA_GPT_LEA = {
    "1": "Weight is a force.\nHeavier things weigh more. A rock weighs more than a feather. The answer is B.",
    # empty lecture and solution: "Answer:   The..." -> one "  " collapsed -> "Answer:  The..." -> "Answer: "
    # removed, leaving the reference's leading space
    "2": " The answer is B.",
    "3": "Nouns name things. Dog names an animal. The answer is B.",
    "4": "Line one.\nLine two. Because. The answer is D.",  # a literal backslash-n becomes a newline
}


@pytest.fixture()
def sqa_root(tmp_path):
  (tmp_path / "problems.json").write_text(json.dumps(SQA_PROBLEMS))
  (tmp_path / "pid_splits.json").write_text(json.dumps(SQA_SPLITS))
  for pid in ("1", "3"):
    _write_png(str(tmp_path / "images" / "train" / pid / "image.png"), np.full((6, 9, 3), int(pid) * 50, np.uint8))
  return tmp_path


def test_scienceqa_qcm_lea(sqa_root):
  src = sources.ScienceQASource(sqa_root, "train")
  assert len(src) == 3 and src.image_root == str(sqa_root / "images")
  for i, pid in enumerate(SQA_SPLITS["train"]):
    rec = src[i]
    assert rec["id"] == pid
    assert rec["conversations"] == [{"from": "human", "value": SQA_HUMAN[pid]},
                                    {"from": "gpt", "value": SQA_GPT_LEA[pid]}]
  assert src[0]["image"] == os.path.join("train", "1", "image.png")
  assert "image" not in src[1]
  for rec in (src[0], src[2]):  # the image resolves to the release's images/<split>/<pid>/image.png
    pixels = np.asarray(image_lib.load_image(os.path.join(src.image_root, rec["image"])))
    assert pixels[0, 0, 0] == int(rec["id"]) * 50
  meta = src[0]["meta"]
  assert meta["answer"] == "B" and meta["answer_index"] == 1 and meta["choices"] == ["feather", "rock", "leaf"]
  assert (meta["subject_code"], meta["grade_band"], meta["has_text"], meta["has_image"], meta["no_context"]) == \
         ("NAT", "G1-6", True, True, False)
  assert meta["question_text"] == SQA_HUMAN["1"][: -len("\n<image>")]
  m2, m3 = src[1]["meta"], src[2]["meta"]
  assert (m2["subject_code"], m2["grade_band"], m2["has_text"], m2["has_image"], m2["no_context"]) == \
         ("SOC", "G7-12", False, False, True)
  assert (m3["subject_code"], m3["grade_band"], m3["has_text"], m3["has_image"], m3["context"]) == \
         ("LAN", "G7-12", False, True, "N/A")
  src[0]["meta"]["answer"] = "Z"  # records handed out are copies
  assert src[0]["meta"]["answer"] == "B"


def test_scienceqa_other_formats_and_splits(sqa_root):
  answer_only = sources.ScienceQASource(sqa_root, "train", prompt_format="QCM-A")
  assert [r["conversations"][1]["value"] for r in answer_only] == ["The answer is B."] * 3
  assert answer_only[0]["conversations"][0]["value"] == SQA_HUMAN["1"]
  answer_first = sources.ScienceQASource(sqa_root, "train", prompt_format="QCM-ALE")
  assert answer_first[0]["conversations"][1]["value"] == (
      "The answer is B. BECAUSE: Weight is a force.\nHeavier things weigh more. A rock weighs more than a feather.")
  lepa = sources.ScienceQASource(sqa_root, "train", prompt_format="QCM-LEPA")
  assert lepa[0]["conversations"][1]["value"] == (
      "LECTURE: Weight is a force.\nHeavier things weigh more.\nSOLUTION: A rock weighs more than a feather.\n"
      "###\nANSWER: B.")
  assert lepa[1]["conversations"][1]["value"] == "###\nANSWER: B."
  val = sources.ScienceQASource(sqa_root, "val")
  assert [r["id"] for r in val] == ["4"]
  assert val[0]["conversations"][0]["value"] == SQA_HUMAN["4"]
  assert val[0]["conversations"][1]["value"] == SQA_GPT_LEA["4"]
  merged = sources.ScienceQASource(sqa_root, "trainval")
  assert [r["id"] for r in merged] == ["1", "2", "3", "4"] and merged[2]["image"] == os.path.join("train", "3",
                                                                                                   "image.png")
  assert len(sources.ScienceQASource(sqa_root, "test")) == 0
  with pytest.raises(ValueError, match="available"):
    sources.ScienceQASource(sqa_root, "minitrain")
  with pytest.raises(ValueError, match="QCM-LEA"):
    sources.ScienceQASource(sqa_root, "train", prompt_format="QCM-XYZ")


# ------------------------------------------------------------------------------------------ synthetic


def _scene_from_pixels(image: Image.Image, grid: int):
  """Independent reading of a drawn scene: per grid cell, the palette colour present and the shape from how
  much of its bounding box the colour fills (square ~1, circle ~pi/4, triangle ~1/2)."""
  pixels = np.asarray(image).astype(int)
  size = pixels.shape[0]
  cell = size / grid
  found = {}
  for row in range(grid):
    for col in range(grid):
      block = pixels[int(np.ceil(row * cell)):int(np.floor((row + 1) * cell)),
                     int(np.ceil(col * cell)):int(np.floor((col + 1) * cell))]
      for name, rgb in synthetic.COLORS.items():
        mask = np.all(block == rgb, axis=-1)
        if mask.sum() == 0:
          continue
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        shape = "square" if fill > 0.93 else ("circle" if fill > 0.68 else "triangle")
        assert (row, col) not in found, "two colours in one cell"
        found[(row, col)] = (name, shape)
      other = ~np.all(block == synthetic.BACKGROUND, axis=-1)
      if (row, col) in found:
        assert np.all(np.all(block[other] == synthetic.COLORS[found[(row, col)][0]], axis=-1)), "stray colours"
      else:
        assert not other.any()
  return found


def _answer_from_scene(question: str, scene: dict, grid: int) -> str:
  """What the question's answer must be, read off the pixel scene (not from the generator's metadata)."""
  names = synthetic.position_names(grid)
  where = {names[r][c]: (r, c) for r in range(grid) for c in range(grid)}
  items = list(scene.items())
  if question.startswith("What color is the shape at the "):
    return scene[where[question[len("What color is the shape at the "):-1]]][0]
  if question.startswith("What shape is at the "):
    return scene[where[question[len("What shape is at the "):-1]]][1]
  if question == "How many shapes are there?":
    return str(len(scene))
  if question.startswith("How many ") and question.endswith(" shapes are there?"):
    color = question[len("How many "):-len(" shapes are there?")]
    return str(sum(c == color for _, (c, _) in items))
  if question.startswith("How many ") and question.endswith("s are there?"):
    shape = question[len("How many "):-len("s are there?")]
    return str(sum(s == shape for _, (_, s) in items))
  if question.startswith("Where is the "):
    color, shape = question[len("Where is the "):-1].split(" ")
    cells = [rc for rc, (c, s) in items if (c, s) == (color, shape)]
    assert len(cells) == 1, "position questions must be unambiguous"
    return names[cells[0][0]][cells[0][1]]
  if question.startswith("Is there a "):
    color, shape = question[len("Is there a "):-1].split(" ")
    return "yes" if any((c, s) == (color, shape) for _, (c, s) in items) else "no"
  raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("grid", [2, 3])
def test_synthetic_answers_match_the_pixels(grid):
  src = sources.SyntheticShapesSource(60, seed=7, image_size=96, multi_turn=True, max_turns=4, grid=grid)
  kinds_seen, answers_seen = set(), set()
  for i in range(len(src)):
    rec = src[i]
    scene = _scene_from_pixels(rec["images"][0], grid)
    conv = rec["conversations"]
    assert 2 <= len(conv) // 2 <= 4 and len(conv) % 2 == 0
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    assert conv[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in conv) == 1
    questions = [t["value"].replace("<image>\n", "") for t in conv[0::2]]
    answers = [t["value"] for t in conv[1::2]]
    assert len(set(questions)) == len(questions)
    assert rec["meta"]["answers"] == answers and rec["meta"]["questions"] == questions
    for q, a in zip(questions, answers):
      assert a == _answer_from_scene(q, scene, grid), (rec["id"], q)
    kinds_seen.update(rec["meta"]["kinds"])
    answers_seen.update(answers)
    # the caption lists the drawn shapes in row-major cell order
    expected = [f"a {c} {s}" for _, (c, s) in sorted(scene.items())]
    caption = rec["meta"]["caption"]
    assert caption == (expected[0] if len(expected) == 1 else ", ".join(expected[:-1]) + " and " + expected[-1])
  assert kinds_seen == set(synthetic.QUESTION_KINDS)
  assert {"yes", "no", "0"} <= answers_seen


def test_synthetic_is_deterministic_and_single_turn():
  a = sources.SyntheticShapesSource(20, seed=3, image_size=56)
  b = pickle.loads(pickle.dumps(sources.SyntheticShapesSource(20, seed=3, image_size=56)))
  for i in (0, 5, 19, -1):
    ra, rb = a[i], b[i]
    assert ra["conversations"] == rb["conversations"] and ra["meta"] == rb["meta"]
    np.testing.assert_array_equal(np.asarray(ra["images"][0]), np.asarray(rb["images"][0]))
    assert len(ra["conversations"]) == 2
    assert ra["images"][0].size == (56, 56) and ra["images"][0].mode == "RGB"
  assert a[-1]["id"] == "shapes-3-19"
  other = sources.SyntheticShapesSource(20, seed=4, image_size=56)
  diff = sum(not np.array_equal(np.asarray(a[i]["images"][0]), np.asarray(other[i]["images"][0])) for i in range(20))
  assert diff >= 15
  assert len({a[i]["meta"]["caption"] for i in range(20)}) >= 10


def test_synthetic_caption_style():
  src = sources.SyntheticShapesSource(10, seed=1, image_size=64, style="caption")
  for i in range(len(src)):
    rec = src[i]
    human, gpt = rec["conversations"]
    assert human["value"].startswith("<image>\n") and human["value"][len("<image>\n"):] in synthetic.CAPTION_PROMPTS
    assert gpt["value"] == rec["meta"]["caption"] == rec["meta"]["answers"][0]
    scene = _scene_from_pixels(rec["images"][0], 2)
    assert gpt["value"].count(" a ") + 1 == len(scene) == len(rec["meta"]["objects"])


def test_synthetic_argument_errors():
  with pytest.raises(ValueError, match="grid"):
    sources.SyntheticShapesSource(1, grid=4)
  with pytest.raises(ValueError, match="too small"):
    sources.SyntheticShapesSource(1, image_size=8)
  with pytest.raises(ValueError, match="kinds"):
    sources.SyntheticShapesSource(1, kinds=("weather",))
  with pytest.raises(ValueError, match="style"):
    sources.SyntheticShapesSource(1, style="poem")
  with pytest.raises(IndexError):
    sources.SyntheticShapesSource(3)[3]


def test_make_source():
  src = sources.make_source("synthetic_shapes", num_samples=2, seed=0, image_size=32)
  assert isinstance(src, sources.SyntheticShapesSource) and len(src) == 2
  with pytest.raises(ValueError, match="unknown source type"):
    sources.make_source("parquet")


# ------------------------------------------------------------------------------------------ TFDS

TINY_TFDS_NAME = "llava_jax_tiny_captions"


def tiny_tfds_examples():
  rng = np.random.default_rng(11)
  return [{"image": rng.integers(0, 256, (10 + i, 14 - i, 3), dtype=np.uint8), "caption": f"caption {i}: ü日本",
           "question": f"What is {i}?", "answer": f"number {i}", "id": 100 + i} for i in range(5)]


def prepare_tiny_tfds(data_dir: str):
  """Build and prepare (array_record) a tiny TFDS data set with an Image feature. Needs tensorflow."""
  import tensorflow_datasets as tfds

  class LlavaJaxTinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    # tensorflow-datasets 4.9.10 resolves the code path of a builder living in a package through the
    # `importlib_resources` backport, which it does not depend on; a one-part module name skips that lookup.
    __module__ = "llava_jax_tiny_tfds"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
          "caption": tfds.features.Text(), "question": tfds.features.Text(), "answer": tfds.features.Text(),
          "id": tfds.features.Scalar(np.int64)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, example in enumerate(tiny_tfds_examples()):
        yield i, example

  assert LlavaJaxTinyCaptions.name == TINY_TFDS_NAME
  LlavaJaxTinyCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  for module, package in (("tensorflow_datasets", "tensorflow-datasets"), ("array_record", "array_record"),
                          ("tensorflow", "tensorflow-cpu")):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"TFDS sources are an optional extra: install {package} to run this test "
                  "(pip install tensorflow-datasets array_record; tensorflow-cpu to prepare the test data set)")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  # prepared in a child process so that TensorFlow never loads into the test process
  done = subprocess.run([sys.executable, "-c", "import sys; from tests.data.test_sources import prepare_tiny_tfds; "
                         "prepare_tiny_tfds(sys.argv[1])", data_dir], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
  assert done.returncode == 0, f"preparing the tiny TFDS data set failed:\n{done.stderr[-3000:]}"
  return data_dir


def test_tfds_source_reads_prepared_array_record(tiny_tfds_dir, monkeypatch):
  expected = {e["caption"]: e for e in tiny_tfds_examples()}
  src = sources.TfdsSource(TINY_TFDS_NAME, "train", data_dir=tiny_tfds_dir,
                           adapter=sources.ImageCaptionAdapter(id_key="id"))
  assert len(src) == 5 and src.image_root is None
  seen = set()
  for i in range(len(src)):
    rec = src[i]
    human, gpt = rec["conversations"]
    assert human == {"from": "human", "value": "<image>\nDescribe the image briefly."}
    example = expected[gpt["value"]]  # TFDS shuffles at preparation: match by content
    assert rec["id"] == str(example["id"])
    assert isinstance(rec["images"][0], bytes)  # decoded later by the pipeline, with our guards
    np.testing.assert_array_equal(np.asarray(image_lib.load_image(rec["images"][0])), example["image"])
    seen.add(rec["id"])
  assert seen == {str(100 + i) for i in range(5)}
  # adapter looked up by data set name; ids default to name/split/index
  monkeypatch.setitem(sources.TFDS_ADAPTERS, TINY_TFDS_NAME, sources.ImageQAAdapter())
  qa = sources.TfdsSource(f"{TINY_TFDS_NAME}:1.0.0", "train[:3]", data_dir=tiny_tfds_dir)
  assert len(qa) == 3
  rec = qa[1]
  assert rec["id"] == f"{TINY_TFDS_NAME}:1.0.0/train[:3]/1"
  assert rec["conversations"][0]["value"].startswith("<image>\nWhat is ")
  assert rec["meta"]["answers"] == [rec["conversations"][1]["value"]]
  clone = pickle.loads(pickle.dumps(qa))
  assert clone._reader is None and clone[1]["conversations"] == rec["conversations"]
  with pytest.raises(ValueError, match="no TFDS adapter"):
    sources.TfdsSource(TINY_TFDS_NAME, "train", data_dir=tiny_tfds_dir, adapter="nope")
  with pytest.raises(FileNotFoundError, match="not prepared"):
    sources.TfdsSource(TINY_TFDS_NAME, "train", data_dir=os.path.join(tiny_tfds_dir, "empty"),
                       adapter=sources.ImageQAAdapter())


def test_tfds_source_needs_no_tensorflow(tiny_tfds_dir):
  """Read the prepared set in a process where TensorFlow is not importable (as if not installed)."""
  code = textwrap.dedent("""
      import importlib.machinery, sys
      class HideTensorflow:
        def find_spec(self, name, path=None, target=None):
          if name == "tensorflow" or name.startswith("tensorflow."):
            return None
          return importlib.machinery.PathFinder.find_spec(name, path, target)
        def invalidate_caches(self):
          importlib.machinery.PathFinder.invalidate_caches()
      sys.meta_path[:] = [HideTensorflow() if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
      try:
        import tensorflow
        raise SystemExit("tensorflow still importable")
      except ImportError:
        pass
      from llava_jax.data import image, sources
      src = sources.TfdsSource(sys.argv[2], "train", data_dir=sys.argv[1], adapter=sources.ImageCaptionAdapter())
      sizes = sorted(image.load_image(src[i]["images"][0]).size for i in range(len(src)))
      assert "tensorflow" not in sys.modules
      print(len(src), sizes)
  """)
  done = subprocess.run([sys.executable, "-c", code, tiny_tfds_dir, TINY_TFDS_NAME], cwd=REPO,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().splitlines()[-1] == "5 " + str(sorted((14 - i, 10 + i) for i in range(5)))


def test_coco_captions_adapter():
  import io
  buf = io.BytesIO()
  Image.new("RGB", (5, 4), (1, 2, 3)).save(buf, format="PNG")
  # the shape TFDS' numpy decoding gives coco_captions examples (image left undecoded)
  example = {"image": buf.getvalue(), "image/id": np.int64(42), "image/filename": b"COCO_val2014_000000000042.jpg",
             "captions": {"id": np.array([7, 8]), "text": np.array([b"A dog on a couch.", b"A brown dog."],
                                                                  dtype=object)}}
  rec = sources.TFDS_ADAPTERS["coco_captions"](example, 0)
  assert rec["id"] == "42"
  assert rec["conversations"] == [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                                  {"from": "gpt", "value": "A dog on a couch."}]
  assert rec["images"] == [buf.getvalue()]


@pytest.mark.parametrize("grid", [2, 3])
def test_synthetic_captions_with_positions_match_the_pixels(grid):
  """caption_positions=True: each drawn shape, in row-major cell order, followed by the name of its cell."""
  src = sources.SyntheticShapesSource(20, seed=2, image_size=96, style="caption", grid=grid, caption_positions=True)
  names = synthetic.position_names(grid)
  for i in range(len(src)):
    rec = src[i]
    scene = _scene_from_pixels(rec["images"][0], grid)
    parts = [f"a {c} {s} at the {names[r][col]}" for (r, col), (c, s) in sorted(scene.items())]
    expected = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    assert rec["conversations"][1]["value"] == rec["meta"]["caption"] == expected
