"""`--mode=chat` and its streaming text: answers equal transformers' generate on the prompt the original LLaVA
renders for the same conversation (vicuna_v1 `get_prompt`, `tokenizer_image_token`, CLIP processor pixels),
through a piped subprocess; a finished training workdir loads onto a mesh; streamed pieces never need taking
back even where decoding a prefix is not a prefix of the full decode (byte-fallback runs)."""
import io
import os
import subprocess
import sys

import pytest

from llava_jax.infer.streaming import AnswerStream
from tests.fixtures import chat as cf
from llava_jax import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_NEW = 12


def _config(path="configs/tiny.py"):
  return config_files.load(os.path.join(ROOT, path))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer_dir):
  return cf.write_checkpoint(str(tmp_path_factory.mktemp("ckpt")), tiny_tokenizer_dir)


# ------------------------------------------------------------------------------------------ AnswerStream

def _feed(stream, ids, chunk=1):
  pieces = []
  for i in range(0, len(ids), chunk):
    pieces.append(stream.add(ids[i:i + chunk]))
    if stream.finished:
      break
  if not stream.finished:
    pieces.append(stream.finish())
  return pieces


def test_stream_is_prefix_stable_over_byte_fallback_runs(tiny_tokenizer):
  tok = tiny_tokenizer
  assert tok.convert_ids_to_tokens(list(cf.BYTE_IDS))[::85] == ["<0x00>", "<0x55>", "<0xAA>", "<0xFF>"]
  b = lambda *pieces: tok.convert_tokens_to_ids(list(pieces))
  words = lambda text: tok.encode(text, add_special_tokens=False)
  # a space byte that a following continuation byte turns into U+FFFD, a 3-byte character split over three
  # tokens (€), a space piece before punctuation
  ids = (words("The answer") + b("<0x20>", "<0x92>", "<0x52>") + words(" is") + b("<0xE2>", "<0x82>", "<0xAC>")
         + words("ok") + b("▁") + words(" dog"))
  full = tok.decode(ids, skip_special_tokens=True)
  unstable = [k for k in range(1, len(ids)) if not full.startswith(tok.decode(ids[:k], skip_special_tokens=True))]
  assert unstable, "the sequence must exercise a decode that is not prefix-stable"
  for chunk in (1, 2, 5):
    stream = AnswerStream(tok, stop_ids=[2])
    shown = ""
    for i in range(0, len(ids), chunk):
      shown += stream.add(ids[i:i + chunk])
      assert full.lstrip().startswith(shown) and "\ufffd" not in shown[-1:]
    shown += stream.finish()
    assert shown == stream.text == full.lstrip()
    assert stream.finish_reason == "length" and stream.tokens == ids


def test_stream_stop_strings_stop_ids_and_limits(tiny_tokenizer):
  tok = tiny_tokenizer
  ids = tok.encode("The answer is A###Human: what next", add_special_tokens=False)
  decode = lambda x: tok.decode(x, skip_special_tokens=True)
  k = next(k for k in range(1, len(ids) + 1) if "###" in decode(ids[:k]))  # the token completing the stop
  for chunk in (1, 3, len(ids)):
    stream = AnswerStream(tok, stop_ids=[2], stop_strings=("###",))
    pieces = _feed(stream, ids, chunk)
    assert "".join(pieces) == stream.text == decode(ids[:k]).split("###")[0].lstrip()
    assert not any("#" in p for p in pieces)  # a possible stop prefix is held back, never shown
    assert stream.finish_reason == "stop" and stream.tokens == ids[:k]
  stream = AnswerStream(tok, stop_ids=[2])
  assert "".join(_feed(stream, ids[:4] + [2] + ids[4:], 2)) == decode(ids[:4]).lstrip()
  assert stream.tokens == ids[:4] + [2] and stream.finish_reason == "stop"
  stream = AnswerStream(tok, stop_ids=[2], max_tokens=5)
  assert "".join(_feed(stream, ids, 3)) == decode(ids[:5]).lstrip()
  assert stream.tokens == ids[:5] and stream.finish_reason == "length"


# ------------------------------------------------------------------------------------------ the CLI

def _run_chat(args, stdin_text, timeout=240, home=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **({"HOME": str(home)} if home else {}))
  env.pop("XLA_FLAGS", None)  # one device, as a user's CPU run
  return subprocess.run([sys.executable, "-m", "llava_jax.main", "--mode=chat", *args], cwd=ROOT, env=env,
                        input=stdin_text, capture_output=True, text=True, timeout=timeout)


