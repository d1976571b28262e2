# stealguard: `make setup`, `make demo`, `make test` (see README).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The CPU build of torch: pinned so pip takes the local CPU wheel instead of several GB of CUDA
# packages. On a CUDA machine, install torch for your CUDA first and run `make setup TORCH=`.
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,ray,onnx,art
STEALGUARD_DATA ?= $(abspath ../shared/datasets)
export STEALGUARD_DATA

.PHONY: setup demo test test-slow bench gpu-check lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/stealguard demo

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

bench: setup
	$(PY) benchmarks/bench_training.py

# The prepared device check (issue #17): on one CUDA GPU, <= 8 minutes; writes results/gpu/.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
