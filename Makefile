# Two entry points: `make demo` and `make test`. Both create .venv and install
# the project into it; the install step re-runs only when pyproject.toml changes.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip's extra local indexes on some machines print one warning per package;
# they are harmless, so keep the install log readable.
PIP_QUIET := -q --disable-pip-version-check

.PHONY: demo test lint format install clean

install: $(STAMP)

# torch goes in first and pinned: on CPU machines that is the CPU wheel, and the
# project install after it then has nothing to swap for a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_QUIET) torch==2.13.0 2>&1 | { grep -v "is ignored" || true; }
	$(BIN)/python -m pip install $(PIP_QUIET) -e '.[test]' 2>&1 | { grep -v "is ignored" || true; }
	$(BIN)/python -c "import torch, transformers, ray, pyarrow, s3fs, PIL, moto, kubernetes_validate, pycocotools"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jobs.demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) outputs demo_data .pytest_cache .ruff_cache
