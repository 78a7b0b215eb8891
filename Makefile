# pcbvlm: QLoRA fine-tuning of Qwen3-VL on DeepPCB. `make help` lists the targets.
#
# Every job takes CONFIG=<yaml> and SET="section.key=value ..." overrides, and runs either in the
# container (RUNNER=docker) or in the local virtual environment (RUNNER=local).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

# .env holds site settings (paths, GPU ids, mirrors); see .env.example. Exported to every job.
-include .env
export

PYTHON      ?= python3.11
VENV        ?= .venv
PY          := $(VENV)/bin/python
CONFIG      ?= config/config.yaml
SET         ?=
LOCK        ?= $(if $(shell command -v nvidia-smi 2>/dev/null),requirements/cuda.lock,requirements/cpu.lock)
# Where pip finds wheels that are not on the index (this project's CPU torch build, an offline wheelhouse).
FIND_LINKS  ?= $(firstword $(wildcard /opt/wheels wheelhouse))
JOB_IMAGE   ?= pcbvlm:cuda
TEST_IMAGE  ?= pcbvlm:cpu
JOB         ?= train
DEEPPCB_DIR ?=
DATA_DIR    ?=
export CONFIG SET

# RUNNER: docker when a Docker engine answers and the job image exists, else local. Override freely.
ifeq ($(origin RUNNER),undefined)
RUNNER := $(shell docker image inspect $(JOB_IMAGE) >/dev/null 2>&1 && echo docker || echo local)
endif
export RUNNER

ifeq ($(RUNNER),docker)
RUN_JOB  = docker compose run --rm job
RUN_TEST = docker compose run --rm test
JOB_DEPS =
else ifeq ($(RUNNER),local)
RUN_JOB  = $(VENV)/bin/
RUN_TEST = $(VENV)/bin/
JOB_DEPS = $(VENV)/.installed
else
$(error RUNNER must be docker or local, got '$(RUNNER)')
endif
# `python` in the container, `.venv/bin/python` locally.
JOBPY = $(RUN_JOB)python

define announce
	@echo "==> $(1) [RUNNER=$(RUNNER) CONFIG=$(CONFIG)$(if $(SET), SET=\"$(SET)\")]"
endef

.PHONY: help setup lock preflight data synth train merge quantize eval infer clean-cache demo test lint \
        build build-cpu shell bench clean

help: ## list the targets
	@echo "pcbvlm - fine-tune Qwen3-VL on DeepPCB. Usage: make <target> [CONFIG=...] [SET=\"k=v ...\"] [RUNNER=docker|local]"
	@echo "RUNNER now: $(RUNNER) (docker when the image $(JOB_IMAGE) exists)"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# ---------------------------------------------------------------------------------------------------------
# Environment

setup: $(VENV)/.installed ## create .venv from the lock (CPU lock here, CUDA lock where nvidia-smi exists)

$(VENV)/.installed: $(LOCK) pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 2; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
	    $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) -r $(LOCK)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@echo "$(LOCK)" > $@

lock: ## re-resolve requirements/*.in into the hashed locks (uv; needs PyPI)
	@test -x $(VENV)/bin/uv || $(PY) -m pip install --quiet uv==0.13.9
	$(VENV)/bin/uv pip compile requirements/cpu.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	    --find-links /opt/wheels --generate-hashes --no-header -o requirements/cpu.lock
	$(VENV)/bin/uv pip compile requirements/cuda.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	    --generate-hashes --no-header -o requirements/cuda.lock

# ---------------------------------------------------------------------------------------------------------
# Jobs

preflight: $(JOB_DEPS) ## check GPU, RAM, disk, packages against what JOB=train|merge|quantize|eval needs
	$(call announce,preflight JOB=$(JOB))
	$(JOBPY) jobs/preflight.py --job $(JOB)

synth: $(JOB_DEPS) ## generate a synthetic DeepPCB-layout dataset (N=64 OUT=data/synth/DeepPCB)
	$(call announce,synth)
	$(JOBPY) jobs/synth_data.py --num $(or $(N),64) --out $(or $(OUT),data/synth/DeepPCB)

