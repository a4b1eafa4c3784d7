"""A `gs://bucket/run` workdir (launch/README.md's advice for pods) end to end, with a stand-in for Cloud Storage:
every byte must go through etils.epath / orbax to the bucket — checkpoints, metrics.jsonl, TensorBoard events,
loss.png, the trained tokenizer, params and the eval report — nothing under a local relative `gs:/` folder
(what `os.path` makes of the URL), and a second run resumes from the bucket's checkpoint.

The stand-in: `gs://B/K` is the local directory <bucket_root>/B/K. epath's fsspec backend gets an fsspec
filesystem registered for the gs protocols (the role gcsfs plays), TensorFlow's gfile backend is bypassed, and
orbax's tensorstore GCS kvstore spec becomes a `file` one on the same directory; orbax's own GCS logic (URL
detection, commit-file atomicity, deletion of old steps) runs unchanged.
"""
import json
import os
import sys

import pytest
from etils.epath import backend as epath_backend, gpath
import fsspec  # noqa: F401  (loads fsspec.registry)
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

from llava_jax.train import loop
from llava_jax.train.metrics import read_metrics
from tests.train.test_loop import tiny_config

BUCKET_URL = "gs://bucket/run"


class BucketFileSystem(LocalFileSystem):
  """fsspec filesystem for gs:// over a local directory, speaking gcsfs's paths ("bucket/key", no protocol)."""

  protocol = ("gs", "gcs")
  root = None  # set by the fixture

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        return os.path.join(cls.root, path[len(prefix):]).rstrip("/")
    if path.startswith(cls.root):
      return path.rstrip("/")
    return os.path.join(cls.root, path.lstrip("/")).rstrip("/")

  def glob(self, path, **kwargs):  # gcsfs returns "bucket/key"; epath prepends "gs://"
    return [os.path.relpath(p, self.root) for p in super().glob(path, **kwargs)]


class _NoHierarchicalNamespace:
  hierarchical_namespace_enabled = False


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The local directory standing in for Cloud Storage, with every hook above installed; the test runs in an
  empty current directory (where a mishandled URL would land)."""
  root = tmp_path / "storage"
  root.mkdir()
  monkeypatch.setattr(BucketFileSystem, "root", str(root))
  for protocol in ("gs", "gcs"):
    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, protocol, BucketFileSystem)
  epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

  def file_kvstore(path):
    return {"driver": "file", "path": BucketFileSystem._strip_protocol(path)}

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", file_kvstore)
  monkeypatch.setattr(gcs_utils, "get_bucket", lambda name: _NoHierarchicalNamespace())
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield root, cwd
  epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()


def test_gs_workdir_holds_every_file_and_a_rerun_resumes_from_it(bucket, capsys):
  root, cwd = bucket
  run = root / "bucket" / "run"
  first = loop.train(tiny_config(num_steps=2, checkpoint_every=2), BUCKET_URL)
  assert first.steps == 2 and not first.preempted
  assert os.listdir(cwd) == []  # nothing under ./gs:/ (or anywhere local)
  assert (run / "checkpoints" / "2").is_dir()
  assert (run / loop.PARAMS_DIR).is_dir() and (run / "tokenizer" / "tokenizer.json").is_file()
  assert [r["step"] for r in read_metrics(BUCKET_URL)] == [1, 2]
  assert (run / "loss.png").read_bytes().startswith(b"\x89PNG")
  assert any(name.startswith("events.out.tfevents") and (run / "tb" / name).stat().st_size > 0
             for name in os.listdir(run / "tb"))

  # Longer schedule, same workdir, eval on: resumes at step 2 from the bucket (tokenizer read back from it).
  config = tiny_config(num_steps=4, checkpoint_every=2)
  config.eval.synthetic_samples = 8
  capsys.readouterr()
  second = loop.train_and_evaluate(config, BUCKET_URL)
  out = capsys.readouterr().out
  assert second.steps == 4
  assert f"resumed from {BUCKET_URL}/checkpoints at step 2" in out
  assert [r["step"] for r in read_metrics(BUCKET_URL)] == [1, 2, 3, 4]  # the earlier rows kept
  assert sorted(int(n) for n in os.listdir(run / "checkpoints") if n.isdigit()) == [2, 4]
  report = json.loads((run / loop.EVAL_REPORT).read_text())
  assert report["accuracy"]["n"] == 8
  assert os.listdir(cwd) == []
