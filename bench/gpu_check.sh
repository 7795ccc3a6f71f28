#!/usr/bin/env bash
# The prepared GPU check (issue 17): the device tests and the speed figures in one run, each step time-boxed so
# the whole ends inside nine minutes, a failed step never stopping the rest.
#
#   OUT=results bash bench/gpu_check.sh                  # on the GPU machine: DEVICE=cuda, full-size models
#   GPU_CHECK_DRY=1 OUT=/tmp/x bash bench/gpu_check.sh   # the same steps on the CPU, tiny models and sizes (CI)
#
# Steps: 1. `pytest -m device` (tests/test_device.py) on DEVICE; 2. bench/gpu.py: steps/s, s/image, peak memory
# per speed option and batch, SD 1.5 at 512 and SDXL at 1024; 3. bench/throughput.py through the real server, 1, 4
# and 16 clients, MAX_BATCH 1 and 4; 4. bench/coldstart.py, baked weights to the first image. Then
# bench/gpu_report.py writes $OUT/gpu_check.json and $OUT/gpu_check.md. Each step's output is $OUT/<step>.log.
#
# Not yet (issue 17): `make gpu-wheels` (the packages the GPU machine lacks, brought as wheels and installed here
# into a scratch folder on PYTHONPATH); until then the real run needs them installed; xformers against SDPA; SD3.5
# Medium and FLUX.1-schnell sizes. The real run's time boxes are estimates: no GPU has run this script yet.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
PY=${PYTHON:-python}
DRY=${GPU_CHECK_DRY:-0}
CACHE=${GPU_CHECK_CACHE:-$OUT/models}
: > "$OUT/steps.jsonl"
if [ "$DRY" = 1 ]; then export DEVICE=cpu; else export DEVICE=cuda; fi
export GPU_CHECK_COMMAND="${GPU_CHECK_COMMAND:-GPU_CHECK_DRY=$DRY OUT=$OUT bash bench/gpu_check.sh}"

step() {  # step NAME SECONDS COMMAND...: run it time-boxed, log it, record its status and time
  local name=$1 limit=$2 started rc
  shift 2
  started=$(date +%s)
  echo "== $name (at most ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - started)), \"limit_s\": $limit}" >> "$OUT/steps.jsonl"
  echo "   rc $rc in $(($(date +%s) - started)) s"
}

if [ "$DRY" = 1 ]; then
  # tiny-sd stands in for the full-size models: baked as download.py bakes, read by the same loader.
  MODEL_ID=tiny-sd "$PY" download.py --model-dir "$CACHE/tiny-sd" > "$OUT/bake.log" 2>&1 || echo "   bake failed"
  step cuda_tests 240 "$PY" -m pytest -q -p no:cacheprovider -m device tests/test_device.py --junitxml "$OUT/cuda_tests.xml"
  step steps 240 "$PY" bench/gpu.py --smoke --model-dir "sd15=$CACHE/tiny-sd" --out "$OUT/steps.json"
  step throughput 240 "$PY" bench/throughput.py --model-dir "$CACHE/tiny-sd" --clients 1 2 --batch 1 2 --calls 4 \
    --rounds 1 --size 64 --steps 2 --out "$OUT/throughput.json"
  step cold_start 240 "$PY" bench/coldstart.py --model-dir "$CACHE/tiny-sd" --runs 1 --size 64 --steps 2 \
    --no-server --out "$OUT/cold_start.json"
else
  step cuda_tests 60 "$PY" -m pytest -q -p no:cacheprovider -m device tests/test_device.py --junitxml "$OUT/cuda_tests.xml"
  step steps 150 "$PY" bench/gpu.py --models sd15 --options baseline channels_last fuse_qkv torch_compile \
    --batch 1 4 --runs 2 --steps 20 --cache "$CACHE" --out "$OUT/steps.json"
  step steps_sdxl 150 "$PY" bench/gpu.py --models sdxl --options baseline fuse_qkv torch_compile \
    --batch 1 4 --runs 2 --steps 20 --cache "$CACHE" --out "$OUT/steps_sdxl.json"
  step throughput 90 "$PY" bench/throughput.py --model-dir "$CACHE/sd15" --clients 1 4 16 --batch 1 4 --calls 16 \
    --rounds 1 --size 512 --steps 20 --out "$OUT/throughput.json"
  step cold_start 60 "$PY" bench/coldstart.py --model-dir "$CACHE/sd15" --runs 2 --size 512 --steps 20 --no-server \
    --out "$OUT/cold_start.json"
fi
"$PY" bench/gpu_report.py "$OUT"
