#!/usr/bin/env bash
# Issue 20, sixth round (down_proj not recomputed, one-launch NF4 dequantization), as run: issue20-compile.sh
# with the final plans, our rows with expandable segments, the NF4 kernel's and the compiled 4-bit layers'
# GPU tests on GPU 1.
PLAN0=final PLAN1=final-eager TAG0=-final TAG1=-final-eager EXPANDABLE=1 TEST_TIMEOUT=110 \
  TESTS="tests/test_nf4_dequant.py tests/test_layer_compile.py::test_compiled_qlora_layers_on_a_gpu" \
  exec bash bench/gpu/issue20-compile.sh
