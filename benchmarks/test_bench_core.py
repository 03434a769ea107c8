"""pytest-benchmark entry points (`pytest benchmarks/ --benchmark-only`); small shapes so they run anywhere.

A case that cannot run here (Triton without CUDA, Liger or CCE not installed) is skipped with its reason;
the sweep (`python -m benchmarks`) records those as "not run: <reason>" instead.
"""
import pytest
import torch

from benchmarks.cases import CASES, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (4096, 1024, 32768) if DEVICE == "cuda" else (256, 128, 4096)  # N, H, V

CORE = [f"core-{d}{c}-{i}" for d in ("forward_kl", "reverse_kl", "jsd") for c in ("", "-clip")
        for i in ("eager", "torch", "triton")]
CE = ["ce-eager", "ce-torch", "ce-triton", "ce-cce"]
LOSSES = [f"{family}-{impl}" for family in ("distill", "grpo") for impl in ("eager", "ours", "liger")]
MASKS = [f"mask{p}-{impl}" for p in (0, 25, 50, 75) for impl in ("torch", "triton")]
COMPILED = ["core-reverse_kl-compile", "ce-compile"]


def _run(benchmark, name):
    case = CASES[name]
    reason = case.unavailable(DEVICE)
    if reason:
        pytest.skip(reason)
    n, h, v = SHAPE
    step = case.build(make_inputs(n, h, v, torch.float32, DEVICE))
    step()  # warm-up outside the timing (compiles, autotunes)
    benchmark.extra_info.update(case=name, n=n, h=h, v=v, flops=case.flops(n, h, v))
    if DEVICE == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
        benchmark(timed)
    else:
        benchmark(step)


@pytest.mark.parametrize("case", CORE)
def test_core_op(benchmark, case):
    _run(benchmark, case)


@pytest.mark.parametrize("case", CE)
def test_logp_entropy(benchmark, case):
    _run(benchmark, case)


@pytest.mark.parametrize("case", LOSSES)
def test_losses(benchmark, case):
    _run(benchmark, case)


@pytest.mark.parametrize("case", MASKS)
def test_first_error_mask(benchmark, case):
    _run(benchmark, case)


@pytest.mark.parametrize("case", COMPILED)
def test_torch_compile(benchmark, case):
    _run(benchmark, case)


@pytest.mark.parametrize("loss", ["fused", "eager"])
def test_opsd_trainer_step(benchmark, loss):
    """Case (6) at a small scale: one OPSD step (fixed rollout) of a 2-layer SmolLM2-shaped random model."""
    from benchmarks.trainer_step import make_trainer

    trainer, _ = make_trainer(loss, 2, layers=2, device=DEVICE, dtype="bfloat16" if DEVICE == "cuda" else "float32",
                              completion_len=64)
    trainer.training_step()  # warm-up: optimizer states
    benchmark.extra_info.update(loss=loss, tokens=trainer.fixed_batch["tokens"])
    benchmark.pedantic(trainer.training_step, rounds=3, iterations=1)
