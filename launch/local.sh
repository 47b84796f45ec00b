#!/usr/bin/env bash
# N kfjax processes on this machine sharing one batch through jax.distributed (the
# coordinator on 127.0.0.1, a free port). Exit status: the worst of the processes'.
#
#   launch/local.sh N IMAGES_SPEC OUT_DIR [extra kfjax.main flags]
#
# Each process sees all of this machine's devices unless told otherwise: on a multi-GPU
# host give process i its GPU, e.g. KFJAX_DEVICES_PER_PROCESS=1 (CUDA_VISIBLE_DEVICES=i).
set -uo pipefail
n=${1:?usage: launch/local.sh N IMAGES_SPEC OUT_DIR [flags...]}
spec=${2:?usage: launch/local.sh N IMAGES_SPEC OUT_DIR [flags...]}
out=${3:?usage: launch/local.sh N IMAGES_SPEC OUT_DIR [flags...]}
shift 3
py=${PYTHON:-python}
port=$($py -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < n; i++)); do
  if [[ -n "${KFJAX_DEVICES_PER_PROCESS:-}" ]]; then
    first=$((i * KFJAX_DEVICES_PER_PROCESS))
    export CUDA_VISIBLE_DEVICES=$(seq -s, "$first" $((first + KFJAX_DEVICES_PER_PROCESS - 1)))
  fi
  $py -m kfjax.main --images "$spec" --workdir "$out" --coordinator_address "127.0.0.1:$port" \
    --num_processes "$n" --process_id "$i" "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do
  wait "$pid"; rc=$?
  (( rc > status )) && status=$rc
done
exit $status
