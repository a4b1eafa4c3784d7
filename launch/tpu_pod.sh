#!/usr/bin/env bash
# Cloud TPU pod launcher for llava_jax: create (or reuse) a TPU VM slice, put this project on every worker,
# run the same `python -m llava_jax.main ...` on all workers (one process per host, jax.distributed wired up),
# stream the logs, stop (SIGTERM: the training loop saves a checkpoint and exits), delete; `supervise` keeps a run
# going through preemptions (queued resources, Spot) by rerunning it: it resumes from its checkpoint.
# Exit-status contract of llava_jax.main (and of `supervise`): 0 done, 75 (EX_TEMPFAIL) saved a checkpoint and
# stopped -> rerun the same command, anything else an error.
# The worker side (interpreter check + install, the run's pid and exit status) is launch/tpu_worker.sh.
# Every gcloud command is printed before it runs; --dry-run prints them and runs nothing.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh COMMAND --name NAME --zone ZONE [options] [-- MAIN_ARGS...]

commands:
  create     create the slice, or reuse it when it exists     (needs --type; --version, --queued, --spot optional)
  setup      copy this checkout (without .git, .venv, workdirs, bench/results, caches) to every worker, check
             the workers' Python (>= 3.11), make ~/venv, pip install it with jax[tpu]
  run        run `python -m llava_jax.main MAIN_ARGS` on every worker in the background, then follow worker 0's log
  supervise  create + setup + run, then watch: rerun when the run exits 75 (saved and stopped) or the slice is
             preempted (recreating it), at most --max-attempts runs; exits 0 when the run is done, 75 when the
             attempts ran out (rerun to resume), the run's status on any other failure
  logs       follow the run's log (--worker N, default 0; 'all' for every worker)
  stop       SIGTERM the run on every worker (the loop checkpoints and exits 75)
  delete     delete the slice (with --queued: the queued resource and its slice)
  up         create + setup + run

options:
  --name NAME        TPU VM name (and queued-resource id)  --zone ZONE        e.g. us-east5-a
  --project ID       GCP project (default: gcloud's)
  --type TYPE        accelerator type, e.g. v5p-64, v4-32, v5litepod-256
  --version V        TPU software version (default by type: v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
                     v5e v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
  --queued           create through `gcloud compute tpus queued-resources` (waits in the queue until ACTIVE)
  --spot             Spot capacity (preemptible; with or without --queued)
  --reserved         (--queued) use the project's reservation   --best-effort  (--queued) best-effort capacity
  --src DIR          checkout to copy (default: this repo)
  --python PY        `setup`: the workers' interpreter (default: the first of python3.13..python3.11, python3 >= 3.11)
  --env KEY=VALUE    exported on the workers for `run` (repeatable)
  --port P           jax.distributed coordinator port (default 8476)
  --worker W         `logs`: worker index or 'all' (default 0)
  --no-follow        `run`: return after starting
  --max-attempts N   `supervise`: runs at most (default 10)
  --poll S           `supervise`: seconds between checks (default 60)
  --dry-run          print the commands, run nothing
  -h, --help         this text

examples:
  launch/tpu_pod.sh up --name llava --zone us-east5-a --type v5p-64 -- \
      --config=configs/v15_stage2.py:7b --workdir=gs://BUCKET/runs/v15s2 --config.init.pretrained=...
  launch/tpu_pod.sh supervise --name llava --zone us-east5-a --type v5p-64 --queued --spot -- \
      --config=configs/v15_stage2.py:7b --workdir=gs://BUCKET/runs/v15s2 --config.init.pretrained=...
  launch/tpu_pod.sh stop --name llava --zone us-east5-a
EOF
}

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" # die, quote, show, need_value

# run COMMAND...: print it (`+ ...`), then run it unless --dry-run.
run() {
  printf '+ '
  show "$@"
  if ((DRY_RUN)); then return 0; fi
  "$@"
}

# fail MESSAGE...: a failure that is not a usage error (exit 1).
fail() {
  echo "$LAUNCH_SCRIPT: $*" >&2
  exit 1
}

COMMAND=""
NAME=""
ZONE=""
PROJECT=""
TYPE=""
VERSION=""
QUEUED=0
CAPACITY="" # spot | reserved | best-effort (default: on demand)
SRC=""
WORKER_PYTHON=""
PORT=8476
WORKER=0
FOLLOW=1
MAX_ATTEMPTS=10
POLL=60
DRY_RUN=0
ENVS=()
MAIN_ARGS=()

if (($# == 0)); then
  usage >&2
  exit 2
fi
case "$1" in
  -h | --help)
    usage
    exit 0
    ;;
  create | setup | run | supervise | logs | stop | delete | up) COMMAND=$1 ;;
  *) die "unknown command '$1'" ;;
