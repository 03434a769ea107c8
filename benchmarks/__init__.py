"""pydistill benchmarks: `python -m benchmarks` (sweep, fresh process per case) or
`pytest benchmarks/ --benchmark-only` (pytest-benchmark)."""
