"""launch/ for real against fake cloud and cluster tools: `tpu_pod.sh setup` builds the archive a worker gets (and
nothing it does not need), `tpu_pod.sh supervise` reruns on exit 75 and on preemption and stops otherwise, and
`slurm_gpu.sbatch` requeues the job on exit 75. The fakes are put first on PATH; they log their arguments and answer
from a small JSON state (the slice's state, the workers' run statuses poll by poll)."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
MAIN = "--config=configs/v15_stage2.py:7b"

# Answers like `gcloud compute tpus {tpu-vm,queued-resources} ...` for what tpu_pod.sh asks.
FAKE_GCLOUD = r'''
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps(["gcloud"] + args) + "\n")
path = os.environ["FAKE_STATE"]
st = json.load(open(path))
words = [a for a in args if not a.startswith("--")]
if words[0] == "alpha":
  words = words[1:]
kind, verb = words[2], words[3]
opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
code = 0
if verb == "describe" and opts.get("format") == "value(networkEndpoints[].ipAddress)":
  print(";".join(st["ips"]))
elif verb == "describe":
  if st["slice"] is None:
    code = 1  # NOT_FOUND
  else:
    print(st["slice"])
elif verb == "create":
  st["slice"] = "ACTIVE" if kind == "queued-resources" else "READY"
elif verb == "delete":
  st["slice"] = None
elif verb == "scp":
  shutil.copy(words[4], os.path.join(os.environ["FAKE_DIR"], "llava_jax.tar.gz"))
elif verb == "ssh" and "tpu_worker.sh install" in opts["command"]:
  code = st.get("install_status", 0)
elif verb == "ssh" and "tpu_worker.sh status" in opts["command"]:
  poll = st["polls"].pop(0) if st["polls"] else ["999"] * len(st["ips"])  # out of script: an error ends the test
  if poll == "preempt":  # the slice goes away under the run; ssh fails
    st["slice"] = "SUSPENDED" if st["queued"] else "PREEMPTED"
    code = 255
  else:
    for status in poll:
      print("llava_jax_status: " + status)
json.dump(st, open(path, "w"))
sys.exit(code)
'''


def fake_env(tmp_path, state=None, **extra):
  """A PATH with fake gcloud/srun/scontrol first; returns (env, log path, state path)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
  for tool in ("srun", "scontrol"):  # log the arguments; exit with $FAKE_SRUN_STATUS / $FAKE_SCONTROL_STATUS
    log_line = f'printf \'%s\\n\' "$(printf \'%q \' {tool} "$@")" >> "$FAKE_LOG"\n'
    (bin_dir / tool).write_text("#!/usr/bin/env bash\n" + log_line
                                + f'exit "${{FAKE_{tool.upper()}_STATUS:-0}}"\n')
  for tool in ("gcloud", "srun", "scontrol"):
    (bin_dir / tool).chmod(0o755)
  log, state_path = tmp_path / "calls.log", tmp_path / "state.json"
  state_path.write_text(json.dumps({"slice": None, "queued": False, "ips": ["10.0.0.1", "10.0.0.2"], "polls": [],
                                    **(state or {})}))
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), FAKE_STATE=str(state_path), FAKE_DIR=str(tmp_path),
             TMPDIR=str(tmp_path), **extra)
  return env, log, state_path


def gcloud_calls(log):
  """The logged gcloud invocations, as argument lists."""
  if not log.exists():
    return []
  return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("[")]


def verbs(calls):
  """(kind, verb) of each gcloud call, with what an ssh asked the worker script to do."""
  out = []
  for call in calls:
    words = [a for a in call[1:] if not a.startswith("--")]
    words = words[1:] if words[0] == "alpha" else words
    verb = words[3]
    if verb == "ssh":
      command = next(a for a in call if a.startswith("--command="))
      verb = next((f"ssh:{w}" for w in ("install", "start", "status") if f"tpu_worker.sh {w}" in command), "ssh")
    out.append(verb)
  return out


def tpu_pod(*args, env):
  return subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), *args], env=env, capture_output=True, text=True,
                        timeout=120)


# ---------------------------------------------------------------------------------------------------------
# setup: the archive


def make_checkout(root, git):
  """A checkout with what a worker needs and what it does not (virtualenv, workdir, bench results, caches)."""
  files = {
      "setup.py": "", "llava_jax/__init__.py": "", "launch/tpu_worker.sh": "", "bench/run.py": "",
      "bench/results/2026-11-22.json": "{}", "configs/mine.py": "", "deleted.py": "",
      ".venv/lib/python3.11/site-packages/jax/__init__.py": "", "workdir_demo/checkpoints/1/x": "",
      "llava_jax/__pycache__/x.cpython-311.pyc": "", "llava_jax.egg-info/PKG-INFO": "", ".pytest_cache/v": "",
      ".gitignore": open(os.path.join(REPO, ".gitignore")).read(),
  }
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  if git:
    def run(*a):
      subprocess.run(["git", "-C", str(root), *a], check=True, capture_output=True)

    run("init", "-q")
    # bench/results is committed (as in this repository): git ls-files lists it, the tar excludes drop it
    run("add", "setup.py", "llava_jax/__init__.py", "launch", "bench", "deleted.py", ".gitignore")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
  (root / "deleted.py").unlink()  # tracked but deleted from the work tree: not shipped, no tar error


