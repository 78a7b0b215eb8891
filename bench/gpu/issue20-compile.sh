#!/usr/bin/env bash
# Issue 20 on an nvidia-h200-x2, one call (<= 570 s), from the repo root with the wheels carried (.whl: the
# project's GPU wheels; .dev/20/whl: Unsloth and its dependencies). As run, the fourth round (compiled
# decoder layers; the defaults below); issue20-skip.sh and issue20-final.sh run the fifth and sixth with
# other variables:
#   GPU 0: writes the 64-layer random checkpoint, then this project's compiled rows (PLAN0).
#   GPU 1: GPU tests (TESTS, under TEST_TIMEOUT) while the checkpoint is written, Unsloth's row (mb 16, one
#          profiled step), then the eager rows and the naive baseline (PLAN1).
# TAG0/TAG1 name the result files; EXPANDABLE=1 runs our rows with the allocator's expandable segments.
# The two GPUs share the host's CPUs: torch.compile on one side competes with the other side's CPU-bound
# rows (the naive baseline above all): GPU 0 compiles with 8 of the host's 32 cores, and every row records
# when it ran, so that overlaps can be checked.
set -o pipefail
OUT=${OUT:-/tmp/out20}
mkdir -p "$OUT/20"
PLAN0=${PLAN0:-compile} PLAN1=${PLAN1:-compile-eager} TAG0=${TAG0:--compile} TAG1=${TAG1:--eager}
TESTS=${TESTS:-tests/test_layer_compile.py tests/test_offload.py} TEST_TIMEOUT=${TEST_TIMEOUT:-150}
[ -e whl ] || ln -s .dev/20/whl whl  # bench/gpu20.sh takes Unsloth's wheels from ./whl
export HERE=. LAYERS=64 STEPS=3 CKPT_TIMEOUT=200 UNSLOTH_MB=16 EXPANDABLE
( TORCHINDUCTOR_COMPILE_THREADS=8 GPU=0 PLAN=$PLAN0 UNSLOTH=0 TAG=$TAG0 BUDGET=${BUDGET:-560} bash bench/gpu20.sh > "$OUT/20/gpu0.txt" 2>&1 ) &
A=$!
sleep 25  # the first process installs the wheels into the shared folders first
(
  CUDA_VISIBLE_DEVICES=1 PYTHONPATH=/tmp/site20:$PWD/lib OMP_NUM_THREADS=4 HF_HUB_OFFLINE=1 timeout $TEST_TIMEOUT \
    python3 -m pytest -q --tb=short -rf -p no:cacheprovider $TESTS > "$OUT/20/tests.txt" 2>&1
  echo "tests exit $?" >> "$OUT/20/tests.txt"
  GPU=1 WAIT_CKPT=1 UNSLOTH_PROFILE=1 PLAN=$PLAN1 TAG=$TAG1 BUDGET=$((${BUDGET:-560} - SECONDS)) \
    bash bench/gpu20.sh > "$OUT/20/gpu1.txt" 2>&1
) &
B=$!
wait $A $B
tail -n 3 "$OUT/20/gpu0.txt" "$OUT/20/gpu1.txt"
