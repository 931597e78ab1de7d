# fastivim developer tasks. Every target installs what it needs into $(VENV) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-nojit bench lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test,lint]'
	touch $(STAMP)

## Run the main job on the built-in synthetic phantom.
demo: install
	$(BIN)/fastivim demo

## The test suite (CI runs exactly this).
test: install
	$(BIN)/python -m pytest -q

## The same suite with numba's JIT off, so coverage sees the kernel lines (slower).
test-nojit: install
	NUMBA_DISABLE_JIT=1 $(BIN)/python -m pytest -q -m "not jit_only"

## Throughput table: voxels/s by method, size and threads, vs a scipy curve_fit loop.
bench: install
	$(BIN)/python bench/bench_kernels.py

lint: install
	$(BIN)/ruff check fastivim tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis bench/out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
