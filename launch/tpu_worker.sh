#!/usr/bin/env bash
# Runs ON each TPU VM worker: launch/tpu_pod.sh copies the checkout to ~/llava_jax and calls this over ssh.
#   install  check the interpreter (llava_jax needs Python >= 3.11), make the venv, pip install the checkout
#   start    `run` in the background (nohup), its output in STATE.log, after checking no run is going
#   run      run a command in the foreground, recording its pid (for `tpu_pod.sh stop`) and, when it ends, its
#            exit status (for `tpu_pod.sh supervise`: 0 done, 75 saved-and-stopped, anything else an error)
#   status   print that state as one line: 'llava_jax_status: running|none|lost|<exit status>'
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_worker.sh install [--python PY] [--venv DIR] [--dry-run]
       launch/tpu_worker.sh start STATE -- COMMAND...
       launch/tpu_worker.sh run STATE -- COMMAND...
       launch/tpu_worker.sh status STATE

  install    pick the interpreter (--python, else the first of python3.13 python3.12 python3.11 python3 that is
             >= 3.11), stop with a clear message when there is none, then make the venv (default ~/venv) and
             pip install this checkout with jax[tpu]
  start      check that no run is going, then `run` detached from the terminal (nohup), output to STATE.log
  run        run COMMAND; its pid goes to STATE.pid, its exit status to STATE.status when it ends (SIGTERM/INT/HUP
             sent to this script are passed on to COMMAND); refuses while STATE.pid names a live process
  status     'running' (STATE.pid alive), the recorded exit status, 'lost' (pid gone, nothing recorded) or 'none'
EOF
}

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" # die, quote, show, need_value

MIN_PYTHON=(3 11) # jax 0.10, jaxlib, flax 0.12, orbax-checkpoint 0.12, grain 0.2.18, libtpu: Requires-Python >= 3.11
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# python_ok PY: PY runs and is at least MIN_PYTHON.
python_ok() {
  command -v "$1" >/dev/null 2>&1 &&
    "$1" -c "import sys; sys.exit(0 if sys.version_info >= (${MIN_PYTHON[0]}, ${MIN_PYTHON[1]}) else 1)" 2>/dev/null
}

do_install() {
  local python="" venv="$HOME/venv" dry_run=0 candidates c
  while (($#)); do
    case "$1" in
      --python) need_value "$1" $# "${2:-}"; python=$2; shift 2 ;;
      --venv) need_value "$1" $# "${2:-}"; venv=$2; shift 2 ;;
      --dry-run) dry_run=1; shift ;;
      *) die "unknown option '$1'" ;;
    esac
  done
  if [[ -n $python ]]; then candidates=("$python"); else candidates=(python3.13 python3.12 python3.11 python3); fi
  local chosen=""
  for c in "${candidates[@]}"; do
    if python_ok "$c"; then chosen=$c; break; fi
  done
  if [[ -z $chosen ]]; then
    local have shown=${python:-python3}
    have=$("$shown" --version 2>&1) || have="no $shown"
    cat >&2 <<EOF
$(hostname): llava_jax needs Python >= ${MIN_PYTHON[0]}.${MIN_PYTHON[1]} (jax 0.10, flax 0.12, orbax and libtpu
require it); this worker has: $have (tried: ${candidates[*]}).
Fix, then rerun 'launch/tpu_pod.sh setup':
  - Ubuntu 22.04 TPU images (Python 3.10): install python3.11 on every worker, then setup with --python python3.11:
      gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all \\
        --command='sudo apt-get update && sudo apt-get install -y python3.11 python3.11-venv'
  - or install one with uv (curl -LsSf https://astral.sh/uv/install.sh | sh; ~/.local/bin/uv python install 3.11)
    or pyenv, and pass its path with --python;
  - or create the slice with a --version (runtime) whose image ships Python >= ${MIN_PYTHON[0]}.${MIN_PYTHON[1]}.
EOF
    exit 1
  fi
  echo "$(hostname): using $chosen ($("$chosen" --version 2>&1))"
  local cmds=(
    "$chosen -m venv $(quote "$venv")"
    "$(quote "$venv/bin/pip") install -q -U pip"
    "$(quote "$venv/bin/pip") install -q -e $(quote "${REPO}[gcs]") $(quote "jax[tpu]")"
  )
  printf '+ %s\n' "${cmds[@]}"
  if ((dry_run)); then return 0; fi
  "$chosen" -m venv "$venv"
  "$venv/bin/pip" install -q -U pip
  "$venv/bin/pip" install -q -e "${REPO}[gcs]" "jax[tpu]"
}

# alive PIDFILE: the pid in PIDFILE is a live process.
alive() {
  local pid
  [[ -f $1 ]] && pid=$(<"$1") && [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

do_run() {
  if (($# < 3)) || [[ $2 != -- ]]; then die "run wants STATE -- COMMAND..."; fi
  local state=$1
  shift 2
  if alive "$state.pid"; then
    die "a run is already going here (pid $(<"$state.pid")): stop it first (launch/tpu_pod.sh stop)"
  fi
  rm -f "$state.status"
  "$@" &
  local child=$!
  echo "$child" >"$state.pid"
  # shellcheck disable=SC2064 # the child's pid is fixed now
  trap "kill -TERM $child 2>/dev/null || true" TERM INT HUP
  while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done # a trapped signal interrupts wait
  local status=0
  wait "$child" || status=$? # bash keeps the status of a reaped child
  echo "$status" >"$state.status"
  echo "llava_jax: $(show "$@") exited with status $status"
  return "$status"
}

do_start() {
  if (($# < 3)) || [[ $2 != -- ]]; then die "start wants STATE -- COMMAND..."; fi
  local state=$1
  if alive "$state.pid"; then
    echo "$(hostname): a run is already going (pid $(<"$state.pid")): stop it first (launch/tpu_pod.sh stop)" >&2
    exit 1
  fi
  rm -f "$state.pid" "$state.status" # `status` says none (not the last run's result) until the new run starts
  nohup bash "${BASH_SOURCE[0]}" run "$@" >"$state.log" 2>&1 </dev/null &
  echo "$(hostname): started (log $state.log)"
}

do_status() {
  (($# == 1)) || die "status wants STATE"
  local state=$1 result
  if [[ -f $state.status ]]; then
    result=$(<"$state.status")
  elif alive "$state.pid"; then
    result=running
  elif [[ -f $state.pid ]]; then
    result=lost
  else
    result=none
  fi
  echo "llava_jax_status: $result"
}

(($#)) || { usage >&2; exit 2; }
case "$1" in
  -h | --help) usage ;;
  install) shift; do_install "$@" ;;
  start) shift; do_start "$@" ;;
  run) shift; do_run "$@" ;;
  status) shift; do_status "$@" ;;
  *) die "unknown command '$1'" ;;
esac
