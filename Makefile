# edge-tune: two commands on a fresh machine.
#   make demo   install, fetch the embedded model, train, export, compare base vs tuned
#   make test   install with test extras, run the whole suite
#   make lint   ruff, the import rules (lint-imports) and vulture (dead code)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Pinned first: an unpinned torch drags in several GB of CUDA packages on Linux.
TORCH  ?= torch==2.13.0
EXTRAS ?= cpu,run,test
# llama-cpp-python compiles llama.cpp from source (~15 min on 2 cores); use every core.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# fetch-converter: llama.cpp's HF->GGUF converter, from the same llama-cpp-python release, into
# the user cache now (install time), so convert-base needs no network later.
$(VENV)/.installed-$(EXTRAS): pyproject.toml | $(BIN)/python
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	$(if $(findstring run,$(EXTRAS)),$(BIN)/edge-tune fetch-converter)
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

demo: install
	$(BIN)/edge-tune demo

# Two pytest workers, each taking whole files (module fixtures train once): much of a test's
# time is one thread (imports, llama.cpp on 1 thread, Textual), so two share 2 cores well.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/train_throughput.py

# ruff (pyflakes-level errors, cyclomatic complexity <= 15) and import-linter's contracts
# (pyproject.toml [tool.importlinter]; run over the installed layout by
# tests/helpers/import_contracts.py). `make test` checks both too.
# vulture: no dead code at 80% confidence (framework callbacks' parameters: vulture_whitelist.py).
lint: install
	$(BIN)/python -m ruff check edge_tune converters tui tests benchmarks
	$(BIN)/python tests/helpers/import_contracts.py
	$(BIN)/python -m vulture edge_tune converters tui vulture_whitelist.py --min-confidence 80

clean:
	rm -rf $(VENV) build *.egg-info runs
