"""The command line: `python -m llava_jax.main --mode=inspect` (flags override data path and template)."""
import json
import os
import subprocess
import sys

import pytest

from llava_jax.data.sources import SyntheticShapesSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=240):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "llava_jax.main", *args], cwd=ROOT, env=env, capture_output=True,
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


def test_missing_config_is_a_usage_error(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "llava_jax.main", f"--workdir={tmp_path}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "--config is required" in proc.stderr