@pytest.mark.parametrize("git", [True, False])
def test_setup_ships_only_what_a_worker_needs(tmp_path, git):
  src = tmp_path / "src"
  make_checkout(src, git)
  env, log, _ = fake_env(tmp_path)
  out = tpu_pod("setup", "--name", "llava", "--zone", "z", "--src", str(src), env=env)
  assert out.returncode == 0, out.stdout + out.stderr
  with tarfile.open(tmp_path / "llava_jax.tar.gz") as tar:
    shipped = {m.name for m in tar.getmembers() if m.isfile()}
  # configs/mine.py: untracked but not ignored (a new recipe of the user's) goes along
  assert shipped == {"setup.py", "llava_jax/__init__.py", "launch/tpu_worker.sh", "bench/run.py", "configs/mine.py",
                     ".gitignore"}
  assert verbs(gcloud_calls(log)) == ["scp", "ssh:install"]
  assert not list(tmp_path.glob("llava_jax.*.tar.gz")) and not list(tmp_path.glob("llava_jax.*.files"))  # cleaned up


# ---------------------------------------------------------------------------------------------------------
# create: reuse, recreate, refuse


@pytest.mark.parametrize("state, queued, calls, status", [
    (None, True, ["describe", "create", "describe"], 0),
    ("ACTIVE", True, ["describe", "describe"], 0),
    ("FAILED", True, ["describe", "delete", "create", "describe"], 0),
    ("SUSPENDED", True, ["describe", "delete", "create", "describe"], 0),
    ("READY", False, ["describe", "describe"], 0),
    ("PREEMPTED", False, ["describe", "delete", "create", "describe"], 0),
    ("STOPPED", False, ["describe"], 1),  # someone stopped it: not ours to delete
])
def test_create_reuses_recreates_or_refuses(tmp_path, state, queued, calls, status):
  env, log, _ = fake_env(tmp_path, {"slice": state, "queued": queued})
  out = tpu_pod("create", "--name", "llava", "--zone", "z", "--type", "v4-8", "--poll", "0",
                *(["--queued"] if queued else []), env=env)
  assert out.returncode == status, out.stdout + out.stderr
  assert verbs(gcloud_calls(log)) == calls
  kinds = {c[3] for c in gcloud_calls(log)}
  assert kinds == {"queued-resources" if queued else "tpu-vm"}
  if status:
    assert "stopped by someone" in out.stderr


# ---------------------------------------------------------------------------------------------------------
# supervise


def supervise(tmp_path, polls, slice_state=None, queued=True, attempts=5):
  env, log, _ = fake_env(tmp_path, {"slice": slice_state, "queued": queued, "polls": polls})
  src = tmp_path / "src"
  src.mkdir(exist_ok=True)
  (src / "setup.py").write_text("")
  args = ["supervise", "--name", "llava", "--zone", "z", "--type", "v5p-16", "--src", str(src), "--poll", "0",
          "--max-attempts", str(attempts)] + (["--queued", "--spot"] if queued else ["--spot"])
  out = tpu_pod(*args, "--", MAIN, env=env)
  return out, verbs(gcloud_calls(log))


RUNNING, SAVED, DONE = ["running", "running"], ["75", "75"], ["0", "0"]


def test_supervise_reruns_after_exit_75_and_recreates_a_preempted_slice(tmp_path):
  out, calls = supervise(tmp_path, [RUNNING, SAVED, "preempt", DONE])
  assert out.returncode == 0, out.stdout + out.stderr
  assert calls == [
      "describe", "create", "describe", "scp", "ssh:install", "describe", "ssh:start",  # new slice: set up, start
      "describe", "ssh:status", "describe", "ssh:status",  # running, then 75 on every worker
      "describe", "describe", "describe", "ssh:start",  # rerun on the same slice: no second setup
      "describe", "ssh:status", "describe", "describe",  # the slice goes (SUSPENDED), looked at twice
      "describe", "delete", "create", "describe", "scp", "ssh:install", "describe", "ssh:start",  # recreate, set up
      "describe", "ssh:status"]  # 0 on every worker: done
  assert "saved a checkpoint and stopped" in out.stdout and "preempted" in out.stdout


