#!/bin/bash
# The script of the measured call (2026-11-30, nvidia-h200-x2), as it ran: bash .dev/17/gpu.sh from the repo root,
# with .dev/17 holding lib, jobs, config of this branch, collect.py (tiny.json) and the wheels (deepspeed, datasets, dill, multiprocess).
# issue 17, one call on nvidia-h200-x2 (both GPUs), <= 540 s. Run from the repo root: bash .dev/17/gpu.sh
# 1. ZeRO-2 on the 64-layer 32B shape: 1-GPU baseline (each GPU alone) + 2-GPU samples/s, peak GiB/GPU,
#    micro-batch search (jobs/bench_multi_gpu.py)          -> $OUT/17/bench.json (written after each part)
# 2. the tiny Trainer job through python -m pcbvlm.launch: zero2 train 2 steps + resume to 4
# 3. ZeRO-3 (16-layer cut) with the fix (model built before the Accelerator, outside zero.Init)
# 4. the tiny Trainer job under ddp: train 2 steps + resume to 4  -> $OUT/17/tiny.json (after each launch)
# Everything printed goes to $OUT/17/log.txt too (progress bars filtered).
set -o pipefail
T0=$SECONDS
BUDGET=${BUDGET:-525}
left() { echo $(( BUDGET - (SECONDS - T0) )); }
cap() { local want=$1 l; l=$(( $(left) - ${2:-0} )); (( l < want )) && want=$l; (( want < 1 )) && want=1; echo $want; }
O=$OUT/17; mkdir -p $O
LOG=$O/log.txt
F='could not be imported|use_return_dict|incompatible with gradient|it/s\]|s/it\]|FutureWarning|return func\(\*args'
say() { echo "$*" | tee -a $LOG; }
if [ -n "$DRY" ]; then  # CPU rehearsal here: the venv's python, the tiny shape, no wheels
  PY=${PY:-/work/main/.venv/bin/python}; TINYB="--tiny"
  DEV="--set resources.device=cpu --set train.method=lora --set train.quantization=none --set train.precision=fp32"
else
PY=python3; TINYB=""
DEV="--set resources.device=cuda --set train.method=qlora --set train.quantization=nf4 --set train.precision=bf16"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site17 .whl/*.whl .dev/17/whl/*.whl >> $LOG 2>&1
say "install exit $? after $((SECONDS-T0)) s"
fi
cd .dev/17
export PYTHONPATH=${DRY:+$PWD/lib:}/tmp/site17:$PWD/lib PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_VISIBLE_DEVICES=0,1
[ -z "$DRY" ] && export DS_ACCELERATOR=cuda
$PY -c "import torch, deepspeed, datasets, bitsandbytes, liger_kernel, pydantic, transformers, peft, accelerate; print('gpus', torch.cuda.device_count(), 'torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'datasets', datasets.__version__, 'bnb', bitsandbytes.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" 2>&1 | grep -Ev "$F" | tail -3 | tee -a $LOG
W=/tmp/w17; rm -rf $W; mkdir -p $W/b

reap() {  # safety net: no GPU process of this script outlives its part (only ours: their command names .dev/17)
  local pid
  for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null); do
    if tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null | grep -q "dev/17"; then say "reap: killing leftover GPU process $pid"; kill -9 $pid; fi
  done
  sleep 1
}

merge_bench() {  # one JSON of the bench parts done so far
  $PY - "$O/bench.json" $W/b/*.json <<'PY'
import json, sys
out, *parts = sys.argv[1:]
doc = {}
for p in parts:
    try:
        doc[p.rsplit("/", 1)[-1][:-5]] = json.load(open(p))
    except Exception as exc:
        doc[p] = f"unreadable: {exc}"
json.dump(doc, open(out, "w"), indent=1)
PY
}

# 1. ZeRO-2, 64 layers, with the 1-GPU baseline first (each GPU alone, no communication)
say "=== 1. zero2 bench (64 layers), $(left) s left"
timeout -k 5 $(cap 250 140) $PY jobs/bench_multi_gpu.py $TINYB --profiles zero2 --steps 3 --search 18,20,22,24 \
  --timeout-for zero2=$(cap 230 155) --out $W/b/zero2.json --parts-dir $W/b/parts 2>&1 | grep -Ev "$F" | tee -a $LOG | grep -v "^\[rank" | tail -40
say "zero2 bench exit ${PIPESTATUS[0]} at $((SECONDS-T0)) s"
merge_bench
reap

# 2. the tiny Trainer job under zero2: train, checkpoint, resume
$PY jobs/synth_data.py --num 12 --out $W/synth > /dev/null 2>&1
CONFIG=config/tiny.yaml $PY jobs/prepare_data.py --deeppcb-dir $W/synth --out $W/data > /dev/null 2>&1
say "tiny data: $(wc -l < $W/data/train.jsonl) train rows"
S="--set paths.data_dir=$W/data --set model.name_or_path=$W/tiny $DEV --set train.fused_kernels=none --set train.save_steps=2 --set train.eval_steps=100 --set train.logging_steps=1 --set data.max_pixels=16384 --set data.min_pixels=4096 --set train.micro_batch=2"
tiny() {  # tiny PROFILE LABEL MAX_STEPS [RESUME]
  local p=$1 label=$2 steps=$3 resume=$4 t=$SECONDS rc
  say "=== tiny $label ($p, max_steps $steps${resume:+, resume}), $(left) s left"
  timeout -k 5 $(cap 75 ${5:-0}) $PY -m pcbvlm.launch --config config/tiny.yaml --profile $p $S \
    --set paths.runs_dir=$W/runs-$p --set train.max_steps=$steps ${resume:+--resume "$resume"} 2>&1 \
    | grep -Ev "$F" | tee -a $LOG | grep -v "^\[rank1\]" | tail -25
  rc=${PIPESTATUS[0]}
  reap
  $PY collect.py $O/tiny.json $label $rc $W/runs-$p $((SECONDS-t)) 2>&1 | tee -a $LOG
}
tiny zero2 zero2-train 2 "" 160
run=$(ls -d $W/runs-zero2/*/ 2>/dev/null | head -1)
[ -n "$run" ] && tiny zero2 zero2-resume 4 "$run" 130

