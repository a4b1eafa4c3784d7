#!/usr/bin/env bash
# Cloud TPU pod launcher for llava_jax: create (or reuse) a TPU VM slice, put this project on every worker,
# run the same `python -m llava_jax.main ...` on all workers (one process per host, jax.distributed wired up),
# stream the logs, stop (SIGTERM: the training loop saves a checkpoint and exits), delete.
# Every gcloud command is printed before it runs; --dry-run prints them and runs nothing.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh COMMAND --name NAME --zone ZONE [options] [-- MAIN_ARGS...]

commands:
  create   create the slice, or reuse it when it exists      (needs --type; --version, --spot optional)
  setup    copy this checkout to every worker, make ~/venv, pip install it with jax[tpu]
  run      run `python -m llava_jax.main MAIN_ARGS` on every worker in the background, then follow worker 0's log
  logs     follow the run's log (--worker N, default 0; 'all' for every worker)
  stop     SIGTERM the run on every worker (the loop checkpoints and exits)
  delete   delete the slice
  up       create + setup + run

options:
  --name NAME        TPU VM name                         --zone ZONE        e.g. us-east5-a
  --project ID       GCP project (default: gcloud's)     --type TYPE        accelerator type, e.g. v5p-64, v4-32, v5litepod-256
  --version V        TPU software version (default by type: v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
                     v5e v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
  --spot             create a Spot slice                  --src DIR          checkout to copy (default: this repo)
  --env KEY=VALUE    exported on the workers for `run` (repeatable)
  --port P           jax.distributed coordinator port (default 8476)
  --worker W         `logs`: worker index or 'all' (default 0)
  --no-follow        `run`: return after starting
  --dry-run          print the commands, run nothing
  -h, --help         this text

examples:
  launch/tpu_pod.sh up --name llava --zone us-east5-a --type v5p-64 -- \
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

COMMAND=""
NAME=""
ZONE=""
PROJECT=""
TYPE=""
VERSION=""
SPOT=0
SRC=""
PORT=8476
WORKER=0
FOLLOW=1
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
  create | setup | run | logs | stop | delete | up) COMMAND=$1 ;;
  *) die "unknown command '$1'" ;;
esac
shift

while (($#)); do
  case "$1" in
    --name) need_value "$1" $# "${2:-}"; NAME=$2; shift 2 ;;
    --zone) need_value "$1" $# "${2:-}"; ZONE=$2; shift 2 ;;
    --project) need_value "$1" $# "${2:-}"; PROJECT=$2; shift 2 ;;
    --type) need_value "$1" $# "${2:-}"; TYPE=$2; shift 2 ;;
    --version) need_value "$1" $# "${2:-}"; VERSION=$2; shift 2 ;;
    --src) need_value "$1" $# "${2:-}"; SRC=$2; shift 2 ;;
    --port) need_value "$1" $# "${2:-}"; PORT=$2; shift 2 ;;
    --worker) need_value "$1" $# "${2:-}"; WORKER=$2; shift 2 ;;
    --env)
      need_value "$1" $# "${2:-}"
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$2'"
      ENVS+=("$2")
      shift 2
      ;;
    --spot) SPOT=1; shift ;;
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

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=${SRC:-$REPO}
LOG="\$HOME/llava_jax_run.log" # expanded on the workers
PID="\$HOME/llava_jax_run.pid"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then WHERE+=(--project="$PROJECT"); fi

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

do_create() {
  [[ -n $TYPE ]] || die "create needs --type (e.g. v5p-64)"
  [[ $TYPE =~ ^v[0-9][a-z]*(litepod)?-[0-9]+$ ]] || die "--type '$TYPE' is not an accelerator type like v5p-64"
  if [[ -z $VERSION ]]; then default_version "$TYPE"; fi
  local create=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" --version="$VERSION")
  if ((SPOT)); then create+=(--spot); fi
  if ((DRY_RUN)); then
    echo "# reuse the slice when this succeeds:"
    run "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)'
    echo "# otherwise:"
    run "${create[@]}"
    return 0
  fi
  local state
  if state=$("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null); then
    echo "reusing $NAME (state $state)"
  else
    run "${create[@]}"
  fi
}

do_setup() {
  [[ -d $SRC ]] || die "--src '$SRC' is not a directory"
  local tarball="${TMPDIR:-/tmp}/llava_jax.$$.tar.gz"
  run tar -czf "$tarball" -C "$SRC" --exclude=.git --exclude=workdir --exclude='*.egg-info' --exclude=__pycache__ .
  run "${GCLOUD[@]}" scp "$tarball" "$NAME":llava_jax.tar.gz "${WHERE[@]}" --worker=all
  ssh_all all 'set -e; mkdir -p ~/llava_jax && tar -xzf ~/llava_jax.tar.gz -C ~/llava_jax && python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip && ~/venv/bin/pip install -q -e ~/llava_jax "jax[tpu]"'
  if ((!DRY_RUN)); then rm -f "$tarball"; fi
}

do_run() {
  ((${#MAIN_ARGS[@]})) || die "run needs the arguments of llava_jax.main after '--', e.g. -- --config=configs/v15_stage2.py:7b"
  local coord workers
  if ((DRY_RUN)); then
    run "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(networkEndpoints[].ipAddress)'
    coord='WORKER0_IP'
    workers='NUM_WORKERS'
  else
    local ips
    ips=$("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(networkEndpoints[].ipAddress)')
    ips=${ips//;/ }
    read -r -a ips_array <<<"$ips"
    ((${#ips_array[@]})) || die "could not read the workers' addresses of $NAME"
    coord=${ips_array[0]}
    workers=${#ips_array[@]}
  fi
  local env_part="" e
  for e in "${ENVS[@]}"; do env_part+="$(printf '%q' "$e") "; done
  local args_part
  args_part=$(printf '%q ' "${MAIN_ARGS[@]}")
  # The worker's index comes from the TPU VM metadata server, so one command serves every worker.
  local remote
  remote="cd ~/llava_jax && ID=\$(curl -s -H Metadata-Flavor:Google \
http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number) && \
nohup env ${env_part}~/venv/bin/python -m llava_jax.main --coordinator_address=${coord}:${PORT} \
--num_processes=${workers} --process_id=\$ID ${args_part}> ${LOG} 2>&1 < /dev/null & echo \$! > ${PID}"
  ssh_all all "$remote"
  if ((FOLLOW)); then ssh_all 0 "tail -n +1 -F ${LOG}"; fi
}

do_logs() {
  ssh_all "$WORKER" "tail -n 200 -F ${LOG}"
}

do_stop() {
  ssh_all all "if [ -f ${PID} ]; then kill -TERM \$(cat ${PID}) 2>/dev/null && echo \"\$(hostname): sent SIGTERM\" || \
echo \"\$(hostname): not running\"; rm -f ${PID}; else echo \"\$(hostname): no run\"; fi"
}

do_delete() {
  run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

case "$COMMAND" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
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
