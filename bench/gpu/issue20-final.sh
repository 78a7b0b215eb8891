#!/usr/bin/env bash
# Issue 20, sixth round (down_proj not recomputed, one-launch NF4 dequantization): one call on an nvidia-h200-x2
# (<= 570 s), from the repo root with the
# wheels carried (.whl: the project's GPU wheels; .dev/20/whl: Unsloth and its dependencies).
#   GPU 0: writes the 64-layer random checkpoint, then this project's compiled rows (PLAN=final).
#   GPU 1: the compiled-layer and offload tests on a GPU while the checkpoint is written, Unsloth's row
#          (mb 16, one profiled step), then the eager rows and the naive baseline (PLAN=final-eager).
# The two GPUs share the host's CPUs: torch.compile on one side competes with the other side's CPU-bound
# rows (the naive baseline above all): GPU 0 compiles with 8 of the host's 32 cores, and every row records
# when it ran, so that overlaps can be checked.
set -o pipefail
OUT=${OUT:-/tmp/out20}
mkdir -p "$OUT/20"
[ -e whl ] || ln -s .dev/20/whl whl  # bench/gpu20.sh takes Unsloth's wheels from ./whl
export HERE=. LAYERS=64 STEPS=3 CKPT_TIMEOUT=200 UNSLOTH_MB=16
( TORCHINDUCTOR_COMPILE_THREADS=8 GPU=0 PLAN=final UNSLOTH=0 TAG=-final EXPANDABLE=1 BUDGET=${BUDGET:-560} bash bench/gpu20.sh > "$OUT/20/gpu0.txt" 2>&1 ) &
A=$!
sleep 25  # the first process installs the wheels into the shared folders first
(
  # while GPU 0 writes the checkpoint: the GPU tests of the NF4 kernel and of the compiled 4-bit layers
  CUDA_VISIBLE_DEVICES=1 PYTHONPATH=/tmp/site20:$PWD/lib OMP_NUM_THREADS=4 HF_HUB_OFFLINE=1 timeout 110 \
    python3 -m pytest -q --tb=short -rf -p no:cacheprovider tests/test_nf4_dequant.py tests/test_layer_compile.py::test_compiled_qlora_layers_on_a_gpu > "$OUT/20/tests.txt" 2>&1
  echo "tests exit $?" >> "$OUT/20/tests.txt"
  GPU=1 WAIT_CKPT=1 UNSLOTH_PROFILE=1 PLAN=final-eager TAG=-final-eager EXPANDABLE=1 BUDGET=$((${BUDGET:-560} - SECONDS)) \
    bash bench/gpu20.sh > "$OUT/20/gpu1.txt" 2>&1
) &
B=$!
wait $A $B
tail -n 3 "$OUT/20/gpu0.txt" "$OUT/20/gpu1.txt"