def test_supervise_on_a_spot_tpu_vm_recreates_it_after_preemption(tmp_path):
  # the slice exists: first a look whether a run is going on it (none), then set up and start
  out, calls = supervise(tmp_path, [["none", "none"], "preempt", DONE], slice_state="READY", queued=False)
  assert out.returncode == 0, out.stdout + out.stderr
  assert calls.count("create") == 1 and calls.count("delete") == 1 and calls.count("ssh:start") == 2
  assert calls.count("ssh:install") == 2  # the first run and the recreated slice


def test_supervise_started_again_watches_the_run_that_is_going(tmp_path):
  """When the machine running supervise went away and it is started again, it neither sets up (which would replace
  the code under the run) nor starts a second run: it watches the one that is going."""
  out, calls = supervise(tmp_path, [RUNNING, RUNNING, DONE], slice_state="ACTIVE")
  assert out.returncode == 0, out.stdout + out.stderr
  assert calls == ["describe", "describe", "ssh:status", "describe", "describe", "ssh:status", "describe",
                   "ssh:status"]
  assert "a run is already going on llava" in out.stdout


@pytest.mark.parametrize("poll, status", [(["1", "running"], None), (["0", "1"], 1), (["75", "139"], 139)])
def test_supervise_stops_on_any_other_status(tmp_path, poll, status):
  polls = [poll] if status else [poll, ["1", "1"]]  # a worker still running: wait for all
  out, calls = supervise(tmp_path, polls)
  assert out.returncode == (status or 1), out.stdout + out.stderr
  assert calls.count("ssh:start") == 1  # never rerun
  assert "not rerunning" in out.stderr


def test_supervise_gives_up_after_max_attempts_with_75(tmp_path):
  out, calls = supervise(tmp_path, [SAVED] * 3, attempts=3)
  assert out.returncode == 75, out.stdout + out.stderr
  assert calls.count("ssh:start") == 3 and "gave up after 3 attempts" in out.stderr


def test_supervise_reports_a_run_that_never_recorded_a_status(tmp_path):
  out, calls = supervise(tmp_path, [["lost", "0"]] * 3)
  assert out.returncode == 1, out.stdout + out.stderr
  assert calls.count("ssh:status") == 3 and "'lost' on 1 worker(s)" in out.stderr


def test_supervise_stops_when_setup_fails_on_a_healthy_slice(tmp_path):
  """A failed install (e.g. the workers' Python is too old) is not retried: the slice is fine, the setup is not."""
  env, log, _ = fake_env(tmp_path, {"slice": "ACTIVE", "queued": True, "install_status": 1, "polls": [["none"] * 2]})
  (tmp_path / "src").mkdir()
  out = tpu_pod("supervise", "--name", "llava", "--zone", "z", "--type", "v4-8", "--queued", "--src",
                str(tmp_path / "src"), "--poll", "0", "--", MAIN, env=env)
  assert out.returncode == 1, out.stdout + out.stderr
  assert "do_setup failed (status 1) on a healthy slice (ACTIVE): not retrying" in out.stderr
  assert verbs(gcloud_calls(log)) == ["describe", "describe", "ssh:status", "scp", "ssh:install", "describe"]


# ---------------------------------------------------------------------------------------------------------
# SLURM


@pytest.mark.parametrize("srun_status, restarts, requeued", [(0, 0, False), (75, 0, True), (75, 9, True),
                                                             (75, 10, False), (1, 0, False), (137, 0, False)])
def test_slurm_requeues_on_exit_75_while_requeues_are_left(tmp_path, srun_status, restarts, requeued):
  env, log, _ = fake_env(tmp_path, FAKE_SRUN_STATUS=str(srun_status), SLURM_JOB_ID="4242",
                         SLURM_RESTART_COUNT=str(restarts), SLURM_SUBMIT_DIR=str(tmp_path))
  out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), "--", MAIN], env=env, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == srun_status, out.stdout + out.stderr
  calls = log.read_text().splitlines()
  assert calls[0].startswith("srun --nodes=1 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 python3 -m "
                             f"llava_jax.main {MAIN}")
  assert calls[1:] == (["scontrol requeue 4242 "] if requeued else [])
  if srun_status == 75 and not requeued:
    assert "resubmit it to go on" in out.stderr


def test_slurm_says_so_when_the_requeue_fails(tmp_path):
  env, log, _ = fake_env(tmp_path, FAKE_SRUN_STATUS="75", FAKE_SCONTROL_STATUS="1", SLURM_JOB_ID="7",
                         SLURM_SUBMIT_DIR=str(tmp_path))
  out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), "--", MAIN], env=env, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 75 and "the requeue failed" in out.stderr and "resubmit" in out.stderr
  assert log.read_text().splitlines()[1] == "scontrol requeue 7 "
