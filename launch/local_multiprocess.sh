#!/usr/bin/env bash
# Several llava_jax processes on this machine, joined by jax.distributed on 127.0.0.1: the multi-host code path
# (per-host data, global arrays, orbax's multi-process checkpoints) without a cluster. Each process gets
# simulated CPU devices (default) or one GPU (--gpus). Logs go to LOG_DIR/process_<i>.log; process 0's log is
# streamed. Ctrl-C stops every process this script started.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local_multiprocess.sh [options] -- MAIN_ARGS...

options:
  -n, --num-processes N    processes (default 2)
  --devices-per-process D  simulated CPU devices per process (default 4)
  --gpus                   one GPU per process (CUDA_VISIBLE_DEVICES=i) instead of CPU devices
  --port P                 coordinator port on 127.0.0.1 (default 12355)
  --log-dir DIR            per-process logs (default: ./multiprocess_logs)
  --python PATH            interpreter (default: $PYTHON, else python3)
  --dry-run                print the commands, run nothing
  -h, --help               this text
MAIN_ARGS go to `python -m llava_jax.main` and must include --config.
example:
  launch/local_multiprocess.sh -n 2 -- --config=configs/tiny.py --workdir=/tmp/mp_tiny
EOF
}

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" # die, quote, show, need_value

NUM=2
DEVICES=4
GPUS=0
PORT=12355
LOG_DIR=multiprocess_logs
PYTHON_BIN=${PYTHON:-python3}
DRY_RUN=0
MAIN_ARGS=()
while (($#)); do
  case "$1" in
    -n | --num-processes) need_value "$1" $# "${2:-}"; NUM=$2; shift 2 ;;
    --devices-per-process) need_value "$1" $# "${2:-}"; DEVICES=$2; shift 2 ;;
    --gpus) GPUS=1; shift ;;
    --port) need_value "$1" $# "${2:-}"; PORT=$2; shift 2 ;;
    --log-dir) need_value "$1" $# "${2:-}"; LOG_DIR=$2; shift 2 ;;
    --python) need_value "$1" $# "${2:-}"; PYTHON_BIN=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (llava_jax.main's arguments go after '--')" ;;
  esac
done

[[ $NUM =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, got '$NUM'"
[[ $DEVICES =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer, got '$DEVICES'"
[[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
((${#MAIN_ARGS[@]})) || die "give llava_jax.main's arguments after '--', e.g. -- --config=configs/tiny.py"
has_config=0
for a in "${MAIN_ARGS[@]}"; do
  if [[ $a == --config=* || $a == --config ]]; then has_config=1; fi
done
((has_config)) || die "llava_jax.main needs --config=configs/<recipe>.py among the arguments after '--'"

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
}
trap 'cleanup; exit 130' INT TERM

if ((!DRY_RUN)); then mkdir -p "$LOG_DIR"; fi
for ((i = 0; i < NUM; i++)); do
  if ((GPUS)); then
    ENV=(CUDA_VISIBLE_DEVICES="$i")
  else
    ENV=(JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES")
  fi
  CMD=(env "${ENV[@]}" PYTHONUNBUFFERED=1 "$PYTHON_BIN" -m llava_jax.main
    --coordinator_address="127.0.0.1:$PORT" --num_processes="$NUM" --process_id="$i" "${MAIN_ARGS[@]}")
  printf '+ %s > %s\n' "$(show "${CMD[@]}")" "$(quote "$LOG_DIR/process_$i.log")"
  if ((!DRY_RUN)); then
    "${CMD[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
    PIDS+=($!)
  fi
done
if ((DRY_RUN)); then exit 0; fi

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  cleanup
  die "needs bash >= 5.1 (wait -n -p) to supervise the processes; this is $BASH_VERSION"
fi
tail -n +1 -F "$LOG_DIR/process_0.log" &
TAIL=$!
# Wait for the processes in the order they end; when one fails the others would wait for it forever: stop them.
status=0
left=("${PIDS[@]}")
while ((${#left[@]})); do
  done_pid=""
  if ! wait -n -p done_pid "${left[@]}"; then
    if ((status == 0)); then
      echo "local_multiprocess.sh: a process failed (pid $done_pid); stopping the others. Logs: $LOG_DIR/" >&2
      cleanup
    fi
    status=1
  fi
  rest=()
  for p in "${left[@]}"; do
    if [[ $p != "$done_pid" ]]; then rest+=("$p"); fi
  done
  left=("${rest[@]}")
done
kill "$TAIL" 2>/dev/null || true
wait "$TAIL" 2>/dev/null || true
exit "$status"
