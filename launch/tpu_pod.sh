#!/usr/bin/env bash
# Cloud TPU pod: one kfjax process per TPU VM host, all sharing one batch
# (jax.distributed detects the pod by itself). IMAGES_SPEC and OUT_DIR must be paths every
# host sees (e.g. a gcsfuse mount or a shared filesystem).
#
#   launch/tpu_pod.sh TPU_NAME ZONE IMAGES_SPEC OUT_DIR [extra kfjax.main flags]
#
# Install first on every worker, e.g.:
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all \
#     --command 'pip install "jax[tpu]" -e ~/kfjax'   # a copy of this repository on each worker
set -euo pipefail
name=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE IMAGES_SPEC OUT_DIR [flags...]}
zone=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE IMAGES_SPEC OUT_DIR [flags...]}
spec=${3:?usage: launch/tpu_pod.sh TPU_NAME ZONE IMAGES_SPEC OUT_DIR [flags...]}
out=${4:?usage: launch/tpu_pod.sh TPU_NAME ZONE IMAGES_SPEC OUT_DIR [flags...]}
shift 4
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "python3 -m kfjax.main --images $(printf '%q' "$spec") --workdir $(printf '%q' "$out") --distributed --quiet$extra"
