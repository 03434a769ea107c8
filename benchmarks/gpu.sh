#!/bin/sh
# The GPU session in one command, offline, with the machine's own python3 (CUDA torch):
#   sh benchmarks/gpu.sh OUT        (from the repository root; `make gpu GPU_OUT=OUT` runs this)
# A shell script rather than only a Makefile recipe: nothing says the GPU image has make.
# Installs take seconds: the package in editable mode (or, where the image's setuptools cannot build it, the
# kernels/ folder linked to where pydistill.kernels is looked for) and the baselines the image lacks from the
# wheels in .whl/ (`make gpu-wheels` on a machine with PyPI). t0 is taken before the installs, so the session's
# "no job starts after GPU_BUDGET_S" counts them too.
out=${1:?usage: sh benchmarks/gpu.sh OUT}
t0=$(date +%s)
python=${GPU_PYTHON:-python3}
site=${GPU_SITE:-/tmp/pydistill-gpu-site}
mkdir -p "$out"
"$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  || { [ -e pydistill/kernels ] || ln -s ../kernels pydistill/kernels; }
if [ -d .whl ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl \
    || echo "baseline wheels not installed: their cases are recorded as such"
fi
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 exec "$python" -m benchmarks.gpu --out "$out" \
  --t0 "$t0" --budget-s "${GPU_BUDGET_S:-480}" --hard-s "${GPU_HARD_S:-570}"