esac
shift

set_capacity() {
  [[ -z $CAPACITY || $CAPACITY == "$1" ]] || die "--$CAPACITY and --$1 exclude each other"
  CAPACITY=$1
}

while (($#)); do
  case "$1" in
    --name) need_value "$1" $# "${2:-}"; NAME=$2; shift 2 ;;
    --zone) need_value "$1" $# "${2:-}"; ZONE=$2; shift 2 ;;
    --project) need_value "$1" $# "${2:-}"; PROJECT=$2; shift 2 ;;
    --type) need_value "$1" $# "${2:-}"; TYPE=$2; shift 2 ;;
    --version) need_value "$1" $# "${2:-}"; VERSION=$2; shift 2 ;;
    --src) need_value "$1" $# "${2:-}"; SRC=$2; shift 2 ;;
    --python) need_value "$1" $# "${2:-}"; WORKER_PYTHON=$2; shift 2 ;;
    --port) need_value "$1" $# "${2:-}"; PORT=$2; shift 2 ;;
    --worker) need_value "$1" $# "${2:-}"; WORKER=$2; shift 2 ;;
    --max-attempts) need_value "$1" $# "${2:-}"; MAX_ATTEMPTS=$2; shift 2 ;;
    --poll) need_value "$1" $# "${2:-}"; POLL=$2; shift 2 ;;
    --env)
      need_value "$1" $# "${2:-}"
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$2'"
      ENVS+=("$2")
      shift 2
      ;;
    --queued) QUEUED=1; shift ;;
    --spot) set_capacity spot; shift ;;
    --reserved) set_capacity reserved; shift ;;
    --best-effort) set_capacity best-effort; shift ;;
    --no-follow) FOLLOW=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1'" ;;
  esac
done

