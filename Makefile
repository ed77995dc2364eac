# nlplatform: every task is a make target. `make train` and `make test` set everything up on first use.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

RECIPE ?= recipes/hope/tiny.yaml
SWEEP  ?= sweeps/hope_levels_tiny.yaml
ARGS   ?=
CKPT   ?=
SUITE  ?= commonsense
PYTEST_ARGS ?=
COMPARE_STEPS ?= 150
COMPARE_BATCH ?= 8
COMPARE_SUITE ?= smoke
MLFLOW_PORT ?= 5000
MLFLOW_HOST ?= 127.0.0.1
TRACKING_BACKEND   ?= sqlite:///mlruns.db
TRACKING_ARTIFACTS ?= mlartifacts

# Every cache stays inside the workspace; MLflow does not phone home.
export HF_HOME                 := $(CURDIR)/.cache/huggingface
export XDG_CACHE_HOME          := $(CURDIR)/.cache
export MPLCONFIGDIR            := $(CURDIR)/.cache/matplotlib
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/torchinductor
export TRITON_CACHE_DIR        := $(CURDIR)/.cache/triton
export MLFLOW_DISABLE_TELEMETRY := true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help setup export postgres browser screenshots data eval-data train eval sweep leaderboard compare compare-optimizers test test-fast test-kernels lint format ui tracking-server bench bench-kernels bench-train clean

help: ## list the targets
	@echo "nlplatform make targets (RECIPE=$(RECIPE)):"
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first and pinned: torch==2.13.0 is a CPU wheel here; any looser spec pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[kernels,eval,sweep,hf,dev]"
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install the project (editable) with all extras

# Debian packages $(1) installed (as root, or through sudo), or one line saying what to install
apt_install = if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; \
	elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; \
	else echo "missing: install the Debian packages $(1) (apt-get install $(1))" >&2; exit 2; fi

postgres: ## install PostgreSQL's server (Debian package) when missing: the test suite runs a real one of its own
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; then :; \
	else $(call apt_install,postgresql); fi

browser: ## install headless Chromium and its driver (Debian packages) when missing: the UI tests load MLflow's pages in it
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	else $(call apt_install,chromium chromium-driver); fi

data: $(STAMP) ## fetch the corpus of RECIPE (default: the embedded Shakespeare) and build its token cache; ARGS="data.paths=[...] ..."
	$(PY) -m nlplatform data $(RECIPE) $(ARGS)

eval-data: $(STAMP) ## fetch the commonsense eval data (once) into the cache
	$(PY) -m nlplatform eval-data

train: $(STAMP) ## train RECIPE (default: the tiny default recipe) with ARGS="key=value ..." overrides
	$(PY) -m nlplatform train $(RECIPE) $(ARGS)

eval: $(STAMP) eval-data ## score CKPT=path/to.ckpt on SUITE (default commonsense; also long_context, continual) with that suite's flags in ARGS="--limit N"
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=runs/<experiment>/<run>/checkpoints/last.ckpt [SUITE=smoke] [ARGS=...]" >&2; exit 2; }
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(PY) -m nlplatform eval $(CKPT) --suite $(SUITE) $(ARGS)

export: $(STAMP) ## write CKPT=path/to.ckpt as a Hugging Face transformers folder OUT=dir (default: <run>/hf)
	@test -n "$(CKPT)" || { echo "usage: make export CKPT=runs/<experiment>/<run>/checkpoints/last.ckpt [OUT=dir]" >&2; exit 2; }
	$(PY) -m nlplatform export $(CKPT) $(or $(OUT),$(abspath $(dir $(CKPT))../hf))

sweep: $(STAMP) data ## run or continue the Optuna study of SWEEP (default: tiny HOPE levels); ARGS="--n-trials N --workers K --storage URL"
	$(PY) -m nlplatform sweep $(SWEEP) $(ARGS)

leaderboard: $(STAMP) ## rank the finished runs by val ppl into runs/leaderboard/<time>/ (ARGS="--experiment E ...")
	$(PY) -m nlplatform leaderboard $(ARGS)

compare: $(STAMP) data ## train every family's tiny recipe on one budget (COMPARE_STEPS x COMPARE_BATCH x 256), eval, rank
	$(PY) -m nlplatform compare --steps $(COMPARE_STEPS) --batch-size $(COMPARE_BATCH) --seq-len 256 \
	  --suite $(COMPARE_SUITE) $(ARGS)

compare-optimizers: $(STAMP) data ## tiny Transformer++ and HOPE with AdamW, Muon, M3 and DMGD on one budget, ranked
	$(PY) -m nlplatform compare --families transformer,hope --optimizers adamw,muon,m3,dmgd --steps $(COMPARE_STEPS) \
	  --batch-size $(COMPARE_BATCH) --seq-len 256 --no-eval $(ARGS)

test: $(STAMP) postgres browser data eval-data ## run the whole test suite (CPU, offline), slowest tests listed at the end
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP) data eval-data ## the edit-test loop: every test not marked slow (no training, server or interpreter; under 3 minutes)
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not gpu and not slow" $(PYTEST_ARGS)

screenshots: $(STAMP) browser data ## render the MLflow UI's leaderboard page (two tiny runs) into docs/img/ for the README
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 NLPLATFORM_UPDATE_SCREENSHOTS=1 $(PY) -m pytest -q tests/test_mlflow_ui.py

test-kernels: $(STAMP) ## kernel tests only: Triton vs reference (CPU interpreter; on a GPU add ARGS="-m gpu")
	$(PY) -m pytest -q tests/kernels $(ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

tracking-server: $(STAMP) ## serve MLflow on $(MLFLOW_HOST):$(MLFLOW_PORT) over TRACKING_BACKEND (sqlite:///mlruns.db or postgresql://...), artifacts in TRACKING_ARTIFACTS
	@# silent recipe: the backend URL may hold a password, and make would echo it
	@echo "export MLFLOW_TRACKING_URI=http://$(if $(filter 0.0.0.0,$(MLFLOW_HOST)),$$(hostname -f),$(MLFLOW_HOST)):$(MLFLOW_PORT)"
	@echo "the UI: http://$(if $(filter 0.0.0.0,$(MLFLOW_HOST)),$$(hostname -f),$(MLFLOW_HOST)):$(MLFLOW_PORT)/ (once per browser, pick 'Model training' at the top left; an experiment's page opens on its leaderboard)"
	@MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec $(VENV)/bin/mlflow server --backend-store-uri "$(TRACKING_BACKEND)" \
	  --artifacts-destination "$(TRACKING_ARTIFACTS)" --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers 1 $(ARGS)

ui: tracking-server ## the MLflow UI of sqlite:///mlruns.db on http://127.0.0.1:5000 (the tracking server, on one machine)

bench: $(STAMP) ## run every benchmark: bench/bench_*.py, then the op benchmarks (results under bench/results/)
	@set -e; for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script; done
	@echo "== python -m bench.ops"; $(PY) -m bench.ops

bench-kernels: $(STAMP) ## the op benchmarks (bench/ops/): delta rule and Titans memory, Triton and reference against fla, SDPA, titans-pytorch (ARGS="--ops titans_memory ...")
	$(PY) -m bench.ops $(ARGS)

bench-train: $(STAMP) ## tokens/s, peak memory, MFU of a training step per family (GPU: 340m, T=2K/4K/8K, bf16; resumable; ARGS=...)
	$(PY) bench/bench_train_step.py $(ARGS)

clean: ## remove run outputs, caches and the tracking database (keeps .venv)
	rm -rf runs mlruns mlruns.db sweeps.db mlartifacts .cache .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
