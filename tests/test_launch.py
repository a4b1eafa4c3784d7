"""launch/: the scripts are shellcheck-clean, reject bad arguments with a usage error, and in --dry-run print
exactly the commands they would run (gcloud for TPU pods, srun for SLURM, N local processes). The TPU worker side
(launch/tpu_worker.sh) runs for real here; the supervise loop and the SLURM requeue run for real against fake
`gcloud` / `srun` / `scontrol` executables (tests/test_launch_fakes.py)."""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("tpu_pod.sh", "tpu_worker.sh", "slurm_gpu.sbatch", "local_multiprocess.sh")
SOURCED = ("common.sh", "tpu_supervise.sh")
MAIN = "--config=configs/v15_stage2.py:7b"


def sh(script, *args, env=None, cwd=REPO):
  run_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  run_env.update(env or {})
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=cwd, env=run_env, capture_output=True,
                        text=True, timeout=60)


def commands(out):
  """The '+ '-prefixed command lines of a dry run."""
  return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", SCRIPTS + SOURCED)
def test_shellcheck_clean(script, tmp_path):
  """-x follows `source common.sh` (found next to the script, whatever the working directory)."""
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck); CI installs it")
  out = subprocess.run(["shellcheck", "-x", "--shell=bash", os.path.join(LAUNCH, script)], cwd=tmp_path,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("script, args", [
    ("tpu_pod.sh", ("stop", "--name", "x", "--zone", "z", "--dry-run")),
    ("local_multiprocess.sh", ("--dry-run", "-n", "1", "--", MAIN)),
])
def test_runs_from_any_directory(script, args, tmp_path):
  """The shared helpers (launch/common.sh) are sourced next to the script, not from the working directory; usage
  errors name the script that failed."""
  here = sh(script, *args)
  elsewhere = sh(script, *args, cwd=tmp_path)
  assert elsewhere.returncode == 0 and elsewhere.stdout == here.stdout and commands(here), elsewhere.stderr
  out = subprocess.run(["bash", f"./{script}", "--bogus"], cwd=LAUNCH, capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and out.stderr.startswith(f"{script}: unknown "), out.stderr
  assert "'--bogus'" in out.stderr
  assert f"run 'launch/{script} --help' for usage" in out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  out = sh(script, "--help")
  assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr


# ---------------------------------------------------------------------------------------------------------
# TPU pod


@pytest.mark.parametrize("args, message", [
    ((), "usage:"),
    (("launch-it",), "unknown command 'launch-it'"),
    (("create", "--zone", "us-east5-a", "--type", "v5p-64"), "--name is required"),
    (("create", "--name", "x", "--type", "v5p-64"), "--zone is required"),
    (("create", "--name", "x", "--zone", "z"), "create needs --type"),
    (("create", "--name", "x", "--zone", "z", "--type", "a100"), "not an accelerator type"),
    (("create", "--name", "x", "--zone", "z", "--type", "v9-8"), "no default --version"),
    (("run", "--name", "x", "--zone", "z"), "run needs the arguments of llava_jax.main"),
    (("logs", "--name", "x", "--zone", "z", "--worker", "first"), "--worker must be"),
    (("stop", "--name", "x", "--zone", "z", "--bogus"), "unknown option '--bogus'"),
    (("stop", "--name"), "--name needs a value"),
    (("run", "--name", "x", "--zone", "z", "--env", "no-equals", "--", MAIN), "--env wants KEY=VALUE"),
    (("create", "--name", "x", "--zone", "z", "--type", "v4-8", "--reserved"),
     "--reserved is a queued-resource option"),
    (("create", "--name", "x", "--zone", "z", "--type", "v4-8", "--queued", "--spot", "--best-effort"),
     "--spot and --best-effort exclude each other"),
    (("supervise", "--name", "x", "--zone", "z", "--type", "v4-8", "--max-attempts", "0", "--", MAIN),
     "--max-attempts must be a positive integer"),
    (("supervise", "--name", "x", "--zone", "z", "--type", "v4-8", "--poll", "1m", "--", MAIN), "--poll must be"),
    (("supervise", "--name", "x", "--zone", "z", "--type", "v4-8"), "supervise needs the arguments of llava_jax.main"),
    (("supervise", "--name", "x", "--zone", "z", "--", MAIN), "supervise needs --type"),
])
def test_tpu_pod_usage_errors(args, message):
  out = sh("tpu_pod.sh", *args, "--dry-run") if args else sh("tpu_pod.sh")
  assert out.returncode == 2, out.stdout + out.stderr
  assert message in out.stderr
  assert not commands(out)  # nothing would have run


def test_tpu_pod_up_dry_run_prints_every_step():
  out = sh("tpu_pod.sh", "up", "--name", "llava", "--zone", "us-east5-a", "--type", "v5p-64", "--project", "proj",
           "--spot", "--env", "WANDB_MODE=offline", "--dry-run", "--", MAIN, "--workdir=gs://bucket/run 1")
  assert out.returncode == 0, out.stderr
  cmds = commands(out)
  where = "--zone=us-east5-a --project=proj"
  assert cmds[0] == f"gcloud compute tpus tpu-vm describe llava {where} '--format=value(state)'"
  assert cmds[1] == (f"gcloud compute tpus tpu-vm create llava {where} --accelerator-type=v5p-64 "
                     "--version=v2-alpha-tpuv5 --spot")
  # The archive holds what `git ls-files` lists (tracked + untracked-not-ignored) minus what a worker does not need.
  assert cmds[2].startswith(f"git -C {REPO} ls-files -z --cached --others --exclude-standard > ")
  file_list = cmds[2].split(" > ")[1].split()[0]
  assert cmds[3].startswith("tar -czf ") and cmds[3].endswith(f"--null --files-from={file_list}")
  tar = cmds[3].split()
  anchored, anywhere = tar.index("--anchored"), tar.index("--no-anchored")
  top = tar[anchored + 1:anywhere]
  for excluded in (".git", ".venv", "'--exclude=workdir*'", "bench/results", "multiprocess_logs"):
    assert (excluded if excluded.startswith("'") else f"--exclude={excluded}") in top, (excluded, top)
  for excluded in ("__pycache__", "'--exclude=*.egg-info'", ".pytest_cache"):
    assert (excluded if excluded.startswith("'") else f"--exclude={excluded}") in tar[anywhere + 1:], excluded
  assert f"-C {REPO} " in cmds[3]
  assert cmds[4].startswith("gcloud compute tpus tpu-vm scp ") and cmds[4].endswith(
      f"llava:llava_jax.tar.gz {where} --worker=all")
  assert cmds[5].startswith(f"gcloud compute tpus tpu-vm ssh llava {where} --worker=all '--command=set -e; ")
  # a fresh copy, then the worker's Python check and install (launch/tpu_worker.sh install)
  assert "rm -rf ~/llava_jax && mv ~/llava_jax.new ~/llava_jax" in cmds[5]
  assert cmds[5].endswith("&& bash ~/llava_jax/launch/tpu_worker.sh install'")
  assert cmds[6] == (f"gcloud compute tpus tpu-vm describe llava {where} "
                     "'--format=value(networkEndpoints[].ipAddress)'")
  run = cmds[7]
  assert run.startswith(f"gcloud compute tpus tpu-vm ssh llava {where} --worker=all '--command=cd ~/llava_jax && ")
  assert "agent-worker-number" in run  # each worker reads its own process id
  assert ("bash ~/llava_jax/launch/tpu_worker.sh start $HOME/llava_jax_run -- env WANDB_MODE=offline "
          "~/venv/bin/python -m llava_jax.main --coordinator_address=WORKER0_IP:8476 "
          "--num_processes=NUM_WORKERS --process_id=$ID --config=configs/v15_stage2.py:7b "
          "--workdir=gs://bucket/run\\ 1'") in run
  assert cmds[8] == (f"gcloud compute tpus tpu-vm ssh llava {where} --worker=0 "
                     "'--command=tail -n +1 -F $HOME/llava_jax_run.log'")
  assert len(cmds) == 9


def test_tpu_pod_setup_without_git_and_with_a_worker_python(tmp_path):
  """Outside a git checkout the archive lists the top-level entries (same excludes); --python reaches the worker."""
  (tmp_path / "pkg").mkdir()
  out = sh("tpu_pod.sh", "setup", "--name", "x", "--zone", "z", "--src", str(tmp_path), "--python",
           "/opt/py 3.11/bin/python", "--dry-run")
  assert out.returncode == 0, out.stderr
  cmds = commands(out)
  assert cmds[0].startswith(f"find {tmp_path} -mindepth 1 -maxdepth 1 -printf '%P\\0' > "), cmds[0]
  assert "--exclude=.venv" in cmds[1] and f"-C {tmp_path} " in cmds[1]
  assert cmds[3].endswith("tpu_worker.sh install --python /opt/py\\ 3.11/bin/python'")

def test_tpu_pod_other_commands_dry_run():
  base = ("--name", "llava", "--zone", "europe-west4-b", "--dry-run")
  where = "llava --zone=europe-west4-b"
  out = sh("tpu_pod.sh", "create", *base, "--type", "v5litepod-256")
  assert commands(out)[1].endswith("--accelerator-type=v5litepod-256 --version=v2-alpha-tpuv5-lite")
  out = sh("tpu_pod.sh", "create", *base, "--type", "v4-32", "--version", "my-image")
  assert commands(out)[1].endswith("--accelerator-type=v4-32 --version=my-image")
  out = sh("tpu_pod.sh", "stop", *base)
  (cmd,) = commands(out)
  assert cmd.startswith(f"gcloud compute tpus tpu-vm ssh {where} --worker=all "
                        "'--command=if [ -f $HOME/llava_jax_run.pid ]")
  assert "kill -TERM" in cmd  # SIGTERM: the training loop saves a checkpoint and exits
  out = sh("tpu_pod.sh", "logs", *base, "--worker", "all")
  assert commands(out) == [f"gcloud compute tpus tpu-vm ssh {where} --worker=all '--command=tail -n 200 -F "
                           "$HOME/llava_jax_run.log'"]
  out = sh("tpu_pod.sh", "delete", *base)
  assert commands(out) == [f"gcloud compute tpus tpu-vm delete {where} --quiet"]
  out = sh("tpu_pod.sh", "run", *base, "--no-follow", "--port", "9000", "--", MAIN)
  cmds = commands(out)
  assert len(cmds) == 2 and "--coordinator_address=WORKER0_IP:9000" in cmds[1]


@pytest.mark.parametrize("capacity, track, flag", [
    ((), "", ""), (("--spot",), "", " --spot"), (("--reserved",), "", " --reserved"),
    (("--best-effort",), "alpha ", " --best-effort"),  # only gcloud alpha has --best-effort
])
def test_tpu_pod_queued_resources_dry_run(capacity, track, flag):
  base = ("--name", "llava", "--zone", "us-central2-b", "--queued", "--dry-run")
  out = sh("tpu_pod.sh", "create", *base, "--type", "v4-32", *capacity)
  assert out.returncode == 0, out.stderr
  assert commands(out) == [
      "gcloud compute tpus queued-resources describe llava --zone=us-central2-b '--format=value(state.state)'",
      f"gcloud {track}compute tpus queued-resources create llava --zone=us-central2-b --node-id=llava "
      f"--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base{flag}"]
  assert "until ACTIVE" in out.stdout
  out = sh("tpu_pod.sh", "delete", *base)
  assert commands(out) == ["gcloud compute tpus queued-resources delete llava --zone=us-central2-b --force --quiet"]


def test_tpu_pod_supervise_dry_run_prints_one_attempt_and_the_watch():
  out = sh("tpu_pod.sh", "supervise", "--name", "llava", "--zone", "z", "--type", "v5p-64", "--queued", "--spot",
           "--max-attempts", "4", "--poll", "30", "--dry-run", "--", MAIN)
  assert out.returncode == 0, out.stderr
  cmds = commands(out)
  assert cmds[1].startswith("gcloud compute tpus queued-resources create llava --zone=z --node-id=llava ")
  assert cmds[1].endswith(" --spot")
  assert cmds[2].startswith("git ") and cmds[3].startswith("tar ") and " scp " in cmds[4]
  assert cmds[5].endswith("tpu_worker.sh install'")
  assert "tpu_worker.sh start $HOME/llava_jax_run -- " in cmds[7] and MAIN in cmds[7]
  assert "tail -n" not in out.stdout  # supervise watches; it does not follow the log
  assert cmds[8:] == [
      "gcloud compute tpus queued-resources describe llava --zone=z '--format=value(state.state)'",
      "gcloud compute tpus tpu-vm ssh llava --zone=z --worker=all "
      "'--command=bash ~/llava_jax/launch/tpu_worker.sh status $HOME/llava_jax_run'"]
  assert "every 30s" in out.stdout and "at most 4 runs, then exit 75" in out.stdout


# ---------------------------------------------------------------------------------------------------------
# SLURM


@pytest.mark.parametrize("args, message", [
    (("--dry-run",), "give llava_jax.main's arguments after '--'"),
    (("--dry-run", "--", "--workdir=x"), "needs --config"),
    (("--dry-run", "--gpus-per-node", "zero", "--", MAIN), "--gpus-per-node must be a positive integer"),
    (("--dry-run", "--nodes"), "--nodes needs a value"),
    (("--dry-run", MAIN), "unknown option '--config=configs/v15_stage2.py:7b'"),
    (("--", MAIN), "not inside a SLURM job"),
    (("--dry-run", "--cpus-per-task", "0", "--", MAIN), "--cpus-per-task must be a positive integer"),
    (("--dry-run", "--max-requeues", "-1", "--", MAIN), "--max-requeues must be a number, got '-1'"),
    (("--dry-run", "--max-requeues", "many", "--", MAIN), "--max-requeues must be a number"),
])
def test_slurm_usage_errors(args, message):
  out = sh("slurm_gpu.sbatch", *args)
  assert out.returncode == 2, out.stdout + out.stderr
  assert message in out.stderr and not commands(out)


def test_slurm_dry_run_one_process_per_gpu():
  out = sh("slurm_gpu.sbatch", "--dry-run", "--nodes", "2", "--", MAIN, "--workdir=/shared/run 1")
  assert out.returncode == 0, out.stderr
  assert commands(out) == [
      "env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 "
      f"--cpus-per-task=12 python3 -m llava_jax.main {MAIN} '--workdir=/shared/run 1'",
      "scontrol requeue JOB_ID"]
  assert "# on exit 75, while requeues are left (0 of 10 used):" in out.stdout


def test_slurm_dry_run_per_node_reads_the_allocation():
  env = {"SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "64",
         "SLURM_RESTART_COUNT": "2", "PYTHON": "/opt/venv/bin/python"}
  out = sh("slurm_gpu.sbatch", "--dry-run", "--per-node", "--mem-fraction", "0.9", "--max-requeues", "5", "--", MAIN,
           env=env)
  assert out.returncode == 0, out.stderr
  assert commands(out) == [
      "env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 JAX_LOCAL_DEVICE_IDS=0,1,2,3 srun --nodes=4 --ntasks-per-node=1 "
      f"--gpus-per-node=4 --cpus-per-task=64 /opt/venv/bin/python -m llava_jax.main {MAIN}",
      "scontrol requeue JOB_ID"]
  assert "(2 of 5 used)" in out.stdout
  out = sh("slurm_gpu.sbatch", "--dry-run", "--cpus-per-task", "8", "--", MAIN, env=env)
  assert "--cpus-per-task=8 " in commands(out)[0]


def test_slurm_directives():
  """One task per GPU; SIGTERM 5 minutes before the time limit to the job steps (no 'B:': that would signal only this
  batch shell, which waits for srun, and never python); requeue allowed; the log appended across requeues."""
  lines = [line.strip() for line in open(os.path.join(LAUNCH, "slurm_gpu.sbatch")) if line.startswith("#SBATCH")]
  for directive in ("--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--signal=TERM@300",
                    "--requeue", "--open-mode=append"):
    assert f"#SBATCH {directive}" in lines, directive
  assert not any("--signal=B:" in line for line in lines)

# ---------------------------------------------------------------------------------------------------------
# Local processes


@pytest.mark.parametrize("args, message", [
    (("--dry-run",), "give llava_jax.main's arguments after '--'"),
    (("--dry-run", "-n", "0", "--", MAIN), "--num-processes must be a positive integer"),
    (("--dry-run", "--devices-per-process", "x", "--", MAIN), "--devices-per-process must be"),
    (("--dry-run", "--port", "p", "--", MAIN), "--port must be a number"),
    (("--dry-run", "--", "--workdir=x"), "needs --config"),
])
def test_local_usage_errors(args, message):
  out = sh("local_multiprocess.sh", *args)
  assert out.returncode == 2, out.stdout + out.stderr
  assert message in out.stderr and not commands(out)


def test_local_dry_run_cpu_and_gpu():
  out = sh("local_multiprocess.sh", "--dry-run", "-n", "3", "--devices-per-process", "2", "--port", "2000",
           "--log-dir", "/tmp/mp logs", "--", "--config=configs/tiny.py", "--workdir=/tmp/mp")
  assert out.returncode == 0, out.stderr
  cmds = commands(out)
  assert cmds == [
      "env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 PYTHONUNBUFFERED=1 python3 -m "
      f"llava_jax.main --coordinator_address=127.0.0.1:2000 --num_processes=3 --process_id={i} "
      f"--config=configs/tiny.py --workdir=/tmp/mp > '/tmp/mp logs/process_{i}.log'" for i in range(3)]
  assert not os.path.exists("/tmp/mp logs")  # a dry run creates nothing
  out = sh("local_multiprocess.sh", "--dry-run", "--gpus", "--", "--config=configs/tiny.py")
  assert [c.split(" PYTHONUNBUFFERED")[0] for c in commands(out)] == ["env CUDA_VISIBLE_DEVICES=0",
                                                                       "env CUDA_VISIBLE_DEVICES=1"]


# ---------------------------------------------------------------------------------------------------------
# TPU worker side (launch/tpu_worker.sh runs for real)


def worker(*args, env=None, cwd=REPO):
  return sh("tpu_worker.sh", *args, env=env, cwd=cwd)


def test_worker_python_floor_matches_setup_py_and_the_installed_packages():
  """The workers' check, setup.py's python_requires and the Requires-Python of the installed jax/flax stack agree."""
  import re
  from importlib import metadata
  floors = {}
  for dist in ("jax", "jaxlib", "flax", "orbax-checkpoint", "grain", "transformers"):
    spec = metadata.metadata(dist)["Requires-Python"]
    floors[dist] = tuple(int(p) for p in re.fullmatch(r"\s*>=\s*(\d+)\.(\d+)(?:\.0)?\s*", spec).groups())
  needed = max(floors.values())
  assert needed >= (3, 11), floors  # why TPU VM images with Python 3.10 need the check at all
  setup_py = open(os.path.join(REPO, "setup.py")).read()
  assert re.search(r'python_requires=">=(\d+)\.(\d+)"', setup_py).groups() == tuple(map(str, needed))
  worker_sh = open(os.path.join(LAUNCH, "tpu_worker.sh")).read()
  assert re.search(r"^MIN_PYTHON=\((\d+) (\d+)\)", worker_sh, re.M).groups() == tuple(map(str, needed))


def test_worker_install_refuses_an_old_python_with_the_fix(tmp_path):
  old = tmp_path / "python3.10"
  old.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.10.12" && exit 0\n'
                 'exec /usr/bin/env python3 -c "import sys; sys.version_info = (3, 10); exec(sys.argv[2])" "$@"\n')
  old.chmod(0o755)
  out = worker("install", "--python", str(old), env={"HOME": str(tmp_path)})
  assert out.returncode == 1, out.stdout + out.stderr
  assert "needs Python >= 3.11" in out.stderr and "this worker has: Python 3.10.12" in out.stderr
  assert "apt-get install -y python3.11 python3.11-venv" in out.stderr and "--python" in out.stderr  # how to fix
  assert not (tmp_path / "venv").exists() and not commands(out)  # nothing installed
  out = worker("install", "--python", str(tmp_path / "nope"), env={"HOME": str(tmp_path)})
  assert out.returncode == 1 and f"this worker has: no {tmp_path}/nope" in out.stderr


def test_worker_install_dry_run_with_a_new_enough_python(tmp_path):
  out = worker("install", "--python", sys.executable, "--venv", str(tmp_path / "v env"), "--dry-run")
  assert out.returncode == 0, out.stderr
  venv = f"'{tmp_path}/v env"
  assert commands(out) == [f"{sys.executable} -m venv {venv}'", f"{venv}/bin/pip' install -q -U pip",
                           f"{venv}/bin/pip' install -q -e '{REPO}[gcs]' 'jax[tpu]'"]
  assert not (tmp_path / "v env").exists()


def test_worker_run_records_pid_and_exit_status(tmp_path):
  state = str(tmp_path / "run")
  assert worker("status", state).stdout == "llava_jax_status: none\n"
  out = worker("run", state, "--", "bash", "-c", "echo training; exit 75")
  assert out.returncode == 75 and "training" in out.stdout and "exited with status 75" in out.stdout
  assert open(state + ".status").read() == "75\n" and open(state + ".pid").read().strip().isdigit()
  assert worker("status", state).stdout == "llava_jax_status: 75\n"
  os.remove(state + ".status")  # the pid is gone and nothing was recorded: the run was lost
  assert worker("status", state).stdout == "llava_jax_status: lost\n"


def test_worker_start_passes_sigterm_on_and_refuses_a_second_run(tmp_path):
  """`start` detaches the run (log in STATE.log); SIGTERM to the recorded pid (what `tpu_pod.sh stop` sends) makes
  a trainer-like child exit 75, which is recorded; a second start while it runs is refused."""
  state, ready = str(tmp_path / "run"), tmp_path / "ready"
  child = ("import pathlib, signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))\n"
           f"pathlib.Path({str(ready)!r}).touch()\n"
           "time.sleep(600)\n")
  out = worker("start", state, "--", sys.executable, "-c", child)
  assert out.returncode == 0 and "started" in out.stdout, out.stderr
  while not ready.exists():  # the child has its handler in place
    subprocess.run(["sleep", "0.05"])
  assert worker("status", state).stdout == "llava_jax_status: running\n"
  again = worker("start", state, "--", "true")
  assert again.returncode == 1 and "a run is already going" in again.stderr
  os.kill(int(open(state + ".pid").read()), 15)
  while not os.path.exists(state + ".status"):
    subprocess.run(["sleep", "0.05"])
  assert worker("status", state).stdout == "llava_jax_status: 75\n"
  assert "exited with status 75" in open(state + ".log").read()
