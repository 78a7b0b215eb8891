#!/usr/bin/env bash
# Issue 20: Unsloth side by side with this project's training, one GPU, one call (<= 540 s).
# Run from the repo root: `bash .dev/20/gpu.sh` with $OUT set (the device tool), or `DRY=1 bash ...` on a
# CPU (a narrow 2-layer model; Unsloth's vision loader stops there: it has no CPU backend).
# Steps, each its own process and each under `timeout`; every step writes its JSON before the next:
#   1. install the carried wheels (.whl, .dev/20/whl) into /tmp/site20
#   2. `import unsloth` check (in the background) while the random checkpoint is saved to /tmp
#   3. Unsloth's rows (first: the most uncertain part), 4. this project's rows, 5. the table.
# Variables: LAYERS (16), STEPS (4), BUDGET (540), UNSLOTH_MB (Unsloth's micro-batches, "16,8"), CKPT_TIMEOUT (150 s
# for building and saving the checkpoint; the 64-layer one took 98 s), PLAN (our rows: offload, the default,
# offload-check, compile, compile-eager, or levers: the rows of the first two runs), GPU (the CUDA device, 0),
# UNSLOTH=0 (no Unsloth rows), UNSLOTH_PROFILE=1 (one profiled Unsloth step per row), WAIT_CKPT=1 (wait up to
# CKPT_TIMEOUT for another process to write the checkpoint), TAG (suffix of the result files), EXPANDABLE=1 (our rows with expandable segments). The 64-layer runs of 2026-11-30: LAYERS=64 STEPS=3 UNSLOTH_MB=16
# CKPT_TIMEOUT=200 (PLAN=levers; then PLAN=offload GPU=1; then PLAN=offload-check UNSLOTH=0 TAG=-check GPU=0
# on a single H200).
set -o pipefail
# The device call carries a copy of lib/, jobs/, config/ and the wheels in .dev/20; in a checkout that
# has no such copy, the repo's own lib/ and jobs/ are used (wheels still expected in $HERE/whl).
HERE=${HERE:-.dev/20}
[ -d "$HERE/lib" ] || HERE=.
LAYERS=${LAYERS:-16}
STEPS=${STEPS:-4}
BUDGET=${BUDGET:-540}
OUT=${OUT:-/tmp/out20}
R=$OUT/20
mkdir -p "$R"
TAG=${TAG:-}  # a suffix of the result files (a second call next to the first one's files)
LOG=$R/log$TAG.txt
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TOKENIZERS_PARALLELISM=false
CKPT=/tmp/ckpt20-$LAYERS
if [ -n "$DRY" ]; then
  PY=${PY:-.venv/bin/python}
  SITE=/tmp/site20-dry-none
  SITE_U=${SITE_U:-/tmp/u20/site}
  CKPT_ARGS="--narrow"; UNSLOTH_ARGS="--no-4bit --micro-batches 2"; OURS_ARGS="--set train.micro_batch=4"; STEPS=1; LAYERS=2; CKPT=/tmp/ckpt20-dry
else
  export CUDA_VISIBLE_DEVICES=${GPU:-0}
  PY=python3
  SITE=/tmp/site20
  SITE_U=/tmp/site20u
  CKPT_ARGS=""; UNSLOTH_ARGS="--micro-batches ${UNSLOTH_MB:-16,8}${UNSLOTH_PROFILE:+ --profile}"; OURS_ARGS=""
  # The project's GPU wheels for every step; Unsloth and its dependencies (trl, datasets, torchao, ...)
  # in a folder of their own that only the Unsloth steps see, so our rows run in the usual environment.
  timeout 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE \
    .whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"
  timeout 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE_U \
    $HERE/whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"
fi
export PYTHONPATH=$SITE:$PWD/$HERE/lib
UPATH=$SITE_U:$SITE:$PWD/$HERE/lib
left() { echo $((BUDGET - SECONDS)); }
say() { echo "[$SECONDS s] $*" | tee -a "$LOG"; }
say "start: layers $LAYERS, steps $STEPS; $($PY -c 'import torch;print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))' 2>&1 | tail -1)"

