# Quick start:   make demo    (set up, then watch a model learn from a live Kafka stream)
#                make test    (lint, type-check and the whole test suite)
#
# TORCH_SPEC picks the PyTorch build installed before the package. Its default,
# torch==2.13.0, is the CPU build this project's machines keep on disk; set
# TORCH_SPEC=torch (or your own pin / index) elsewhere. The package itself
# depends on plain `torch`, so any build a user already has satisfies it.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/streamtrainer demo

lint: setup
	$(BIN)/ruff check streamtrainer tests
	$(BIN)/ruff format --check streamtrainer tests
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

# The fast subset: no test that talks to a broker (those are marked `integration`, see tests/conftest.py).
unit: setup
	$(BIN)/python -m pytest -m "not integration"

bench: setup
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs
