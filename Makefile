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
#   make lock  — re-resolve requirements.lock from pyproject.toml (after changing a dependency)
#   make test-min — the fast tier on the lowest versions pyproject.toml allows, in a temporary
#                 venv (infra/check-min-versions.sh; needs PyPI, 10-15 minutes)
#
# Installs are reproducible: requirements.lock pins every package but torch, for every platform
# and Python 3.11+ (uv pip compile --universal). It is installed as it stands (--no-deps: nothing
# is re-resolved), then the project itself, then `uv pip check` proves the set consistent.
# torch is left out of the lock on purpose: a universal lock would pin its CUDA libraries (3 GB)
# for every Linux install. TORCH_SPEC is the torch release we test against, installed with pip
# and the lock as constraints (torch's own dependencies at their locked versions). On Linux,
# PyPI's wheel of it is the CUDA build (its CUDA libraries pinned exactly by torch itself), so GPU
# machines get CUDA; where a local CPU wheel of the same release is offered (pip find-links), pip
# takes that. Override freely: make test TORCH_SPEC='torch>=2.6'.
# The lock is installed with uv (from PyPI, into the same venv). uv reads its own settings
# (UV_INDEX_URL, uv.toml), not pip.conf; to install with pip instead:
#   make test INSTALL='.venv/bin/python -m pip install --quiet'
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The uv that installs the lock and that `make lock` compiles it with.
UV_SPEC ?= uv==0.13.10
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
INSTALL ?= $(BIN)/uv pip install --quiet --python $(BIN)/python
# Each worker imports torch, Ray, Prefect and MLflow (~1 GB resident), hence the cap.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

LOCK := requirements.lock

.PHONY: demo test test-fast test-min lint lock bench clean

$(BIN)/uv:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed, found " + sys.version.split()[0] + "; run: make PYTHON=python3.11 ...")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(UV_SPEC)"

$(STAMP): pyproject.toml Makefile $(LOCK) | $(BIN)/uv
	$(BIN)/python -m pip install --quiet -c $(LOCK) "$(TORCH_SPEC)"
	$(INSTALL) --no-deps -r $(LOCK)
	$(INSTALL) --no-deps -e .
	$(BIN)/uv pip check --python $(BIN)/python
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffusion-pipeline run

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration and not slow" -n $(TEST_WORKERS)

test-min:
	PYTHON=$(PYTHON) TORCH_SPEC='$(TORCH_SPEC)' UV_SPEC='$(UV_SPEC)' infra/check-min-versions.sh

# The dev extra is locked too (make test installs it); torch is excluded (infra/lock-excludes.txt).
# Pins already in the lock are kept where pyproject.toml still allows them; to move every package
# to its newest release: rm requirements.lock && make lock.
lock: | $(BIN)/uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--excludes infra/lock-excludes.txt --custom-compile-command "make lock" \
		--quiet --output-file $(LOCK)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/pipeline_run.py

clean:
	rm -rf $(VENV) pipeline-data .pytest_cache
