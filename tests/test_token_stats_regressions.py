"""Regression tests of defects found in earlier versions of the core op, for both spellings of the folds,
plus the memory plan and the options that only the chunk loop has (row blocks, the budget)."""
import os

import pytest
import torch

from pydistill import token_stats
from pydistill.token_stats import loop
from tests.helpers import make_inputs, run, upstream

# These tests build CPU tensors: the Triton folds join under the interpreter (on a GPU machine,
# test_triton_token_stats.py runs them natively on CUDA tensors).
IMPLS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def _rel(got, want):
    return ((got - want).norm() / (want.norm() + 1e-30)).item()


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_targets_and_bias(impl):
    """A column slice of a [N, 2] id tensor and a strided bias are read by value, not as dense memory."""
    inputs = make_inputs(n=23, width=16, vocab=300, bias=True, seed=11)
    ids = torch.stack([torch.randint(0, 300, (23,)), inputs["targets"]], dim=1)
    inputs["targets"] = ids[:, 1]
    wide_bias = torch.stack([inputs["bias"], torch.zeros(300)], dim=1)
    inputs["bias"] = wide_bias[:, 0]
    assert not inputs["targets"].is_contiguous() and not inputs["bias"].is_contiguous()
    grads = upstream(23)
    opts = dict(divergence="reverse_kl")
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    got = run(token_stats, inputs, grads, impl=impl, **opts)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_backward_keeps_tiny_dlogits(impl):
    """Upstream gradients of 1e-7 times probabilities of ~1e-4 give dlogits ~1e-11, below float16's smallest
    subnormal: the gradient must still be right (dlogits are float32 for float16 inputs)."""
    inputs = make_inputs(n=19, width=24, vocab=2000, dtype=torch.float16, seed=12)
    grads = [g * 1e-7 for g in upstream(19, seed=13)]
    opts = dict(divergence="forward_kl")
    truth = run(token_stats, inputs, grads, impl="eager", **opts)
    got = run(token_stats, inputs, grads, impl=impl, **opts)
    assert got[3].abs().max() > 0
    assert _rel(got[3], truth[3]) < 2e-2 and _rel(got[4], truth[4]) < 2e-2


def test_float64_inputs_are_computed_in_float64():
    inputs = make_inputs(n=17, width=12, vocab=500, dtype=torch.float64, seed=14)
    grads = upstream(17, seed=15)
    opts = dict(divergence="jsd", beta=0.3, clip=0.05, temperature=0.8, softcap=5.0)
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    got = run(token_stats, inputs, grads, impl="torch", **opts)
    out = token_stats(inputs["hidden"], inputs["weight"], teacher_hidden=inputs["teacher_hidden"],
                      divergence="reverse_kl")
    assert out.divergence.dtype == torch.float64
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_never_negative_on_peaked_rows(impl):
    """Logits x100 make softmax one-hot; lse - E[z] cancelled to -3e-5 there. log s + a/s cannot go below 0."""
    inputs = make_inputs(n=31, width=16, vocab=700, seed=16)
    with torch.no_grad():
        inputs["weight"].mul_(100.0)
    out = token_stats(inputs["hidden"], inputs["weight"], impl=impl)
    assert (out.entropy >= 0).all(), out.entropy.min()
    truth = token_stats(inputs["hidden"], inputs["weight"], impl="eager").entropy
    assert (out.entropy - truth).abs().max() < 1e-5


def test_double_backward_raises_a_clear_error():
    inputs = make_inputs(n=5, width=8, vocab=40, seed=17)
    h = inputs["hidden"]
    out = token_stats(h, inputs["weight"], teacher_hidden=inputs["teacher_hidden"], divergence="forward_kl")
    with pytest.raises(RuntimeError, match="token_stats is differentiable once"):
        torch.autograd.grad(out.divergence.sum(), h, create_graph=True)
    (g,) = torch.autograd.grad(out.divergence.sum(), h)  # a first derivative still works
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("split_rows", [True, False])
def test_tiny_budgets_split_rows_and_vocabulary_with_the_same_result(impl, split_rows):
    """Row blocks (dW accumulated per group) and narrow chunks and groups give the unsplit answer."""
    budget_mb = 0.02 if split_rows else {"torch": 2.0, "triton": 0.5}[impl]
    inputs = make_inputs(n=41, width=20, vocab=1500, bias=True, separate_teacher=True, seed=18)
    plan = loop.plan_chunks(41, 20, 20, 1500, torch.float32, torch.device("cpu"), two_contexts=True,
                            shared_head=False, triton_folds=impl == "triton", budget_mb=budget_mb)
    assert plan.cols < 1500 and plan.group % plan.cols == 0
    assert (plan.rows < 41) == split_rows and (plan.group > plan.cols) != split_rows
    grads = upstream(41, seed=19)
    opts = dict(divergence="forward_kl", clip=0.03)
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    got = run(token_stats, inputs, grads, impl=impl, memory_budget_mb=budget_mb, **opts)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5


