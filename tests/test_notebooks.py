"""notebooks/ run top to bottom on CPU with tiny models (parameters through LLAVA_NB_* environment variables), in a
directory outside the checkout as on Colab: fine-tuning (the demo recipe on the tiny config, then a real recipe on
user data from a llava-hf checkpoint) and inference (a llava-hf checkpoint, whose greedy answer must equal
transformers' `generate` on the same checkpoint, and the fine-tuning notebook's demo run). The committed notebooks
carry the outputs of a real run: checked for shape here (badge and install URL from setup.py, bounded text, a plot)."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests import fixtures  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
NAMES = ("finetune.ipynb", "inference.ipynb")
VOCAB = 512  # the tiny tokenizer's pieces; the image placeholder is the next id
IMAGE_TOKEN = VOCAB
MAX_OUTPUT_LINES = 40


def setup_url() -> str:
  """setup.py's `url=` keyword (parsed, not imported: setup() would run)."""
  tree = ast.parse(open(os.path.join(REPO, "setup.py"), encoding="utf-8").read())
  call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
  return next(k.value.value for k in call.keywords if k.arg == "url")


def install_cell(nb):
  return next(c for c in nb.cells if c.cell_type == "code" and "REPO_URL" in c.source)


def run_notebook(name, params, tmp_path, extra_cell=None, timeout=600):
  """Execute a copy of notebooks/<name> in `tmp_path` (outside the checkout: the kernel's working directory) with
  LLAVA_NB_<key>=value overrides; returns (notebook, its stream text)."""
  assert not os.path.abspath(tmp_path).startswith(REPO + os.sep)
  path = os.path.join(tmp_path, name)
  shutil.copy(os.path.join(NOTEBOOKS, name), path)
  nb = nbformat.read(path, as_version=4)
  if extra_cell is not None:
    nb.cells.append(nbformat.v4.new_code_cell(extra_cell))
  saved = {}
  env = {f"LLAVA_NB_{k}": str(v) for k, v in params.items()}
  env["MPLBACKEND"] = "Agg"
  # the package under test is importable in the kernel (as after `pip install`), so the install cell installs nothing
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
  for k, v in env.items():
    saved[k] = os.environ.get(k)
    os.environ[k] = v  # the kernel inherits the environment (8 simulated CPU devices from conftest too)
  try:
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  text = "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
                   if o.get("output_type") == "stream")
  assert "pip install" not in text  # llava_jax was importable: nothing installed
  return nb, text


