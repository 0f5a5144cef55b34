#!/usr/bin/env bash
# Train on a Cloud TPU VM pod: create (or reuse) the TPU, set up every worker,
# run the same command on all of them, checkpoint to a gs:// workdir, and
# relaunch after preemption (the run resumes from its latest checkpoint).
#
#   TPU_NAME=jsae-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 \
#   WORKDIR=gs://my-bucket/jsae/gemma2_9b_l20 \
#   CONFIG=configs/default.py \
#   launch/tpu_pod.sh --config.data.shards_dir=/mnt/acts/l20 --config.mesh.model=8
#
# Activation shards are memory-mapped: keep them on local disk or a gcsfuse
# mount; the workdir (checkpoints, metrics) may be a gs:// path.
#
# Extra arguments go to `jsae $JSAE_COMMAND` (default train; JSAE_COMMAND=harvest
# harvests on every worker into one dataset). Hyperparameters live in configs, not here.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME (the TPU VM name)}"
: "${ZONE:?set ZONE (e.g. us-central2-b)}"
: "${WORKDIR:?set WORKDIR (a gs:// path shared by all workers)}"
: "${CONFIG:?set CONFIG (e.g. configs/default.py)}"
: "${ACCELERATOR:=v4-32}"
: "${RUNTIME:=tpu-ubuntu2204-base}"
: "${REPO_URL:=$(git config --get remote.origin.url || echo "")}"
: "${REPO_REF:=$(git rev-parse HEAD)}"
: "${MAX_RESTARTS:=20}"
: "${SPOT:=0}"
: "${JSAE_COMMAND:=train}"

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }

ensure_tpu() {
  local state
  state=$(tpu describe "$TPU_NAME" --format='value(state)' 2>/dev/null || echo MISSING)
  case "$state" in
    READY) return 0 ;;
    MISSING) ;;
    *) echo "TPU $TPU_NAME is $state; deleting it to recreate"; tpu delete "$TPU_NAME" --quiet ;;
  esac
  local spot_flag=()
  [[ "$SPOT" == 1 ]] && spot_flag=(--spot)
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${spot_flag[@]}"
}

setup_workers() {
  # Idempotent: clones or updates the repo and installs jsae with the TPU extra.
  tpu ssh "$TPU_NAME" --worker=all --command="set -e
    if [ ! -d jsae ]; then git clone '$REPO_URL' jsae; fi
    cd jsae && git fetch -q origin && git checkout -q '$REPO_REF'
    python3 -m venv ~/jsae-venv && ~/jsae-venv/bin/pip install -q -U pip
    ~/jsae-venv/bin/pip install -q -e '.[tpu]' gcsfs"
}

run_training() {
  # JSAE_DISTRIBUTED=auto: jax.distributed.initialize() detects the pod itself.
  tpu ssh "$TPU_NAME" --worker=all --command="cd jsae && JSAE_DISTRIBUTED=auto \
    ~/jsae-venv/bin/jsae $JSAE_COMMAND --config='$CONFIG' --workdir='$WORKDIR' $*"
}

for (( attempt = 0; attempt <= MAX_RESTARTS; attempt++ )); do
  ensure_tpu
  setup_workers
  if run_training "$@"; then
    echo "jsae $JSAE_COMMAND finished: $WORKDIR"
    exit 0
  fi
  echo "run ended early (preemption or failure), attempt $attempt; relaunching to resume" >&2
  sleep 30
done
echo "gave up after $MAX_RESTARTS restarts" >&2
exit 1
