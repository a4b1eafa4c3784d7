# shellcheck shell=bash
# Sourced by launch/tpu_pod.sh and launch/local_multiprocess.sh (not run on its own): usage errors, printing a
# command the way a shell would read it back, and the check that an option got its value.
# (launch/slurm_gpu.sbatch keeps its own copy: sbatch runs a spooled copy of the script, away from this file.)

LAUNCH_SCRIPT=${0##*/} # the sourcing script's name, for messages

# die MESSAGE...: a usage error (exit 2), pointing at --help.
die() {
  echo "$LAUNCH_SCRIPT: $*" >&2
  echo "run 'launch/$LAUNCH_SCRIPT --help' for usage" >&2
  exit 2
}

# quote WORD: WORD as a shell would read it back (single-quoted unless it is plainly safe).
quote() {
  local a=$1
  if [[ $a =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
    printf '%s' "$a"
  else
    printf "'%s'" "${a//\'/\'\\\'\'}"
  fi
}

# show WORD...: the quoted words on one line.
show() {
  local first=1 a
  for a in "$@"; do
    if ((first)); then first=0; else printf ' '; fi
    quote "$a"
  done
  printf '\n'
}

# need_value OPTION ARGS_LEFT NEXT_ARG: die unless OPTION is followed by a value (not another --option).
need_value() {
  if (($2 < 2)) || [[ $3 == --* ]]; then die "$1 needs a value"; fi
}
