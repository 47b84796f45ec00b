#!/usr/bin/env bash
# SLURM: one kfjax task per GPU, all sharing one batch (jax.distributed detects the SLURM
# step by itself: coordinator, process count and index come from srun's environment).
#
#   sbatch launch/slurm.sh IMAGES_SPEC OUT_DIR [extra kfjax.main flags]
#
# Adjust the resource lines to the cluster. SLURM sends SIGTERM before a time limit or a
# preemption (--signal below): each task checkpoints and exits 143; resubmitting the same
# job finishes what is missing.
#SBATCH --job-name=kfjax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=kfjax-%j-%t.log
set -uo pipefail
spec=${1:?usage: sbatch launch/slurm.sh IMAGES_SPEC OUT_DIR [flags...]}
out=${2:?usage: sbatch launch/slurm.sh IMAGES_SPEC OUT_DIR [flags...]}
shift 2
srun --kill-on-bad-exit=0 python -m kfjax.main --images "$spec" --workdir "$out" \
  --distributed --quiet "$@"
