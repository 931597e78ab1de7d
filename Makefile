# fastivim developer tasks. Every target installs what it needs into $(VENV) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BASE_STAMP := $(VENV)/.base-stamp
STAMP := $(VENV)/.installed-stamp
PIP_LOG := $(VENV)/pip.log
DEV_EXTRAS := .[test,lint,report,cluster]

# pip stays quiet; its whole output is shown only when it fails.
PIP_QUIET = $(BIN)/python -m pip install --disable-pip-version-check --no-input
define pip_install
	@echo "installing $(1) into $(VENV) (log: $(PIP_LOG))"
	@$(PIP_QUIET) $(1) > $(PIP_LOG) 2>&1 || { cat $(PIP_LOG); exit 1; }
endef

.PHONY: install demo test test-nojit bench bench-peers bench-cli bench-batch bench-accuracy peers-env lint clean

## The package alone (what `make demo` needs).
$(BASE_STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(call pip_install,-e .)
	@touch $(BASE_STAMP)

## The package with the test, lint, report and cluster extras (what `make test` needs).
install: $(STAMP)

$(STAMP): $(BASE_STAMP)
	$(call pip_install,-e '$(DEV_EXTRAS)')
	@touch $(STAMP)

## Run the main job on the built-in synthetic phantom (compiling its kernel first, once per machine).
demo: $(BASE_STAMP)
	$(BIN)/fastivim compile --method segmented
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

## End-to-end `fastivim run` timings (read / fit / write) on 128x128x30x10 and a larger volume.
bench-cli: install
	$(BIN)/python bench/bench_cli.py

## Subjects per minute for `fastivim batch` (local and a 2-worker Dask cluster).
bench-batch: install
	$(BIN)/python bench/bench_batch.py

## RMSE against the truth of segmented, full and bayesian on the tissue phantom, per tissue, and of
## spatial on the lesion phantom (ratios, per-tissue coverage, lesion contrast, voxels/s).
bench-accuracy: install
	$(BIN)/python bench/bench_accuracy.py

OSIPY_VENV ?= .venv-osipy
PY312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
PEERS_STAMP := $(VENV)/.peers-stamp

$(PEERS_STAMP): $(STAMP) setup.cfg
	$(BIN)/python -m pip install -e '.[peers]'
	touch $(PEERS_STAMP)

## Optional peers: dipy/cvxpy/matplotlib into $(VENV); osipy (needs Python >= 3.12) into $(OSIPY_VENV).
peers-env: $(PEERS_STAMP)
	@if $(PY312) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then \
	  test -x $(OSIPY_VENV)/bin/python || $(PY312) -m venv $(OSIPY_VENV); \
	  $(OSIPY_VENV)/bin/python -m pip install -q -r bench/requirements-osipy.txt \
	    || echo "osipy install failed: bench-peers will skip osipy"; \
	else echo "no Python >= 3.12 at '$(PY312)' (set PY312=...): bench-peers will skip osipy"; fi

## fastivim vs dipy, scipy curve_fit, a NumPy LM and osipy on the same phantoms (< 15 min).
bench-peers: peers-env
	OSIPY_PYTHON=$(OSIPY_VENV)/bin/python $(BIN)/python bench/bench_peers.py

lint: install
	$(BIN)/ruff check fastivim tests bench

clean:
	rm -rf $(VENV) $(OSIPY_VENV) build *.egg-info .pytest_cache .hypothesis bench/out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
