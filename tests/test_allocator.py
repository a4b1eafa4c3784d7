"""llava_jax/allocator.py: `python -m llava_jax.main` restarts itself with tcmalloc preloaded (when installed),
once, before jax starts; opting out, other programs and an already-preloaded tcmalloc are left alone."""
import os
import subprocess
import sys

import pytest

from llava_jax import allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main_log(env_extra: dict) -> str:
  """stderr of `python -m llava_jax.main --verbosity=0` planning for an unknown topology (a usage error, after
  logging its allocator)."""
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV, "LLAVA_JAX_TCMALLOC_TRIED")}
  env.update(env_extra, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "llava_jax.main", "--config=configs/tiny.py", "--mode=plan",
                         "--plan.topology=no-such-slice", "--verbosity=0"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "unknown topology" in proc.stderr, proc.stderr[-2000:]
  return proc.stderr


def test_main_runs_under_tcmalloc_when_installed():
  if allocator.find_tcmalloc() is None:
    pytest.skip("no tcmalloc installed (apt-get install libtcmalloc-minimal4)")
  assert "allocator: tcmalloc" in _main_log({})
  off = _main_log({allocator.ENV: "0"})
  assert "allocator: system malloc" in off and "allocator: tcmalloc" not in off


def test_main_keeps_a_preloaded_tcmalloc_and_the_system_malloc_without_one(tmp_path):
  lib = allocator.find_tcmalloc()
  if lib is not None:  # already preloaded by the caller: used as it is, no restart
    assert "allocator: tcmalloc" in _main_log({"LD_PRELOAD": lib, allocator.ENV: "0"})
  missing = str(tmp_path / "libtcmalloc_absent.so")  # an explicit path that does not exist: no restart
  assert "allocator: system malloc" in _main_log({allocator.ENV: missing})


def test_preload_env_prepends_once_and_quiets_large_alloc_reports():
  env = allocator.preload_env({"LD_PRELOAD": "/x/libother.so"}, library="/y/libtcmalloc_minimal.so.4")
  assert env["LD_PRELOAD"] == "/y/libtcmalloc_minimal.so.4:/x/libother.so"
  assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
  again = allocator.preload_env(env, library="/y/libtcmalloc_minimal.so.4")
  assert again["LD_PRELOAD"] == env["LD_PRELOAD"]


def test_other_programs_are_not_restarted():
  """Importing llava_jax from any other program (tests, notebooks, bench children) never re-executes it."""
  code = "import os, llava_jax; print(os.environ.get('LLAVA_JAX_TCMALLOC_TRIED'))"
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "LLAVA_JAX_TCMALLOC_TRIED"})
  assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr[-2000:]


def test_the_package_still_exports_its_public_api():
  """The restart hook sits above the package's imports; every name of `llava_jax.__all__` still resolves."""
  import llava_jax
  for name in llava_jax.__all__:
    assert getattr(llava_jax, name) is not None, name
