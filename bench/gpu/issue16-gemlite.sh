#!/bin/bash
# Issue 16, third call on one H200 (GPU 0 of an x2 lease), <= 540 s: GemLite's int4 kernels (eval.int4_kernel:
# gemlite) in the graph decoder, with and without the step through torch.compile (eval.compile_decoder), 32B
# shape, random weights, 230 new tokens, 80 GiB cap. From the repo root:
# The GemLite layout was removed after this run (BENCHMARKS.md says why): to rerun it, check out 9500e04 and
# `git apply bench/results/2026-11-30-NVIDIA-H200-int4-gemlite.patch` first (the code as measured).
#   bash bench/gpu/issue16-gemlite.sh            (with $OUT set; the device call ran it as .dev/16/gpu.sh with
#                                                 lib/, jobs/, config/ copied into .dev/16 and the gemlite wheel
#                                                 built by `pip wheel --no-deps gemlite==0.6.0.post2`)
#   DRY=1 OUT=/tmp/o bash bench/gpu/issue16-gemlite.sh   (CPU rehearsal: --smoke, 8 tokens; gemlite -> dequant)
# Writes $OUT/16/{int4.json,int4-gemlite-configs.json,log.txt}; the JSON is rewritten after every row.
set -o pipefail
T0=$SECONDS
O=$OUT/16; mkdir -p "$O"
LOG=$O/log.txt
W=/tmp/b16; rm -rf $W; mkdir -p $W
ROWS=${ROWS:---graph-batches 1,128 --graph-drafts 3 --graph-compile both}
if [ -n "$DRY" ]; then
  PY=${PY:-/work/main/.venv/bin/python}; ROOT=$PWD
  ARGS="--smoke --new-tokens 8 --graph-batches 1,8 --graph-drafts 3 --graph-compile both --deadline-s 300"
  export PYTHONPATH=$ROOT/lib
else
  PY=python3; ROOT=$PWD/.dev/16
  [ -d "$ROOT/lib" ] || ROOT=$PWD
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site16 .whl/*.whl \
    .dev/16/whl/*.whl >> $LOG 2>&1
  echo "install exit $? after $((SECONDS-T0)) s" | tee -a $LOG
  ARGS="--new-tokens 230 $ROWS --deadline-s ${DEADLINE:-450}"
  export PYTHONPATH=/tmp/site16:$ROOT/lib CUDA_VISIBLE_DEVICES=${GPU:-0}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
$PY -c "import torch, triton, transformers, pydantic; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())" 2>&1 | tail -2 | tee -a $LOG
cd $ROOT
timeout -k 5 $(( ${BUDGET:-528} - (SECONDS - T0) )) $PY jobs/bench.py --parts int4 --batches "" --static-batches "" \
  --graph-kernels ${KERNELS:-gemlite} --kernel-floor $ARGS --out $W/int4.json 2>&1 \
  | grep --line-buffered -Ev "it/s\]|s/it\]|FutureWarning|UserWarning|warnings.warn" | tee -a $LOG
echo "bench exit $? after $((SECONDS-T0)) s" | tee -a $LOG
cp $W/int4.json $W/int4-gemlite-configs.json "$O"/ 2>/dev/null
$PY - "$O/int4.json" <<'PY' 2>&1 | tee -a $LOG
import json, sys
d = json.load(open(sys.argv[1]))
print("SUMMARY", d.get("gpu"), "int4 model GiB", d.get("int4_model_gib"), "seconds", d.get("seconds"))
for f in d.get("kernel_floor", []):
    print("floor", f["kernel"], f["ms_per_pass"], f.get("relative_error_vs_dequantized"))
print("drafts on the real answer", d.get("graph_drafts_real_answer"))
for r in d["generate"]:
    print(f"{r['model']:48s} b{r['batch_size']:<4} {r.get('status','')[:70]:12s} s/img {r.get('s_per_image')} ms/tok {r.get('ms_per_token_step')} passes {r.get('forward_passes')} ms/pass {r.get('ms_per_forward_pass')} prefill {r.get('prefill_s')} peak {r.get('peak_gib')} warm {r.get('warmup_s')} tok {r.get('first_tokens', [])[:12]}")
PY
