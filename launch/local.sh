#!/usr/bin/env bash
# Several JAX processes on this machine, each with its own fake CPU devices,
# forming one global mesh over localhost (gloo collectives). The tests use it to
# check multi-process training; it is also the quickest way to debug a pod
# launch without a pod.
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local.sh \
#       --config=configs/tiny.py --workdir=/tmp/jsae_mp --config.mesh.data=8
#   NUM_PROCESSES=2 launch/local.sh harvest --config=configs/demo.py --workdir=/tmp/acts
#
# The first argument may name the jsae command (train, harvest, sweep, ...;
# default train); the rest go to it. Environment:
#   NUM_PROCESSES (2), DEVICES_PER_PROCESS (4), PORT (random) of the coordinator,
#   LOG_DIR (./local_logs): each process logs to LOG_DIR/proc_i.log,
#   PYTHON: the interpreter that runs jsae (default: the active virtual
#     environment's python, else python3), e.g. PYTHON=.venv/bin/python.
# Exits non-zero if any process fails, printing the end of its log; one failing
# process stops the others within seconds (jsae.peers). Ctrl-C or SIGTERM stops
# every process: a harvest at once (its finished shards are kept), training after
# saving a checkpoint.
set -euo pipefail
: "${NUM_PROCESSES:=2}"
: "${DEVICES_PER_PROCESS:=4}"
: "${PORT:=$(( 20000 + RANDOM % 20000 ))}"
: "${LOG_DIR:=local_logs}"
: "${PYTHON:=${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}"
: "${PYTHON:=python3}"
mkdir -p "$LOG_DIR"
COMMAND=train
if [[ $# -gt 0 && "$1" != -* ]]; then COMMAND="$1"; shift; fi

pids=()
# Background processes of a script ignore Ctrl-C, so pass it (and SIGTERM) on.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for (( i = 0; i < NUM_PROCESSES; i++ )); do
  JSAE_COORDINATOR="127.0.0.1:$PORT" JSAE_NUM_PROCESSES="$NUM_PROCESSES" JSAE_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    "$PYTHON" -m jsae.cli "$COMMAND" "$@" >"$LOG_DIR/proc_$i.log" 2>&1 &
  pids+=($!)
done

status=0
for i in "${!pids[@]}"; do
  while true; do
    rc=0
    wait "${pids[$i]}" || rc=$?
    # A trapped signal ends `wait` early (rc > 128) while the process still runs.
    if (( rc > 128 )) && kill -0 "${pids[$i]}" 2>/dev/null; then continue; fi
    break
  done
  if (( rc != 0 )); then
    echo "process $i failed (exit $rc); last lines of $LOG_DIR/proc_$i.log:" >&2
    tail -n 20 "$LOG_DIR/proc_$i.log" >&2
    status=1
  fi
done
exit $status
