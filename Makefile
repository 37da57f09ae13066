# Two commands do all set-up on a fresh machine with Python 3.11+:
#   make demo   — create .venv if missing, install, run the whole pipeline (diffusion-pipeline run)
#                 on the embedded digits under ./pipeline-data: dataset, training, evaluation,
#                 MLflow registry and promotion, generated samples and their PNG grid
#   make test   — create .venv if missing, install with the dev extra, run the whole test suite
#   make test-fast — the same set-up, then only the tests that need no service (no Ray, Prefect,
#                 MLflow or S3 server) and are not slow: the math, config, units, manifests;
#                 on TEST_WORKERS processes (pytest-xdist; default: the cores, at most 4). Each
#                 test there runs with one torch thread, so two workers use a 2-core machine
#                 fully: 63 s against 90.5 s in one process (benchmarks/README.md, "Test suite")
#
# TORCH_SPEC is the torch release we test against. On Linux, PyPI's wheel of it is the CUDA
# build, so GPU machines get CUDA; where a local CPU wheel of the same release is offered
# (pip find-links), pip takes that. Override freely: make test TORCH_SPEC='torch>=2.6'.
# The rest is installed with uv (from PyPI, into the same venv): 55 s from a clean clone against
# 3 min 41 s with pip on the same 2-core machine (benchmarks/README.md, "Test suite"). uv reads
# its own settings (UV_INDEX_URL, uv.toml), not pip.conf; to install with pip instead:
#   make test INSTALL='.venv/bin/python -m pip install --quiet'
# (the venv's own pip: pip 26.3 was seen backtracking for over 10 minutes on this dependency set).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
INSTALL ?= $(BIN)/uv pip install --quiet --python $(BIN)/python
# Each worker imports torch, Ray, Prefect and MLflow (~1 GB resident), hence the cap.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed, found " + sys.version.split()[0] + "; run: make PYTHON=python3.11 ...")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" "uv>=0.9"
	$(INSTALL) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffusion-pipeline run

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration and not slow" -n $(TEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/pipeline_run.py

clean:
	rm -rf $(VENV) pipeline-data .pytest_cache