# 3. ZeRO-3 on a 16-layer cut, model built outside zero.Init
say "=== 3. zero3 bench (16 layers), $(left) s left"
timeout -k 5 $(cap 125 60) $PY jobs/bench_multi_gpu.py $TINYB --profiles zero3 --layers 16 --steps 3 --search 20,24,32 --no-baseline \
  --timeout-for zero3=$(cap 105 80) --out $W/b/zero3.json --parts-dir $W/b/parts 2>&1 | grep -Ev "$F" | tee -a $LOG | grep -v "^\[rank" | tail -30
say "zero3 bench exit ${PIPESTATUS[0]} at $((SECONDS-T0)) s"
merge_bench
reap

# 4. the tiny Trainer job under ddp: train, checkpoint, resume
tiny ddp ddp-train 2 "" 35
run=$(ls -d $W/runs-ddp/*/ 2>/dev/null | head -1)
[ -n "$run" ] && (( $(left) > 30 )) && tiny ddp ddp-resume 4 "$run" 0

say "=== summary after $((SECONDS-T0)) s"
$PY - $O/bench.json $O/tiny.json <<'PY' 2>&1 | tee -a $LOG
import json, sys
for path in sys.argv[1:]:
    try:
        doc = json.load(open(path))
    except Exception as exc:
        print(path, "missing", exc); continue
    if "bench" in path:
        for name, d in doc.items():
            if not isinstance(d, dict): print(name, d); continue
            print(name, "single:", d.get("single_gpu"))
            for prof, e in d.get("profiles", {}).items():
                print(" ", prof, {k: e.get(k) for k in ("status", "layers", "samples_per_s", "speedup_vs_1_gpu", "peak_gib_per_gpu", "model_gib_per_gpu", "largest_micro_batch_fitting", "step_s", "loss")})
                print("   search", e.get("micro_batch_search"), "launch", d.get("launches"))
    else:
        for label, e in doc.items():
            print(label, {k: e.get(k) for k in ("exit", "seconds", "checkpoints", "losses", "eval_losses", "peak_vram_gib")}, (e.get("manifest") or {}).get("launch"), "resumed_from", (e.get("manifest") or {}).get("resumed_from"))
PY
ls -la $O
