# Targets a user and CI run. `make install` pins the CPU build of torch first so pip never pulls a CUDA build.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-slow lint format

install:
	$(PYTHON) -m pip install --quiet "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --quiet -c .ci/constraints.txt -e ".[dev]"

test:
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q

test-slow:
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q -m slow

lint:
	$(PYTHON) -m ruff check hf_distill tests
	$(PYTHON) -m ruff format --check hf_distill tests

format:
	$(PYTHON) -m ruff check --fix hf_distill tests
	$(PYTHON) -m ruff format hf_distill tests