def output_texts(cell):
  for o in cell.outputs:
    if o.output_type == "stream":
      yield o.text
    elif "data" in o and "text/plain" in o.data:
      yield o.data["text/plain"]
    elif o.output_type == "error":
      yield "\n".join(o.traceback)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook(name):
  """Valid, one parameters cell, Colab badge and install URL from setup.py, outputs of one top-to-bottom run,
  bounded and without local absolute paths."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
  url = setup_url()
  owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)/?", url).group(1)
  badge = f"(https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{name})"
  assert nb.cells[0].cell_type == "markdown" and "colab-badge.svg" in nb.cells[0].source
  assert badge in nb.cells[0].source
  install = install_cell(nb)
  assert code.index(install) == 0 and f'REPO_URL = "{url}"' in install.source
  assert 'f"llava_jax @ git+{REPO_URL}"' in install.source
  assert "os.chdir" not in "".join(c.source for c in code) and "sys.path" not in "".join(c.source for c in code)
  # the committed outputs: one run in order, no errors, compact text, nothing of the machine it ran on
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  texts = [t for c in code for t in output_texts(c)]
  assert texts
  for t in texts:
    assert len(t.splitlines()) <= MAX_OUTPUT_LINES and "\r" not in t, t[:500]
    assert not re.search(r"(?<![\w.])/(work|tmp|home|Users)/", t), t[:500]
  everything = "\n".join(texts)
  if name == "finetune.ipynb":
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert "held-out accuracy" in everything and "[[" in everything
    assert sum("train: 100%" in t for t in texts) == 2  # one finished bar per stage
  else:
    assert "ASSISTANT:" in everything and "(the picture's answer:" in everything


@pytest.mark.parametrize("runtime,vendors,extra", [("tpu", ["0x8086", "0x1ae0"], "jax[tpu]"),
                                                    ("gpu", ["0x8086", "0x10de"], "jax[cuda12]"),
                                                    ("cpu", ["0x8086"], None)])
def test_install_cell_on_colab(runtime, vendors, extra, tmp_path, monkeypatch):
  """Without llava_jax (Colab), the install cell pip-installs it from setup.py's URL and then jax's extra for the
  accelerator it finds on the PCI bus (a fake /sys/bus/pci/devices here); pip itself is recorded, not run."""
  for i, vendor in enumerate(vendors):
    (tmp_path / f"0000:00:0{i}.0").mkdir()
    (tmp_path / f"0000:00:0{i}.0" / "vendor").write_text(vendor + "\n")
  monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
  if os.path.exists("/dev/nvidia0") and runtime != "gpu":
    pytest.skip("this machine has an NVIDIA device node")
  import importlib.util
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llava_jax" else find_spec(n, *a))
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)))
  for name in NAMES:
    source = install_cell(nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)).source
    assert source.count('"/sys/bus/pci/devices"') == 1
    calls.clear()
    exec(compile(source.replace('"/sys/bus/pci/devices"', repr(str(tmp_path))), name, "exec"), {})
    pip = [sys.executable, "-m", "pip", "install", "-q", "-U"]
    assert calls == [(pip + [f"llava_jax @ git+{setup_url()}"], {"check": True})] + (
        [(pip + [extra], {"check": True})] if extra else [])


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, tiny_tokenizer_dir):
  """A tiny llava-hf checkpoint directory (transformers save_pretrained, float32) with the tiny tokenizer."""
  out = str(tmp_path_factory.mktemp("llava_hf"))
  model = fixtures.tiny_hf_llava(seed=3, text=dict(vocab_size=VOCAB + 1), image_token_index=IMAGE_TOKEN)
  model.save_pretrained(out)
  shutil.copy(os.path.join(tiny_tokenizer_dir, "tokenizer.model"), out)
  return out, model


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, hf_checkpoint):
  """Run the fine-tuning notebook once: the demo part on configs/tiny.py, the real-recipe part on user data."""
  tmp = tmp_path_factory.mktemp("finetune")
  images = tmp / "images"
  images.mkdir()
  from PIL import Image
  Image.fromarray(fixtures.photo("coffee")).save(images / "coffee.png")
  Image.fromarray(fixtures.photo("chelsea")).save(images / "cat.png")
  rows = []
  for i in range(8):
    rows.append({"id": f"img{i}", "image": "coffee.png" if i % 2 else "cat.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A cup of coffee." if i % 2 else "A cat."}]})
    rows.append({"id": f"txt{i}", "conversations": [{"from": "human", "value": f"Count to {i}."},
                                                    {"from": "gpt", "value": " ".join(map(str, range(i + 1)))}]})
  data = tmp / "data.json"
  data.write_text(json.dumps(rows))
  ckpt, _ = hf_checkpoint
  params = dict(CONFIG="configs/tiny.py", WORKDIR=tmp / "demo", STAGE1_STEPS=4, RECIPE="configs/v15_stage2.py:7b",
                BASE_CHECKPOINT=ckpt, USER_DATA=data, USER_IMAGE_ROOT=images, RUN_DIR=tmp / "mine",
                EXTRA_FLAGS="--config.train.num_steps=2 --config.train.global_batch_size=8 "
                            "--config.data.max_length=96 --config.data.bucket_lengths=(96,) "
                            "--config.data.worker_count=0 --config.train.log_every=1 "
                            "--config.model.runtime.dtype=float32 "
                            # the data pipeline reads image size and placeholder id from the recipe's model
                            # section, not from the loaded checkpoint: describe the tiny checkpoint there
                            f"--config.model.vision.image_size=28 --config.model.vision.patch_size=7 "
                            f"--config.model.image_token_index={IMAGE_TOKEN}")
  nb, text = run_notebook("finetune.ipynb", params, tmp)
  return tmp, text


def test_finetune_notebook(finetuned):
  tmp, text = finetuned
  # part 1: the recipe ran its steps, saved params and evaluated on held-out questions
  rows = [json.loads(line) for line in open(tmp / "demo" / "metrics.jsonl")]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
  assert os.path.isdir(tmp / "demo" / "params")
  assert "held-out accuracy" in text and "[[" in text  # the evaluation line and the marked supervised spans
  # part 2: the v1.5 stage-2 recipe trained the llava-hf checkpoint on the user's JSON for 2 steps
  mine = [json.loads(line) for line in open(tmp / "mine" / "metrics.jsonl")]
  assert [r["step"] for r in mine if r["split"] == "train"] == [1, 2]
  assert all(np.isfinite(r["loss"]) and r["tokens"] > 0 for r in mine)
  assert os.path.isdir(tmp / "mine" / "params")
  assert "set PLAN = True" in text


def test_inference_notebook_equals_transformers_generate(hf_checkpoint, tmp_path):
  ckpt, model = hf_checkpoint
  from PIL import Image
  image_path = tmp_path / "astronaut.png"
  Image.fromarray(fixtures.photo("astronaut")).save(image_path)
  params = dict(CHECKPOINT=ckpt, IMAGE=image_path, QUESTION="What is in the image?", DTYPE="float32",
                ASPECT="square", MAX_NEW_TOKENS=6)
  extra = ("import json\nprint('RESULT', json.dumps({'prompts': [prompt, follow_prompt], "
           "'tokens': [result.token_ids[0], follow.token_ids[0]]}))")
  nb, text = run_notebook("inference.ipynb", params, tmp_path, extra_cell=extra)
  line = next(l for l in text.splitlines() if l.startswith("RESULT "))
  got = json.loads(line[len("RESULT "):])
  assert "USER: What is in the image?" in text and "ASSISTANT:" in text

  # the reference: LLaVA's tokenizer_image_token (BOS once, <image> → the placeholder run) and transformers'
  # CLIP processor and greedy generate on the same checkpoint, for the question and the follow-up turn
  import torch
  from transformers import CLIPImageProcessorPil, LlamaTokenizer
  tok = LlamaTokenizer.from_pretrained(ckpt, add_bos_token=True)
  size = model.config.vision_config.image_size
  proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
  pixels = proc(images=Image.open(image_path).convert("RGB"), return_tensors="pt")["pixel_values"]
  k = size // model.config.vision_config.patch_size
  for prompt, tokens in zip(got["prompts"], got["tokens"]):
    assert prompt.count("<image>") == 1 and prompt.endswith("ASSISTANT:")
    ids = fixtures.tokenizer_image_token(tok, prompt, image_token=IMAGE_TOKEN, num_image_tokens=k * k)
    with torch.no_grad():
      out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           pixel_values=pixels, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=0)
    assert tokens == out[0, len(ids):].tolist()
  # the follow-up's prompt is the whole conversation so far
  assert got["prompts"][1].startswith(got["prompts"][0]) and "USER: Are you sure?" in got["prompts"][1]


def test_inference_notebook_on_the_demo_run(finetuned, tmp_path):
  tmp, _ = finetuned
  nb, text = run_notebook("inference.ipynb", dict(DEMO_CONFIG="configs/tiny.py", DEMO_WORKDIR=tmp / "demo",
                                                  MAX_NEW_TOKENS=4), tmp_path)
  assert "holds no finished run" not in text  # it loaded the fine-tuning notebook's params, no retraining
  assert "(the picture's answer:" in text and "ASSISTANT:" in text
