"""pytest-benchmark entry points (`pytest benchmarks/ --benchmark-only`); small shapes so they run anywhere."""
import pytest
import torch

from benchmarks.cases import CASES, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASE_NAMES = ["core-eager", "core-chunked", "mask0-chunked", "mask50-chunked"] + (
    ["core-triton", "mask50-triton"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("case", CASE_NAMES)
def test_core_op(benchmark, case):
    n, h, v = (4096, 1024, 32768) if DEVICE == "cuda" else (256, 128, 4096)
    step = CASES[case](*make_inputs(n, h, v, torch.float32, DEVICE))
    benchmark(step)
