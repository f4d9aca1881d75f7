# The two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test bench lint setup clean

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

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
