#!/bin/bash
# Issue 16, second call on one H200 (GPU 1 of an x2 lease; ran 2026-11-30), <= 540 s: the quantized model's inference paths
# side by side (32B shape, random weights, 230 new tokens, 80 GiB cap), from the repo root:
#   bash bench/gpu/issue16-second.sh  (with $OUT set and lib/, jobs/, config/ copied into .dev/16; the device
#                                      call ran this file as .dev/16/gpu2.sh)
#   DRY=1 OUT=/tmp/o bash bench/gpu/issue16-second.sh   (CPU rehearsal: --smoke, 8 tokens)
# What the first call (gpu.sh, 2026-11-30 02:45) left out or got wrong: plain HF NF4 batch 1 and 128, main's
# tinygemm batch 128 (generate) and compiled static batch 1, and the graph decoder on the tinygemm layout
# at batch 128 and its prefill (the first call hit dynamo's recompile limit: eager read-backs).
# Writes $OUT/16/{int4.json,int4.md,log.txt}; the JSON is rewritten after every row.
set -o pipefail
T0=$SECONDS
O=$OUT/16; mkdir -p "$O"
LOG=$O/log.txt
W=/tmp/b16; rm -rf $W; mkdir -p $W
if [ -n "$DRY" ]; then
  PY=${PY:-/work/main/.venv/bin/python}; ROOT=$PWD
  ARGS="--smoke --new-tokens 8 --graph-batches 1,8 --graph-drafts 3 --tinygemm-batches 8 --nf4-batches 1,8 --deadline-s 300"
  export PYTHONPATH=$ROOT/lib
else
  PY=python3; ROOT=$PWD/.dev/16
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site16 .whl/*.whl >> $LOG 2>&1
  echo "install exit $? after $((SECONDS-T0)) s" | tee -a $LOG
  ARGS="--new-tokens 230 --graph-batches 1,128 --graph-drafts 3 --tinygemm-batches 128 --nf4-batches 1,128 --deadline-s 420"
  export PYTHONPATH=/tmp/site16:$ROOT/lib CUDA_VISIBLE_DEVICES=1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
$PY -c "import torch, triton, transformers, bitsandbytes, pydantic; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'bnb', bitsandbytes.__version__, 'gpus', torch.cuda.device_count())" 2>&1 | tail -2 | tee -a $LOG
cd $ROOT
timeout -k 5 $(( 528 - (SECONDS - T0) )) $PY jobs/bench.py --parts int4 --batches "" --static-batches 1 \
  --graph-kernels tinygemm --static-last $ARGS --out $W/int4.json 2>&1 \
  | grep --line-buffered -Ev "it/s\]|s/it\]|FutureWarning|UserWarning|warnings.warn" | tee -a $LOG
echo "bench exit $? after $((SECONDS-T0)) s" | tee -a $LOG
cp $W/int4.json $W/int4.md "$O"/ 2>/dev/null
$PY - "$O/int4.json" <<'PY' 2>&1 | tee -a $LOG
import json, sys
d = json.load(open(sys.argv[1]))
print("SUMMARY", d.get("gpu"), "int4 model GiB", d.get("int4_model_gib"), "seconds", d.get("seconds"))
for f in d.get("kernel_floor", []):
    print("floor", f["kernel"], f["ms_per_pass"], f.get("relative_error_vs_dequantized"))
print("drafts on the real answer", d.get("graph_drafts_real_answer"))
for r in d["generate"]:
    print(f"{r['model']:42s} b{r['batch_size']:<4} {r.get('cache',''):8s} {r.get('status','')[:60]:12s} s/img {r.get('s_per_image')} ms/tok {r.get('ms_per_token_step')} passes {r.get('forward_passes')} ms/pass {r.get('ms_per_forward_pass')} prefill {r.get('prefill_s')} peak {r.get('peak_gib')} warm {r.get('warmup_s')}")
PY