data: $(JOB_DEPS) ## convert DeepPCB (DEEPPCB_DIR=...) to Qwen3-VL grounding jsonl (DATA_DIR=...)
	$(call announce,data)
	$(JOBPY) jobs/prepare_data.py $(if $(DEEPPCB_DIR),--deeppcb-dir $(DEEPPCB_DIR)) \
	    $(if $(DATA_DIR),--out $(DATA_DIR)) $(if $(STRICT),--strict)

train: $(JOB_DEPS) ## QLoRA fine-tune (RESUME=auto|no); runs preflight first
	@$(MAKE) preflight JOB=train
	$(call announce,train)
	$(RUN_JOB)accelerate launch --config_file config/accelerate/$(or $(PROFILE),$(shell $(JOBPY) -m pcbvlm.config get train.accelerate_profile)).yaml \
	    jobs/train.py $(if $(RESUME),--resume $(RESUME))

merge: $(JOB_DEPS) ## merge the adapter (newest run, or ADAPTER=path) into the bf16 base
	@$(MAKE) preflight JOB=merge
	$(call announce,merge)
	$(JOBPY) jobs/merge.py $(if $(ADAPTER),--adapter $(ADAPTER))

quantize: $(JOB_DEPS) ## AWQ W4A16 with llm-compressor (MODEL=merged folder)
	@$(MAKE) preflight JOB=quantize
	$(call announce,quantize)
	$(JOBPY) jobs/quantize.py $(if $(MODEL),--model $(MODEL))

eval: $(JOB_DEPS) ## evaluate a model (MODEL=run|merged|quantized) on a split; DeepPCB + COCO metrics
	@$(MAKE) preflight JOB=eval
	$(call announce,eval)
	$(JOBPY) jobs/evaluate.py $(if $(MODEL),--model $(MODEL)) $(if $(SPLIT),--split $(SPLIT)) $(if $(OUT),--out $(OUT))

infer: $(JOB_DEPS) ## find defects on IMAGE=path [TEMPLATE=path] [OUT=overlay.png] [MODEL=...]
	@test -n "$(IMAGE)" || { echo "error: give IMAGE=path/to/board.jpg"; exit 2; }
	$(call announce,infer)
	$(JOBPY) jobs/infer.py --image $(IMAGE) $(if $(TEMPLATE),--template $(TEMPLATE)) \
	    $(if $(OUT),--out $(OUT)) $(if $(MODEL),--model $(MODEL))

clean-cache: $(JOB_DEPS) ## list / delete HF cache snapshots and stale checkpoints (DRY_RUN=1 to preview)
	$(call announce,clean-cache)
	$(JOBPY) jobs/clean_cache.py $(if $(DRY_RUN),--dry-run) $(if $(PATTERN),--pattern $(PATTERN)) \
	    $(if $(KEEP),--keep $(KEEP))

bench: $(JOB_DEPS) ## GPU benchmark of the real 32B shape (random weights): training and inference
	$(call announce,bench)
	$(JOBPY) jobs/bench.py

demo: $(JOB_DEPS) ## the whole pipeline on the tiny embedded model and synthetic data, CPU only
	$(JOBPY) jobs/demo.py

# ---------------------------------------------------------------------------------------------------------
# Quality

test: $(JOB_DEPS) ## run the test suite (CPU, tiny model, offline)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(RUN_TEST)python -m pytest -q $(PYTEST_ARGS)

lint: $(JOB_DEPS) ## ruff (and hadolint on the Dockerfile where installed)
	$(VENV)/bin/ruff check lib jobs tests
	$(VENV)/bin/ruff format --check lib jobs tests

clean: ## remove caches of the tools (not data, checkpoints or outputs)
	rm -rf .pytest_cache .ruff_cache
	find lib jobs tests -name __pycache__ -type d -prune -exec rm -rf {} +