def test_piped_chat_multi_turn_matches_reference(checkpoint, tiny_tokenizer, tmp_path):
  red = cf.write_image(str(tmp_path / "red.png"), "red")
  astro = cf.write_image(str(tmp_path / "astronaut.png"), "astronaut")
  os.symlink(checkpoint, tmp_path / "ckpt")
  lines = ["What is in the image?", "Describe it in detail.", "/image ~/astronaut.png", "What is in the image?",
           "/image /nonexistent/x.png", "And the colors?", "/reset", "Is there an <image> here?",
           "What is in the image?"]
  proc = _run_chat(["--config=configs/tiny.py", "--checkpoint=~/ckpt", "--image=~/red.png",  # ~ is $HOME
                    "--temperature=0", f"--max_new_tokens={MAX_NEW}"], "\n".join(lines) + "\n", home=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]

  def answer(rounds, image):
    return cf.hf_answer(tiny_tokenizer, cf.reference_prompt(rounds), image, MAX_NEW).lstrip()

  q = "<image>\nWhat is in the image?"
  a1 = answer([(q, None)], red)
  a2 = answer([(q, a1.strip()), ("Describe it in detail.", None)], red)
  a3 = answer([(q, None)], astro)  # /image: a new conversation about the new image
  a4 = answer([(q, a3.strip()), ("And the colors?", None)], astro)  # the bad /image kept the conversation
  expected = [a1, a2, a3, a4, "", a3]  # '<image>' in a message: an empty answer line; /reset: same image
  assert proc.stdout == "".join(a + "\n" for a in expected)
  assert a1 != a3, "the answers must depend on the image for this test to check it"
  assert "image file not found" in proc.stderr and "cannot contain <image>" in proc.stderr
  assert "USER:" not in proc.stdout and "\x1b" not in proc.stdout  # no prompts or escapes in a pipe


def test_chat_from_finished_workdir_on_mesh(tmp_path, tiny_tokenizer):
  """A run's <workdir>/params (orbax) + <workdir>/tokenizer, loaded onto the config's 8-device mesh, chatted
  with through the interactive loop (role prompts); the answer equals transformers' on the same weights."""
  import ml_collections
  from llava_jax.checkpoints.orbax_params import save_params
  from llava_jax.infer.chat import run_chat
  from llava_jax.infer.loading import load_for_inference
  from tests import fixtures
  hf = cf.hf_model()
  model_config = fixtures.llava_config_from_hf_model(hf)
  config = _config()  # data.tokenizer='synthetic': the run's tokenizer lives in <workdir>/tokenizer
  config.model = ml_collections.ConfigDict(model_config.to_dict())
  workdir = tmp_path / "run"
  save_params(str(workdir / "params"), fixtures.llava_params_from_hf_model(hf, model_config))
  tiny_tokenizer.save_pretrained(str(workdir / "tokenizer"))
  image = cf.write_image(str(tmp_path / "coffee.png"), "coffee")

  model = load_for_inference(config, workdir=str(workdir))
  assert model.mesh is not None and model.mesh.size == 8 and model.template.name == "vicuna_v1"
  assert len(model.params["language_model"]["embed_tokens"]["embedding"].sharding.device_set) == 8
  out, err = io.StringIO(), io.StringIO()
  code = run_chat(model, image=image, temperature=0.0, max_new_tokens=8, stdin=io.StringIO("Which shape?\n/quit\n"),
                  stdout=out, stderr=err, interactive=True)
  assert code == 0
  expected = cf.hf_answer(tiny_tokenizer, cf.reference_prompt([("<image>\nWhich shape?", None)]), image, 8).lstrip()
  assert out.getvalue() == f"USER: ASSISTANT: {expected}\nUSER: "
  assert "vicuna_v1" in err.getvalue()


def test_checkpoint_resolution(tmp_path):
  """What --checkpoint / --workdir may name, for a one-stage and a two-stage config (no weights read)."""
  from llava_jax.infer.loading import resolve_checkpoint

  def orbax_dir(path):
    path.mkdir(parents=True)
    (path / "_CHECKPOINT_METADATA").write_text("{}")
    return str(path)

  one = _config()
  two = _config("configs/demo.py")
  run1, run2 = tmp_path / "run1", tmp_path / "run2"
  p1 = orbax_dir(run1 / "params")
  p2 = orbax_dir(run2 / "stage2" / "params")
  (run2 / "tokenizer").mkdir()
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text("{}")
  assert resolve_checkpoint(one, str(run1), None) == ("params", p1, str(run1))
  assert resolve_checkpoint(two, str(run2), None) == ("params", p2, str(run2))
  assert resolve_checkpoint(one, None, str(run1)) == ("params", p1, str(run1))  # a workdir as --checkpoint
  assert resolve_checkpoint(two, None, str(run2)) == ("params", p2, str(run2))
  assert resolve_checkpoint(two, None, p2) == ("params", p2, str(run2))  # finds the run's tokenizer/
  assert resolve_checkpoint(one, str(run1), str(hf)) == ("pretrained", str(hf), str(run1))
  with pytest.raises(FileNotFoundError, match="train first"):
    resolve_checkpoint(two, str(run1), None)  # a one-stage run has no stage2/params
  with pytest.raises(FileNotFoundError, match="neither"):
    resolve_checkpoint(one, None, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no such file"):
    resolve_checkpoint(one, None, str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="--checkpoint"):
    resolve_checkpoint(one, None, None)
  with pytest.raises(FileNotFoundError, match="--workdir=.*: no such directory"):
    resolve_checkpoint(one, str(tmp_path / "missing"), None)
