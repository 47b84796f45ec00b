#!/usr/bin/env bash
# The accelerator measurements issue 4 asks for, as one prepared run that fits a short GPU
# lease (this workplace lends 15 minutes of device time per task, one command ≤ 10 min).
#
#   bash launch/device_check.sh            # on the GPU machine, from the repository root
#   DRY=1 bash launch/device_check.sh      # rehearsal anywhere: smoke preset, tiny sizes
#
# Writes 8 files to $OUT (default: device_out/; the device tool brings back 8 at most):
# log.txt and one JSON / CSV per step, so what finished comes back even when a later step
# runs out of time. Every step has its own time limit; the order is by importance:
#   1. `paper` preset, XLA's convolution gradients (the accelerator default), PyTorch on
#      the same GPU: Phase 1 step and Phase 2 iteration
#   2. the whole reverse process of one image, and the per-image estimate
#   3. Phase 1 and 2 with kfjax's custom convolution VJP (KFJAX_CONV_BACKWARD=custom)
#   4. bf16 mixed precision (speed)
#   5. Phase 2 against HR size (512², 1024²; whole-image PD: memory is no concern there)
#   6. images vmapped through Phase 2 together
#   7. bf16 against float32 SR PSNR, `mini` suite at ×2, `cpu` preset
# A step never runs past the whole run's budget (BUDGET seconds, default 570) and is skipped
# when less than 30 s of it are left.
#
# STEPS=4567 runs only those steps (numbers above; default all): steps 1-3 have been
# measured on an H200 (BENCHMARKS.md, "On an NVIDIA H200"), and a first run's compiles
# take most of a short step's limit, so a later lease can spend its time on the others.
#
# The GPU image has JAX, Flax, Optax, Orbax and PyTorch but not ml_collections or
# imagecodecs (kfjax.io imports it); carry their wheels. Once, here, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ml_collections==1.1.0
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl "imagecodecs>=2024.6.1"
# then on the device tool: run(command="bash launch/device_check.sh", carry=[".whl"], timeout_s=600).
set -uo pipefail
py=${PYTHON:-python3}
out=$(realpath -m "${OUT:-device_out}")
mkdir -p "$out"
log="$out/log.txt"
# kfjax installed (offline, no dependencies) with the carried wheels into a private folder:
# the presets are the package kfjax.configs only once installed. Then run from elsewhere,
# so that the checkout's kfjax/ does not shadow the installed one.
site=/tmp/kfjax_site
rm -rf "$site"
$py -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" \
  . $(compgen -G ".whl/*.whl") >>"$log" 2>&1 || echo "installing kfjax failed" >>"$log"
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
cd /tmp || exit 1
# Every step uses JAX's persistent compilation cache: the mini cases after the first skip
# compiling, and a re-run on the same (warm) machine skips the compiles (its reported
# compile times are then cache loads; the first run's are real).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/kfjax_jax_cache}

budget=${BUDGET:-570}
if [[ -n ${DRY:-} ]]; then
  preset=smoke; tp="--steps 2 --iters 2 --repeats 1 --hr_size 24 --peak_size 128"
  sizes="--sizes 24,48 --pd_tile 0"; images="--images 1,2"
  mini="--suite tiny --config smoke"; limit=(60 60 60 60 90 90 120)
else
  preset=paper; tp="--steps 20 --iters 10 --repeats 3 --hr_size 256"
  sizes="--sizes 512,1024 --pd_tile 0"; images="--images 1,4"
  mini="--suite mini --scales 2 --config cpu"; limit=(150 150 70 70 70 70 200)
fi

steps=${STEPS:-1234567}
n=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its exit status
  local name=$1 secs=$2; shift 2
  n=$((n + 1))
  if [[ $steps != *$n* ]]; then echo "== $name: not in STEPS=$steps" >>"$log"; return; fi
  local left=$((budget - SECONDS - 5))
  (( secs > left )) && secs=$left
  if (( secs < 30 )); then echo "== $name: skipped, ${left}s of the budget left" >>"$log"; return; fi
  echo "== $name ($(date -u +%H:%M:%S), limit ${secs}s): $*" >>"$log"
  local t0=$SECONDS
  timeout --kill-after=5 "$secs" "$@" 2>>"$log"
  echo "== $name: exit $? after $((SECONDS - t0)) s" >>"$log"
}

{
  date -u
  nvidia-smi -L 2>&1 || echo "no nvidia-smi"
  $py -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1
} >>"$log"

step paper_native "${limit[0]}" $py -m kfjax.bench.throughput --preset $preset $tp \
  --what phase1,phase2 --conv_backward native --json >"$out/throughput_native.json"
step reverse "${limit[1]}" $py -m kfjax.bench.throughput --preset $preset $tp --steps 5 \
  --iters 2 --repeats 1 --what phase1,phase2 --full_reverse --notorch --json >"$out/throughput_reverse.json"
step paper_custom "${limit[2]}" $py -m kfjax.bench.throughput --preset $preset $tp \
  --what phase1,phase2 --conv_backward custom --notorch --json >"$out/throughput_custom.json"
step paper_bf16 "${limit[3]}" $py -m kfjax.bench.throughput --preset $preset $tp \
  --what phase1,phase2 --precision bfloat16 --notorch --json >"$out/throughput_bf16.json"
step scaling "${limit[4]}" $py -m kfjax.bench.throughput --preset $preset $tp $sizes \
  --what scaling --notorch --json >"$out/throughput_scaling.json"
step images "${limit[5]}" $py -m kfjax.bench.throughput --preset $preset $tp $images \
  --what batch --notorch --json >"$out/throughput_images.json"
step mini_bf16 "${limit[6]}" $py -m kfjax.bench $mini --methods kernelfusion,kf_bf16 \
  --workdir "/tmp/kfjax_mini_$preset" --quiet
cp "/tmp/kfjax_mini_$preset/results.csv" "$out/mini_bf16.csv" 2>>"$log"
echo "done $(date -u)" >>"$log"
