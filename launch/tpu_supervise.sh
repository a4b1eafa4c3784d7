# shellcheck shell=bash
# Sourced by launch/tpu_pod.sh (not run on its own): the `supervise` command, which keeps a run going through
# preemptions and SIGTERM stops. llava_jax.main's exit-status contract: 0 done, 75 (EX_TEMPFAIL) saved a checkpoint
# and stopped -> run the same command again (it resumes from the checkpoint), anything else an error.
# Uses tpu_pod.sh's globals and functions (run, fail, ensure_slice, slice_state, preempted, do_setup, do_run, ...).

EX_TEMPFAIL=75

UNREADABLE_POLLS=30 # polls in a row without every worker's status (on a slice that is up) before giving up

# read_statuses: ask every worker for its run's status; sets RUNNING, SAVED, OTHER (the first status that is not
# 0/75), UNKNOWN (none/lost words) and TOTAL (answers). Fails when ssh fails.
RUNNING=0 SAVED=0 OTHER="" TOTAL=0
UNKNOWN=()
read_statuses() {
  local out line word
  out=$("${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$WORKER_SH status $RUN_STATE" 2>/dev/null) ||
    return 1
  RUNNING=0 SAVED=0 OTHER="" TOTAL=0 UNKNOWN=()
  while IFS= read -r line; do
    [[ $line == "llava_jax_status: "* ]] || continue
    word=${line#llava_jax_status: }
    TOTAL=$((TOTAL + 1))
    case "$word" in
      running) RUNNING=$((RUNNING + 1)) ;;
      0) ;;
      "$EX_TEMPFAIL") SAVED=$((SAVED + 1)) ;;
      none | lost) UNKNOWN+=("$word") ;;
      *) if [[ -z $OTHER ]]; then OTHER=$word; fi ;;
    esac
  done <<<"$out"
}

OUTCOME=""
# watch_run: poll until the run ends or the slice goes; sets OUTCOME to done, saved, preempted or error:STATUS.
watch_run() {
  local state unknown=0 unreadable=0
  while :; do
    sleep "$POLL"
    state=$(slice_state)
    if [[ -z $state ]] || preempted "$state"; then
      sleep "$POLL" # gone or unreadable: look once more before calling it preempted
      state=$(slice_state)
      if [[ -z $state ]] || preempted "$state"; then
        echo "$NAME is ${state:-gone}: preempted"
        OUTCOME=preempted
        return 0
      fi
    fi
    # ssh fails when the network blips or a worker goes down: the slice's state decides on the next poll.
    if ! read_statuses || ((TOTAL < NUM_WORKERS)); then
      unreadable=$((unreadable + 1))
      if ((unreadable < UNREADABLE_POLLS)); then continue; fi
      echo "could not read the run's status from every worker $UNREADABLE_POLLS times in a row while $NAME is" \
        "$state; see 'launch/tpu_pod.sh logs --worker all'" >&2
      OUTCOME=error:1
      return 0
    fi
    unreadable=0
    if ((RUNNING)); then continue; fi
    if ((${#UNKNOWN[@]})); then
      # 'none': not started yet; 'lost': ended without recording a status. Either should clear up within a poll.
      unknown=$((unknown + 1))
      if ((unknown < 3)); then continue; fi
      echo "the run's status is '${UNKNOWN[0]}' on ${#UNKNOWN[@]} worker(s) after 3 checks;" \
        "see the logs (launch/tpu_pod.sh logs --worker all)" >&2
      OUTCOME=error:1
    elif [[ -n $OTHER ]]; then
      OUTCOME=error:$OTHER
    elif ((SAVED)); then
      OUTCOME=saved
    else
      OUTCOME="done"
    fi
    return 0
  done
}

# step FUNCTION: run a step with `set -e` in force (a bare `if FUNCTION` would switch it off inside); when it fails,
# a preempted slice makes it worth another attempt (return 1), anything else ends supervise with its status.
step() {
  local rc=0 state
  set +e
  (
    set -e
    "$1"
  )
  rc=$?
  set -e
  if ((rc == 0)); then return 0; fi
  state=$(slice_state)
  if [[ -z $state ]] || preempted "$state"; then
    echo "$1 failed (status $rc) while $NAME is ${state:-gone}: trying again"
    return 1
  fi
  echo "$1 failed (status $rc) on a healthy slice ($state): not retrying" >&2
  exit "$rc"
}

do_supervise() {
  ((${#MAIN_ARGS[@]})) || die "supervise needs the arguments of llava_jax.main after '--'"
  # shellcheck disable=SC2034 # read by do_run (tpu_pod.sh)
  FOLLOW=0
  if ((DRY_RUN)); then
    ensure_slice
    do_setup
    do_run
    echo "# then every ${POLL}s until the run ends: the slice's state and every worker's run status:"
    run "${STATE_CMD[@]}"
    run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$WORKER_SH status $RUN_STATE"
    echo "# 0 on every worker: done (exit 0). $EX_TEMPFAIL (saved and stopped) or the slice preempted: run again" \
      "(setup first on a recreated slice), at most $MAX_ATTEMPTS runs, then exit $EX_TEMPFAIL." \
      "Any other status: stop with it."
    return 0
  fi
  local attempt need_setup=1 last="nothing ran"
  for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
    echo "== $LAUNCH_SCRIPT supervise: run $attempt of at most $MAX_ATTEMPTS"
    # ensure_slice sets CREATED: not in a subshell. It returns 1 when the slice failed or was preempted while waiting.
    if ! ensure_slice; then
      last="$NAME did not become ready"
      need_setup=1
      continue
    fi
    if ((CREATED)); then need_setup=1; fi
    local adopt=0
    if ((attempt == 1 && !CREATED)) && read_statuses && ((RUNNING)); then
      # supervise started again (the machine running it went away): watch the run that is going, set up as it is
      echo "a run is already going on $NAME: watching it instead of starting one"
      adopt=1
      need_setup=0
    fi
    if ((need_setup)); then
      step do_setup || { last="setup was interrupted"; continue; }
      need_setup=0
    fi
    read_workers || { last="could not read the workers' addresses"; continue; }
    if ((!adopt)); then step start_run || { last="the start was interrupted"; continue; }; fi
    echo "watching the run every ${POLL}s (its log: $LAUNCH_SCRIPT logs --name $NAME --zone $ZONE)"
    watch_run
    case "$OUTCOME" in
      done)
        echo "the run is done (exit status 0 on every worker)"
        return 0
        ;;
      saved)
        echo "the run saved a checkpoint and stopped (exit status $EX_TEMPFAIL): running it again"
        last="the last run saved and stopped"
        ;;
      preempted)
        echo "the slice was preempted: recreating it and running again (the run resumes from its checkpoint)"
        last="the slice was preempted"
        need_setup=1
        ;;
      error:*)
        echo "the run failed (exit status ${OUTCOME#error:}); not rerunning. Logs: launch/tpu_pod.sh logs" >&2
        exit "${OUTCOME#error:}"
        ;;
    esac
  done
  echo "gave up after $MAX_ATTEMPTS attempts ($last); the run is resumable: run this command again to go on" >&2
  exit "$EX_TEMPFAIL"
}
