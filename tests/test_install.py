"""The notebooks' install cell (`pip install "llava_jax @ git+<setup.py url>"`) gives a working package: pip builds
this repository from a git URL (a `file://` clone stands in for GitHub, which this machine cannot reach) into a
directory outside any checkout, and that copy, with nothing of the checkout on its path, ships its configs and the
static page, and runs `python -m llava_jax.main` on a packaged config."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.test_notebooks import setup_url

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args, cwd=REPO):
  return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """`pip install --no-deps --target=<dir> "llava_jax @ git+file://localhost<repo>@<HEAD>"` (dependencies are the test
  environment's own); returns the target directory."""
  if shutil.which("git") is None or not os.path.isdir(os.path.join(REPO, ".git")):
    pytest.skip("needs a git checkout (pip builds from the repository's HEAD)")
  head = _git("rev-parse", "HEAD")
  target = tmp_path_factory.mktemp("site")
  # 'localhost': pip before 23.3 (a fresh Python 3.11 venv has 23.2) refuses a `name @ url` whose URL has no host
  requirement = f"llava_jax @ git+file://localhost{REPO}@{head}"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                  f"--target={target}", requirement], check=True, cwd=str(target))
  return str(target)


def _run_installed(target, code, cwd):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = target  # ahead of the test environment's editable llava_jax
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=600)


def test_the_install_cell_requirement_names_this_repository():
  assert setup_url().startswith("https://github.com/")


def test_a_git_install_ships_configs_and_static_files(installed, tmp_path):
  code = ("import os, llava_jax, importlib.resources as r\n"
          "from llava_jax import config_files\n"
          "print(os.path.dirname(llava_jax.__file__))\n"
          "print(config_files.resolve('configs/tiny.py'))\n"
          "print(sorted(f.name for f in r.files('llava_jax.infer').joinpath('static').iterdir()))\n"
          "c = config_files.load('configs/demo.py:lora')\n"
          "print(c.stage2.model.runtime.lora.rank)\n")
  out = _run_installed(installed, code, str(tmp_path))
  assert out.returncode == 0, out.stderr[-3000:]
  package, tiny, static, rank = out.stdout.strip().splitlines()[-4:]
  assert package == os.path.join(installed, "llava_jax")  # the installed copy, not the checkout
  assert tiny == os.path.join(installed, "llava_jax", "configs", "tiny.py")
  assert any(name.endswith(".html") for name in eval(static))  # noqa: S307 — our own print of a list
  assert int(rank) > 0
  committed = set(_git("ls-files", "configs").splitlines())
  shipped = {f"configs/{n}" for n in os.listdir(os.path.join(installed, "llava_jax", "configs")) if n.endswith(".py")}
  assert shipped == {p for p in committed if p.endswith(".py")}


def test_the_installed_package_runs_the_main_job_outside_a_checkout(installed, tmp_path):
  """`python -m llava_jax.main --config=configs/tiny.py` from a directory with no configs/: the tiny
  recipe trains (4 steps), saves its params and evaluates."""
  workdir = tmp_path / "run"
  code = ("import sys, runpy\n"
          f"sys.argv = ['llava_jax.main', '--config=configs/tiny.py', '--workdir={workdir}']\n"
          "runpy.run_module('llava_jax.main', run_name='__main__')\n")
  out = _run_installed(installed, code, str(tmp_path))
  assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
  assert (workdir / "params").is_dir() and (workdir / "eval_report.json").is_file(), sorted(os.listdir(workdir))
