#!/usr/bin/env bash
# Every image in a folder, one subfolder per image; safe to re-run (finished images are
# skipped, interrupted ones resume). A thin wrapper over kfjax.main --images.
#
#   launch/batch.sh IMAGES_DIR OUT_DIR [extra kfjax.main flags, e.g. --scale 4 --config paper]
set -euo pipefail
in_dir=${1:?usage: launch/batch.sh IMAGES_DIR OUT_DIR [flags...]}
out_dir=${2:?usage: launch/batch.sh IMAGES_DIR OUT_DIR [flags...]}
shift 2
exec python -m kfjax.main --images "$in_dir" --workdir "$out_dir" "$@"
