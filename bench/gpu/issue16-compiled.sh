#!/bin/bash
# Issue 16, fourth call on one H200 (GPU 0 of an x2 lease), <= 540 s: the graph decoder's step through
# torch.compile (eval.compile_decoder) beside the plain captured step, 32B shape, random weights, 230 new
# tokens, 80 GiB cap: batch 1 (+ 3 drafts) on the tinygemm layout, batch 128 on the triton layout (the
# two best layouts of the 2026-11-30 runs). From the repo root:
#   bash bench/gpu/issue16-compiled.sh        (with $OUT set; the device call ran it as .dev/16/gpu.sh with
#                                              lib/, jobs/, config/ copied into .dev/16)
#   DRY=1 OUT=/tmp/o bash bench/gpu/issue16-compiled.sh   (CPU rehearsal: --smoke, 8 tokens)
# Writes $OUT/16/{b1.json,b128.json,log.txt}; each JSON is rewritten after every row.
set -o pipefail
T0=$SECONDS
O=$OUT/16; mkdir -p "$O"
LOG=$O/log.txt
W=/tmp/b16; rm -rf $W; mkdir -p $W
if [ -n "$DRY" ]; then
  PY=${PY:-/work/main/.venv/bin/python}; ROOT=$PWD
  COMMON="--smoke --new-tokens 8"; BIG=8
  export PYTHONPATH=$ROOT/lib
else
  PY=python3; ROOT=$PWD/.dev/16
  [ -d "$ROOT/lib" ] || ROOT=$PWD
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site16 .whl/*.whl >> $LOG 2>&1
  echo "install exit $? after $((SECONDS-T0)) s" | tee -a $LOG
  COMMON="--new-tokens 230"; BIG=128
  export PYTHONPATH=/tmp/site16:$ROOT/lib CUDA_VISIBLE_DEVICES=${GPU:-0}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd $ROOT
bench() {  # name, seconds, args...
  local name=$1 t=$2; shift 2
  timeout -k 5 $t $PY jobs/bench.py --parts int4 --batches "" --static-batches "" $COMMON "$@" \
    --deadline-s $((t - 40)) --out $W/$name.json 2>&1 \
    | grep --line-buffered -Ev "it/s\]|s/it\]|FutureWarning|UserWarning|warnings.warn" | tee -a $LOG
  echo "$name exit $? after $((SECONDS-T0)) s" | tee -a $LOG
  cp $W/$name.json "$O"/ 2>/dev/null
}
bench b1 300 --graph-kernels tinygemm --graph-batches 1 --graph-drafts 3 --graph-compile both
bench b128 $(( ${BUDGET:-528} - (SECONDS - T0) - 10 )) --graph-kernels triton --graph-batches $BIG --graph-compile both
$PY - "$O"/b1.json "$O"/b128.json <<'PY' 2>&1 | tee -a $LOG
import json, sys
for path in sys.argv[1:]:
    try:
        d = json.load(open(path))
    except OSError:
        print("missing", path); continue
    print("SUMMARY", path, d.get("gpu"), "int4 model GiB", d.get("int4_model_gib"), "seconds", d.get("seconds"))
    for r in d["generate"]:
        print(f"{r['model']:48s} b{r['batch_size']:<4} {r.get('status','')[:70]:12s} s/img {r.get('s_per_image')} ms/tok {r.get('ms_per_token_step')} passes {r.get('forward_passes')} ms/pass {r.get('ms_per_forward_pass')} prefill {r.get('prefill_s')} peak {r.get('peak_gib')} warm {r.get('warmup_s')} tok {r.get('first_tokens', [])[:8]}")
PY
