#!/usr/bin/env bash
# Issue 20, fifth round (down_proj not recomputed; memory and idle traces), as run: issue20-compile.sh with
# the skip plans, and the skipped recomputation's tests on GPU 1 too.
PLAN0=skip PLAN1=skip-eager TAG0=-skip TAG1=-skip-eager \
  TESTS="tests/test_skip_down_proj.py tests/test_layer_compile.py tests/test_offload.py" \
  exec bash bench/gpu/issue20-compile.sh
