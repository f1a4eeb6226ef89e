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

.PHONY: setup demo test lint unit bench bench-quality bench-models clean

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

# Three pytest workers (pytest-xdist), each with its own embedded broker: the suite mostly waits on
# brokers, group joins and subprocesses (CPU ~45% of one core serially), so on 2 cores it goes from
# 18 m 35 s serially to 6 m 57 s (measured 2026-12-07, 717 tests).
test: lint
	$(BIN)/python -m pytest -n 3 --dist worksteal

# The fast subset: no test that talks to a broker (those are marked `integration`, see tests/conftest.py).
unit: setup
	$(BIN)/python -m pytest -m "not integration"

bench: setup
	$(BIN)/python -m bench.run --quick

# Learning quality: the worker's defaults against River's on real and drifting streams (needs river and
# scikit-learn); prints the table and writes runs/quality.json. See bench/README.md, "Quality".
bench-quality: setup
	$(BIN)/python -m bench.quality

# Users' own modules against the built-in model: in memory, the worker end to end, cold and warm
# starts of the compiled paths. See bench/README.md, "Custom models".
bench-models: setup
	$(BIN)/python -m bench.custom_models

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs
