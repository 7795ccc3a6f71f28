#!/usr/bin/env bash
# The prepared GPU check (issue 17): the device tests and the speed figures in one run that ends inside nine
# minutes, each step time-boxed, a failed step never stopping the rest.
#
#   make gpu-wheels                                      # here, once: the packages the GPU machine lacks
#   OUT=out bash bench/gpu_check.sh                      # there: DEVICE=cuda, full-size models (run with .gpu-wheels)
#   GPU_CHECK_DRY=1 OUT=/tmp/x bash bench/gpu_check.sh   # the same steps on the CPU, tiny models and sizes (CI)
#
# Steps: 0. install: the wheels of .gpu-wheels into a scratch folder put first on PYTHONPATH (the real run; the dry
# run uses the `python` it is given, unless GPU_CHECK_WHEELS names wheels to rehearse the install with), then a
# preflight of every requirement; 1. `pytest -m device` (tests/test_device.py) on DEVICE; 2. bench/gpu.py: s/image,
# steps/s and peak memory per speed option and batch on SD 1.5 at 512 (SDPA, channels_last, fuse_qkv); 3.
# bench/throughput.py through the real server, 1, 4 and 16 clients, MAX_BATCH 1 and 4; 4. bench/coldstart.py, baked
# weights to the first image, beside the raw read of the same bytes. Then the rest of step 2, most wanted first:
# SDXL at 1024, xformers against SDPA on both (xformers is on the path of that step alone), torch.compile on SD 1.5,
# and SD3.5 Medium and FLUX.1-schnell at 1024 (their builds write 7 and 25 GB: last, so they cannot crowd out the
# rest); last, the memory options on SD 1.5 (QUANTIZE, LAYERWISE_CASTING, GROUP_OFFLOAD, ENABLE_MODEL_CPU_OFFLOAD).
# GPU_CHECK_STEPS="steps_sd35 steps_flux" runs only the steps named (a second run, for what a first skipped).
#
# Every step's output goes to $GPU_CHECK_WORK/logs (default: a folder in the temp dir; the built models are
# kept in $GPU_CHECK_WORK/models for a second run). $OUT receives three files, as the GPU machine sends back only a
# few: gpu_check.json (sections install, cuda_tests, steps, throughput, cold_start, with the machine and this
# command), gpu_check.md (the tables) and gpu_check_logs.tar.gz (every step's log and raw JSON).
#
# The whole check keeps to GPU_CHECK_BUDGET seconds (500, and the report after): each step is cut at its own limit
# or at the time left, whichever comes first, and a step with under 15 s left is recorded as skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/sdworker-gpu-check}
CACHE=${GPU_CHECK_CACHE:-$WORK/models}
LOGS=$WORK/logs
BUDGET=${GPU_CHECK_BUDGET:-500}
ONLY=${GPU_CHECK_STEPS:-}
DEADLINE=$(($(date +%s) + BUDGET))
if [ "$DRY" = 1 ]; then
  export DEVICE=cpu
  WHEELS=${GPU_CHECK_WHEELS:-}
else
  export DEVICE=cuda
  WHEELS=${GPU_CHECK_WHEELS:-.gpu-wheels}
fi
export GPU_CHECK_COMMAND="${GPU_CHECK_COMMAND:-GPU_CHECK_DRY=$DRY OUT=$OUT bash bench/gpu_check.sh}"
mkdir -p "$OUT" "$CACHE"
rm -rf "$LOGS" && mkdir -p "$LOGS"
: > "$LOGS/steps.jsonl"

step() {  # step NAME SECONDS COMMAND...: run it time-boxed, log it, record its status and time
  local name=$1 limit=$2 started rc left
  shift 2
  if [ -n "$ONLY" ] && [ "$name" != install ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped, ${left} s left of the ${BUDGET} s budget"
    echo "{\"step\": \"$name\", \"rc\": null, \"skipped\": \"${left} s left of the ${BUDGET} s budget\"}" >> "$LOGS/steps.jsonl"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  started=$(date +%s)
  echo "== $name (at most ${limit} s): $*"
  timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - started)), \"limit_s\": $limit}" >> "$LOGS/steps.jsonl"
  echo "   rc $rc in $(($(date +%s) - started)) s"
}

drop() {  # drop NAME: a built model and whatever a cut build or bake left of it (the disk is not large)
  rm -rf "${CACHE:?}/$1" "$CACHE/.build-$1-"* "$CACHE/.$1."*
}

# The memory options' rows (issue 26): what each saves in peak GiB and costs in s/image, against the baseline.
MEMORY="quantize_int8 layerwise_fp8 group_offload_block group_offload_leaf cpu_offload"
XFORMERS_PATH=${PYTHONPATH:-}
if [ -n "$WHEELS" ]; then
  step install 60 "$PY" bench/gpu_wheels.py install --dest "$WHEELS" --target "$WORK/site" --apart "$WORK/apart"
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  XFORMERS_PATH="$WORK/apart/xformers:$PYTHONPATH"
  # xformers' kernels load the CUDA 12 runtime library, kept off PYTHONPATH (its `nvidia` package would hide torch's)
  export LD_LIBRARY_PATH="$WORK/apart/cuda12/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

if [ "$DRY" = 1 ]; then
  # The tiny recipes stand in for the full-size models: baked as download.py bakes (unless GPU_CHECK_CACHE holds
  # them already), read by the same loader.
  for recipe in tiny-sd tiny-sd3 tiny-flux-schnell; do
    MODEL_ID=$recipe "$PY" download.py --model-dir "$CACHE/$recipe" >> "$LOGS/bake.log" 2>&1 || echo "   bake failed"
  done
  step cuda_tests 240 "$PY" -m pytest -q -p no:cacheprovider -m device tests/test_device.py \
    --junitxml "$LOGS/cuda_tests.xml"
  step steps 240 "$PY" bench/gpu.py --smoke --model-dir "sd15=$CACHE/tiny-sd" --out "$LOGS/steps.json"
  step throughput 240 "$PY" bench/throughput.py --model-dir "$CACHE/tiny-sd" --clients 1 2 --batch 1 2 --calls 4 \
    --rounds 1 --size 64 --steps 2 --out "$LOGS/throughput.json"
  step cold_start 240 "$PY" bench/coldstart.py --model-dir "$CACHE/tiny-sd" --runs 1 --no-warm-up --size 64 \
    --steps 2 --no-server --out "$LOGS/cold_start.json"
  step steps_sd35 240 "$PY" bench/gpu.py --smoke --models sd35m --options baseline \
    --model-dir "sd35m=$CACHE/tiny-sd3" --out "$LOGS/steps_sd35.json"
  step steps_flux 240 "$PY" bench/gpu.py --smoke --models flux --options baseline \
    --model-dir "flux=$CACHE/tiny-flux-schnell" --out "$LOGS/steps_flux.json"
  step steps_memory 240 "$PY" bench/gpu.py --smoke --options baseline $MEMORY --model-dir "sd15=$CACHE/tiny-sd" \
    --out "$LOGS/steps_memory.json"
else
  step cuda_tests 60 "$PY" -m pytest -q -p no:cacheprovider -m device tests/test_device.py \
    --junitxml "$LOGS/cuda_tests.xml"
  step steps 90 "$PY" bench/gpu.py --models sd15 --options baseline channels_last fuse_qkv \
    --batch 1 4 --runs 2 --steps 20 --cache "$CACHE" --out "$LOGS/steps.json"
  step throughput 80 "$PY" bench/throughput.py --model-dir "$CACHE/sd15" --clients 1 4 16 --batch 1 4 --calls 16 \
    --rounds 1 --size 512 --steps 20 --out "$LOGS/throughput.json"
  step cold_start 75 "$PY" bench/coldstart.py --model-dir "$CACHE/sd15" --runs 1 --size 512 --steps 20 --no-server \
    --out "$LOGS/cold_start.json"
  step steps_sdxl 120 "$PY" bench/gpu.py --models sdxl --options baseline fuse_qkv \
    --batch 1 4 --runs 2 --steps 20 --cache "$CACHE" --out "$LOGS/steps_sdxl.json"
  step steps_xformers 70 env PYTHONPATH="$XFORMERS_PATH" "$PY" bench/gpu.py --models sd15 sdxl --options xformers \
    --batch 1 4 --runs 2 --steps 20 --cache "$CACHE" --out "$LOGS/steps_xformers.json"
  drop sdxl
  step steps_compile 90 "$PY" bench/gpu.py --models sd15 --options torch_compile \
    --batch 1 --runs 2 --steps 20 --cache "$CACHE" --out "$LOGS/steps_compile.json"
  step steps_sd35 75 "$PY" bench/gpu.py --models sd35m --options baseline --batch 1 4 --runs 2 --steps 20 \
    --cache "$CACHE" --drop-after --out "$LOGS/steps_sd35.json"
  drop sd35m
  step steps_flux 110 "$PY" bench/gpu.py --models flux --options baseline --batch 1 4 --runs 2 --steps 4 \
    --cache "$CACHE" --drop-after --out "$LOGS/steps_flux.json"
  drop flux
  step steps_memory 90 "$PY" bench/gpu.py --models sd15 --options baseline $MEMORY --batch 1 --runs 2 --steps 20 \
    --cache "$CACHE" --out "$LOGS/steps_memory.json"
fi
"$PY" bench/gpu_report.py "$LOGS"
cp "$LOGS/gpu_check.json" "$LOGS/gpu_check.md" "$OUT/"
tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$LOGS" .
echo "wrote $OUT/gpu_check.json, gpu_check.md and gpu_check_logs.tar.gz"
