"""pydistill benchmarks.

- ``python -m benchmarks``: the op/loss sweep, each case in a fresh process (results.json, results.md, PNGs);
- ``python -m benchmarks.trainer_step``: a full OPSD trainer step, fused vs eager loss, batch doubled to OOM;
- ``python -m benchmarks.report --readme RESULTS_JSON ...``: the README results section from recorded runs;
- ``pytest benchmarks/ --benchmark-only``: the same cases at small shapes under pytest-benchmark.
"""