# 2. import check (CPU work) while the checkpoint is written (GPU + disk)
( PYTHONPATH=$UPATH timeout 120 $PY -c "import unsloth, unsloth_zoo, transformers, peft, trl; from unsloth import FastVisionModel; \
print('import ok: unsloth', unsloth.__version__, 'zoo', unsloth_zoo.__version__, 'trl', trl.__version__)" \
  > /tmp/import20.log 2>&1; echo "import check exit $?" >> /tmp/import20.log ) &
IMPORT_PID=$!
if [ -n "$WAIT_CKPT" ]; then  # another process on the host writes it (two GPUs, one checkpoint)
  while [ ! -f $CKPT/config.json ] && [ $SECONDS -lt ${CKPT_TIMEOUT:-150} ]; do sleep 5; done
fi
if [ -f $CKPT/config.json ]; then  # a finished one (written as .partial, then renamed) from an earlier call
  say "checkpoint $CKPT already there"
else
  say "checkpoint -> $CKPT"
  timeout ${CKPT_TIMEOUT:-150} $PY $HERE/jobs/bench_unsloth.py checkpoint --config $HERE/config/config.yaml --checkpoint $CKPT --layers $LAYERS $CKPT_ARGS 2>&1 \
    | grep -v -E "Writing model shards|Loading weights" | tee -a "$LOG"
  say "checkpoint exit $?; $(du -sh $CKPT 2>/dev/null | cut -f1)"
fi
wait $IMPORT_PID
grep -v -E "Warning|warn\(|^ *$" /tmp/import20.log | tail -15 | tee -a "$LOG"

# 3. Unsloth (leaves at least 170 s for this project's rows)
T=$(( $(left) - 170 )); [ $T -gt 260 ] && T=260
if [ "${UNSLOTH:-1}" = 0 ]; then
  say "unsloth rows skipped (UNSLOTH=0)"
elif grep -q "import ok" /tmp/import20.log && [ $T -gt 30 ]; then
  say "unsloth rows (timeout $T s)"
  PYTHONPATH=$UPATH timeout $T $PY $HERE/jobs/bench_unsloth.py unsloth --config $HERE/config/config.yaml --checkpoint $CKPT --out $R/unsloth$TAG.json --steps $STEPS \
    $UNSLOTH_ARGS 2>&1 | grep -v -E "Loading weights|Writing model shards" | tee -a "$LOG"
  say "unsloth exit $?"
else
  say "unsloth skipped (import failed or no time: $T s)"
fi

# 4. this project's rows; the offload plan's row under Unsloth's peak takes the peak just measured
GOAL=$($PY -c "import json,sys; r=[t for t in json.load(open(sys.argv[1]))['train'] if t.get('status')=='ok']; print(r[0]['peak_gib'] or '')" \
  $R/unsloth$TAG.json 2>/dev/null)
[ -n "$GOAL" ] && OURS_ARGS="$OURS_ARGS --memory-goal-gib $GOAL"
T=$(( $(left) - 8 ))
say "our rows (timeout $T s)"
# EXPANDABLE=1: our rows with the allocator's expandable segments, as the training job (pcbvlm.commands.train) and
# Unsloth (on import) set for their processes
timeout $T ${EXPANDABLE:+env PYTORCH_ALLOC_CONF=expandable_segments:True} $PY $HERE/jobs/bench_unsloth.py ours --config $HERE/config/config.yaml --checkpoint $CKPT --out $R/ours$TAG.json --steps $STEPS \
  --deadline-s $((T - 45)) --plan ${PLAN:-offload} $OURS_ARGS 2>&1 | grep -v -E "Loading weights|Writing model shards" | tee -a "$LOG"
say "ours exit $?"

# 5. summary
timeout 20 $PY $HERE/jobs/bench_unsloth.py table --out $R/ours$TAG.json --unsloth $R/unsloth$TAG.json 2>&1 | tee -a "$LOG"
say "done"
