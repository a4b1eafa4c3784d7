"""The command line: `python -m llava_jax.main --mode=inspect` (flags override data path and template)."""
import json
import os
import subprocess
import sys

import pytest

from llava_jax.data.sources import SyntheticShapesSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=240, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "llava_jax.main", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.parametrize("template,stop", [("vicuna_v1", "</s>"), ("vicuna_v0", "\n###")])  # v0 trains on "{a}\n###"
def test_inspect_mode_writes_supervised_answers(tmp_path, template, stop):
  out = tmp_path / "samples.jsonl"
  proc = _run(["--config=configs/tiny.py", f"--workdir={tmp_path}", "--mode=inspect", f"--inspect_out={out}",
               "--inspect_limit=3", f"--config.data.template={template}", "--config.data.synthetic_samples=5"])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 3
  source = SyntheticShapesSource(5, seed=0, image_size=32)
  for row in rows:
    assert set(row) == {"id", "input_ids", "loss_mask", "text", "supervised_text"}
    assert len(row["input_ids"]) == len(row["loss_mask"])
    answers = source[int(row["id"].rsplit("-", 1)[1])]["meta"]["answers"]
    assert [t.strip() for t in row["supervised_text"]] == [f"{a}{stop}" for a in answers]
    assert "[[" in proc.stdout  # supervised spans are marked in the printout


def test_configs_are_found_outside_a_checkout(tmp_path):
  """`--config=configs/<name>.py` from a directory without configs/ loads the installed `llava_jax.configs`
  (the checkout's files, as setup.py ships them), with its `:arg` and overrides."""
  from llava_jax import config_files
  assert os.path.samefile(config_files.installed_configs_dir(), os.path.join(ROOT, "configs"))
  out = tmp_path / "samples.jsonl"
  _run(["--config", "configs/tiny.py:lora", f"--workdir={tmp_path}", "--mode=inspect", f"--inspect_out={out}",
        "--inspect_limit=2", "--config.data.synthetic_samples=4"], cwd=tmp_path)
  assert len(out.read_text().splitlines()) == 2
  cwd = os.getcwd()
  try:
    os.chdir(tmp_path)
    assert config_files.load("configs/tiny.py:lora").model.runtime.lora.rank > 0
    assert config_files.resolve("configs/nope.py:x") == "configs/nope.py:x"  # the loader reports it
  finally:
    os.chdir(cwd)


def test_missing_config_is_a_usage_error(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "llava_jax.main", f"--workdir={tmp_path}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "--config is required" in proc.stderr


# ------------------------------------------------------------------------------------------ user errors

def _fail(args, tmp_path):
  """Run the CLI expecting a user error: (the stderr lines, exit status)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(tmp_path))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "llava_jax.main", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  return proc.stderr.strip().splitlines(), proc.returncode


def _fake_run(path):
  """A workdir that looks like a finished run of configs/tiny.py (an orbax marker) but has no tokenizer."""
  (path / "params").mkdir(parents=True)
  (path / "params" / "_CHECKPOINT_METADATA").write_text("{}")
  return path


USER_ERRORS = {
    "config path": (["--config=configs/nope.py"], "error: --config=configs/nope.py: no such file"),
    "config field typo": (["--config=configs/tiny.py", "--config.data.tmplate=vicuna_v1", "--mode=inspect"],
                          "error: --config.data.tmplate: the config has no field 'tmplate'; did you mean "
                          "\"template\" instead of \"tmplate\"?"),
    "missing data file": (["--config=configs/tiny.py", "--config.data.source=llava_json", "--mode=inspect",
                           "--config.data.json_path=/nonexistent/data.json", "--workdir={tmp}/run"],
                          "error: --config.data.json_path=/nonexistent/data.json: no such file or directory"),
    "chat workdir without tokenizer": (["--config=configs/tiny.py", "--mode=chat", "--workdir={tmp}/fake"],
                                       "error: the config trains its tokenizer into the run directory, but "
                                       "{tmp}/fake/tokenizer holds none; pass --workdir=<the training run>"),
    "chat workdir missing": (["--config=configs/tiny.py", "--mode=chat", "--workdir=~/nothing"],
                             "error: --workdir={tmp}/nothing: no such directory (pass a finished training run, "
                             "or --checkpoint)"),
    "chat image missing": (["--config=configs/tiny.py", "--mode=chat", "--workdir=~/fake", "--image=~/no.png"],
                           "error: --image=~/no.png: no such file"),
}


@pytest.mark.parametrize("name", sorted(USER_ERRORS))
def test_user_error_is_one_line(tmp_path, name):
  """Each mistake: exactly one line on stderr, exit status 2, no traceback (all before jax compiles anything)."""
  _fake_run(tmp_path / "fake")
  args, want = USER_ERRORS[name]
  lines, code = _fail([a.replace("{tmp}", str(tmp_path)) for a in args], tmp_path)
  assert (lines, code) == ([want.replace("{tmp}", str(tmp_path))], 2)


def test_verbose_shows_the_traceback(tmp_path):
  lines, code = _fail(["--config=configs/tiny.py", "--mode=chat", f"--workdir={tmp_path}/nothing", "--verbose"],
                      tmp_path)
  assert code == 2 and lines[0] == "Traceback (most recent call last):"
  assert lines[-2].startswith("llava_jax.errors.MissingFileError: --workdir=")
  assert lines[-1].startswith("error: --workdir=") and len(lines) > 4