[[ -n $NAME ]] || die "--name is required"
[[ -n $ZONE ]] || die "--zone is required"
[[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
[[ $WORKER =~ ^([0-9]+|all)$ ]] || die "--worker must be an index or 'all', got '$WORKER'"
[[ $MAX_ATTEMPTS =~ ^[1-9][0-9]*$ ]] || die "--max-attempts must be a positive integer, got '$MAX_ATTEMPTS'"
[[ $POLL =~ ^[0-9]+$ ]] || die "--poll must be a number of seconds, got '$POLL'"
if [[ $CAPACITY == reserved || $CAPACITY == best-effort ]] && ((!QUEUED)); then
  die "--$CAPACITY is a queued-resource option: add --queued"
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=${SRC:-$REPO}
[[ -d $SRC ]] || die "--src '$SRC' is not a directory"
RUN_STATE="\$HOME/llava_jax_run" # expanded on the workers: STATE.pid, STATE.status, STATE.log (launch/tpu_worker.sh)
LOG="$RUN_STATE.log"
PID="$RUN_STATE.pid"
WORKER_SH="bash ~/llava_jax/launch/tpu_worker.sh"

GCLOUD=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
WHERE=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then WHERE+=(--project="$PROJECT"); fi

# What a fresh worker does not need: version control, virtualenvs, workdirs (checkpoints), benchmark results, caches.
# Anchored ones match at the top of the checkout, the others anywhere in it.
EXCLUDE_TOP=(.git .venv venv 'workdir*' multiprocess_logs bench/results build dist)
EXCLUDE_ANY=(__pycache__ '*.egg-info' .pytest_cache .ipynb_checkpoints)

default_version() { # sets VERSION from the accelerator type (no subshell: die must end the script)
  case "$1" in
    v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v5e-* | v5litepod-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) die "no default --version for accelerator type '$1': pass --version" ;;
  esac
}

ssh_all() { # ssh_all WORKER REMOTE_COMMAND
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

# ---------------------------------------------------------------------------------------------------------
# The slice: a TPU VM, or a queued resource whose node has the same name.

CREATE_CMD=()
DELETE_CMD=()
STATE_CMD=()
plan_slice() { # fills CREATE_CMD, DELETE_CMD, STATE_CMD
  if ((QUEUED)); then
    STATE_CMD=("${QR[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state.state)')
    DELETE_CMD=("${QR[@]}" delete "$NAME" "${WHERE[@]}" --force --quiet)
  else
    STATE_CMD=("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)')
    DELETE_CMD=("${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet)
  fi
  if [[ $COMMAND != create && $COMMAND != up && $COMMAND != supervise ]]; then return 0; fi
  [[ -n $TYPE ]] || die "$COMMAND needs --type (e.g. v5p-64)"
  [[ $TYPE =~ ^v[0-9][a-z]*(litepod)?-[0-9]+$ ]] || die "--type '$TYPE' is not an accelerator type like v5p-64"
  if [[ -z $VERSION ]]; then default_version "$TYPE"; fi
  if ((QUEUED)); then
    local qr=("${QR[@]}")
    if [[ $CAPACITY == best-effort ]]; then qr=(gcloud alpha compute tpus queued-resources); fi # alpha-only flag
    CREATE_CMD=("${qr[@]}" create "$NAME" "${WHERE[@]}" --node-id="$NAME" --accelerator-type="$TYPE"
      --runtime-version="$VERSION")
  else
    CREATE_CMD=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" --version="$VERSION")
  fi
  if [[ -n $CAPACITY ]]; then CREATE_CMD+=(--"$CAPACITY"); fi
}

# slice_state: the queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, ...) or the TPU VM's
# (READY, PREEMPTED, ...); empty when it does not exist or cannot be read.
slice_state() {
  "${STATE_CMD[@]}" 2>/dev/null || true
}

# lost_slice STATE: the slice's machines are gone for good (preempted, suspended, failed): delete and recreate it.
lost_slice() {
  case "$1" in
    SUSPENDING | SUSPENDED | FAILED | PREEMPTED | TERMINATED) return 0 ;;
    *) return 1 ;;
  esac
}

# preempted STATE: a run on the slice cannot continue (lost, being deleted, or stopped).
preempted() {
  lost_slice "$1" || [[ $1 == DELETING || $1 == STOPPING || $1 == STOPPED ]]
}

# wait_ready: poll until the slice can run (queued: ACTIVE; TPU VM: READY); fails when it is preempted or failed,
# or stays invisible for 10 polls.
wait_ready() {
  local state last="" invisible=0
  while :; do
    state=$(slice_state)
    if [[ $state == ACTIVE || $state == READY ]]; then return 0; fi
    if preempted "$state"; then
      echo "$NAME is $state" >&2
      return 1
    fi
    if [[ -z $state ]]; then invisible=$((invisible + 1)); else invisible=0; fi
    if ((invisible >= 10)); then
      echo "$NAME is not visible (gcloud describe fails) after 10 polls" >&2
      return 1
    fi
    if [[ $state != "$last" ]]; then echo "$NAME: ${state:-not visible yet}; waiting (every ${POLL}s)"; fi
    last=$state
    sleep "$POLL"
  done
}

CREATED=0
# ensure_slice: reuse the slice when it is usable, recreate it when it was preempted, create it when it is missing;
# then wait until it is ready. Sets CREATED=1 when the slice is new (it needs `setup`).
ensure_slice() {
  CREATED=0
  if ((DRY_RUN)); then
    echo "# reuse the slice when this succeeds (delete it first when it is preempted/suspended/failed):"
    run "${STATE_CMD[@]}"
    echo "# otherwise:"
    run "${CREATE_CMD[@]}"
    if ((QUEUED)); then echo "# then poll the state every ${POLL}s until ACTIVE"; fi
    return 0
  fi
  local state
  state=$(slice_state)
  if [[ $state == DELETING ]]; then
    echo "$NAME is being deleted; waiting"
    while [[ $(slice_state) == DELETING ]]; do sleep "$POLL"; done
    state=$(slice_state)
  fi
  if [[ $state == STOPPING || $state == STOPPED ]]; then
    fail "$NAME is $state (stopped by someone): start it (gcloud compute tpus tpu-vm start) or delete it, then rerun"
  fi
  if [[ -n $state ]] && lost_slice "$state"; then
    echo "$NAME is $state: deleting it and creating it again"
    run "${DELETE_CMD[@]}" || return 1
    state=""
  fi
  if [[ -z $state ]]; then
    run "${CREATE_CMD[@]}" || return 1
    CREATED=1
  else
    echo "reusing $NAME (state $state)"
  fi
  wait_ready
}

# ---------------------------------------------------------------------------------------------------------
# Commands

do_create() {
  ensure_slice || fail "$NAME did not become ready; see 'gcloud compute tpus' for why, then create again"
}

# source_list FILE: the checkout's files, NUL-separated, into FILE: `git ls-files` (tracked + untracked-but-not-
# ignored, minus files deleted from the work tree) in a git checkout, its top-level entries otherwise.
source_list() {
  if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    local f
    local ls=(git -C "$SRC" ls-files -z --cached --others --exclude-standard)
    printf '+ %s > %s  # minus deleted files\n' "$(show "${ls[@]}")" "$(quote "$1")"
    if ((DRY_RUN)); then return 0; fi
    "${ls[@]}" | while IFS= read -r -d '' f; do
      if [[ -e $SRC/$f || -L $SRC/$f ]]; then printf '%s\0' "$f"; fi
    done >"$1"
  else
    printf '+ %s > %s\n' "$(show find "$SRC" -mindepth 1 -maxdepth 1 -printf '%P\0')" "$(quote "$1")"
    if ((DRY_RUN)); then return 0; fi
    find "$SRC" -mindepth 1 -maxdepth 1 -printf '%P\0' >"$1"
  fi
}

do_setup() {
  local tarball="${TMPDIR:-/tmp}/llava_jax.$$.tar.gz" list="${TMPDIR:-/tmp}/llava_jax.$$.files" e
  local excludes=(--anchored)
  for e in "${EXCLUDE_TOP[@]}"; do excludes+=(--exclude="$e"); done
  excludes+=(--no-anchored)
  for e in "${EXCLUDE_ANY[@]}"; do excludes+=(--exclude="$e"); done
  source_list "$list"
  run tar -czf "$tarball" -C "$SRC" "${excludes[@]}" --null --files-from="$list"
  if ((!DRY_RUN)); then echo "archive: $(du -h "$tarball" | cut -f1), $(tar -tzf "$tarball" | wc -l) entries"; fi
  run "${GCLOUD[@]}" scp "$tarball" "$NAME":llava_jax.tar.gz "${WHERE[@]}" --worker=all
  if ((!DRY_RUN)); then rm -f "$tarball" "$list"; fi
  local install="$WORKER_SH install"
  if [[ -n $WORKER_PYTHON ]]; then install+=" --python $(printf '%q' "$WORKER_PYTHON")"; fi
  # A fresh copy (files deleted from the checkout go away too), then the interpreter check and the install.
  ssh_all all "set -e; rm -rf ~/llava_jax.new && mkdir ~/llava_jax.new \
&& tar -xzf ~/llava_jax.tar.gz -C ~/llava_jax.new && rm -rf ~/llava_jax && mv ~/llava_jax.new ~/llava_jax \
&& rm ~/llava_jax.tar.gz && $install"
}

NUM_WORKERS=0
COORD=""
# read_workers: COORD (worker 0's internal address) and NUM_WORKERS from the slice's network endpoints.
read_workers() {
  if ((DRY_RUN)); then
    run "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(networkEndpoints[].ipAddress)'
    COORD='WORKER0_IP'
    NUM_WORKERS='NUM_WORKERS'
    return 0
  fi
  local ips ips_array
  ips=$("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(networkEndpoints[].ipAddress)') || return 1
  ips=${ips//;/ }
  read -r -a ips_array <<<"$ips"
  ((${#ips_array[@]})) || return 1
  COORD=${ips_array[0]}
  NUM_WORKERS=${#ips_array[@]}
}

# start_run: start llava_jax.main on every worker in the background (launch/tpu_worker.sh start), output to LOG.
start_run() {
  local env_part="" e args_part remote
  for e in "${ENVS[@]}"; do env_part+="$(printf '%q' "$e") "; done
  args_part=$(printf '%q ' "${MAIN_ARGS[@]}")
  # The worker's index comes from the TPU VM metadata server, so one command serves every worker.
  remote="cd ~/llava_jax && ID=\$(curl -s -H Metadata-Flavor:Google \
http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number) && \
$WORKER_SH start ${RUN_STATE} -- env ${env_part}~/venv/bin/python -m llava_jax.main \
--coordinator_address=${COORD}:${PORT} --num_processes=${NUM_WORKERS} --process_id=\$ID ${args_part% }"
  ssh_all all "$remote"
}

do_run() {
  ((${#MAIN_ARGS[@]})) || die "$COMMAND needs the arguments of llava_jax.main after '--'," \
    "e.g. -- --config=configs/v15_stage2.py:7b"
  read_workers || fail "could not read the workers' addresses of $NAME"
  start_run
  if ((FOLLOW)); then ssh_all 0 "tail -n +1 -F ${LOG}"; fi
}

do_logs() {
  ssh_all "$WORKER" "tail -n 200 -F ${LOG}"
}

do_stop() {
  ssh_all all "if [ -f ${PID} ]; then kill -TERM \$(cat ${PID}) 2>/dev/null && echo \"\$(hostname): sent SIGTERM\" || \
echo \"\$(hostname): not running\"; else echo \"\$(hostname): no run\"; fi"
}

do_delete() {
  run "${DELETE_CMD[@]}"
}

# shellcheck source=tpu_supervise.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/tpu_supervise.sh" # do_supervise

plan_slice
case "$COMMAND" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  supervise) do_supervise ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  up)
    ((${#MAIN_ARGS[@]})) || die "up needs the arguments of llava_jax.main after '--'"
    do_create
    do_setup
    do_run
    ;;
esac