def test_default_plan_fits_256_mb_at_the_target_shape():
    """N=8192, H=4096, V=151936, bf16, two contexts, shared head, CUDA: every counted buffer within 256 MB."""
    n, h, v = 8192, 4096, 151936
    plan = loop.plan_chunks(n, h, h, v, torch.bfloat16, torch.device("cuda"), two_contexts=True, shared_head=True,
                            triton_folds=True)
    extra = 2 * plan.rows * plan.cols * 4 + plan.rows * plan.group * 2 + n * h * 4
    extra += 2 * plan.rows * h * 2 if plan.stacked else 0
    assert plan.rows == n and plan.cols >= 1024 and plan.group >= 4 * plan.cols, plan
    assert extra <= 256 * 2 ** 20, (plan, extra / 2 ** 20)


@pytest.mark.parametrize("bad,match", [
    (dict(memory_budget_mb=0), "memory_budget_mb must be"),
    (dict(memory_budget_mb=float("nan")), "memory_budget_mb must be"),
    (dict(beta=True, divergence="jsd"), r"beta must be a number in \[0, 1\]"),
    (dict(temperature=True), "temperature must be"),
    (dict(impl="chunky"), "impl must be one of"),
])
def test_more_bad_input_names_the_argument(bad, match):
    args = dict(teacher_hidden=torch.randn(4, 8), divergence="forward_kl")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        token_stats(torch.randn(4, 8), torch.randn(30, 8), **args)


def test_meta_device_is_refused_with_its_own_message():
    with pytest.raises(ValueError, match="meta device"):
        token_stats(torch.randn(4, 8, device="meta"), torch.randn(30, 8, device="meta"))


def test_shared_head_takes_one_stacked_gemm_per_chunk(monkeypatch):
    """token_stats detaches the teacher's head; it must still be recognised as the student's (one GEMM per chunk
    for both contexts), and a separate head must not be."""
    calls = []
    real_mm = loop._Operands.mm
    monkeypatch.setattr(loop._Operands, "mm", lambda self, a, b, out: calls.append(a.shape[0]) or real_mm(self, a, b, out))
    inputs = make_inputs(n=12, width=8, vocab=300, seed=20)
    token_stats(inputs["hidden"], inputs["weight"], teacher_hidden=inputs["teacher_hidden"], divergence="forward_kl")
    assert calls == [24]  # one chunk, student and teacher rows stacked
    calls.clear()
    token_stats(inputs["hidden"], inputs["weight"], teacher_hidden=inputs["teacher_hidden"],
                teacher_weight=inputs["weight"].detach().clone(), divergence="forward_kl")
    assert calls == [12, 12]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("div", [("jsd", 0.3, None), ("forward_kl", 0.5, 0.03), ("reverse_kl", 0.5, 0.02)])
def test_resident_rows_second_sweep_reuses_the_logits(impl, div, monkeypatch):
    """JSD / clip with whole-vocabulary row blocks (two blocks here): one GEMM per block in the forward, none
    for a second sweep, and the same answer as float64."""
    budget = {"torch": 3.2, "triton": 0.45}[impl]
    plan = loop.plan_resident(41, 20, 1500, torch.float32, torch.device("cpu"), shared_head=True,
                              triton_folds=impl == "triton", budget_mb=budget)
    assert plan is not None and 32 <= plan.rows < 41 and plan.cols == 1500
    calls = []
    real_mm = loop._Operands.mm
    monkeypatch.setattr(loop._Operands, "mm", lambda self, a, b, out: calls.append(a.shape[0]) or real_mm(self, a, b, out))
    inputs = make_inputs(n=41, width=20, vocab=1500, seed=21)
    grads = upstream(41, seed=22)
    opts = dict(divergence=div[0], beta=div[1], clip=div[2])
    got = run(token_stats, inputs, grads, impl=impl, memory_budget_mb=budget, differentiated=(), **opts)
    forward_gemms = [c for c in calls if c == 2 * plan.rows or c == 2 * (41 - plan.rows)]
    assert forward_gemms == [2 * plan.rows, 2 * (41 - plan.rows)]  # no second sweep
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5
