#!/usr/bin/env bash
# Run kfjax on every image in a folder, one workdir per image; safe to re-run (finished
# phases are restored from each workdir's checkpoints).
#
#   launch/batch.sh IMAGES_DIR OUT_DIR [extra kfjax.main flags, e.g. --scale 4 --config paper]
#
# On a multi-GPU host, run one copy per GPU over disjoint folders with
# CUDA_VISIBLE_DEVICES=<i>. A failing image is reported and skipped. Images of one size
# compile once: every run shares kfjax.main's persistent compilation cache
# (~/.cache/kfjax/jax by default; --compile_cache DIR to choose).
set -uo pipefail
in_dir=${1:?usage: launch/batch.sh IMAGES_DIR OUT_DIR [flags...]}
out_dir=${2:?usage: launch/batch.sh IMAGES_DIR OUT_DIR [flags...]}
shift 2
failed=0
shopt -s nullglob nocaseglob
for img in "$in_dir"/*.{png,jpg,jpeg,tif,tiff}; do
  name=$(basename "${img%.*}")
  if [[ -f "$out_dir/$name/summary.json" && "$out_dir/$name/summary.json" -nt "$img" ]]; then
    echo "skip $name (done)"; continue
  fi
  if ! python -m kfjax.main --image "$img" --workdir "$out_dir/$name" --quiet "$@"; then
    echo "FAILED $name" >&2; failed=$((failed + 1))
  fi
done
echo "finished; $failed failed"
[[ $failed -eq 0 ]]
