"""The op's three modes (lean, partial, fast) against the float64 reference and against each other, for both
spellings of the folds; poisoned outputs and scratch buffers; the fast plan's crossover."""
import os

import pytest
import torch

from pydistill import token_stats
from pydistill.token_stats import fast, loop
from pydistill.token_stats import folds as torch_folds
from pydistill.token_stats.config import StatsConfig
from tests.helpers import assert_no_worse_than_eager, eager_low_precision, make_inputs, run, upstream

IMPLS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
MODES = ("lean", "partial", "fast")
CASES = [  # (divergence, beta, clip, temperature, softcap, bias, separate teacher, teacher width, teacher T,
    #          teacher softcap: None the student's, 0 none)
    (None, 0.5, None, 1.0, None, False, False, None, None, None),
    ("forward_kl", 0.5, None, 0.7, None, True, False, None, None, None),
    ("reverse_kl", 0.5, 0.03, 1.3, 4.0, False, False, None, 0.6, None),
    ("jsd", 0.3, None, 1.0, 2.5, True, True, None, 0.5, None),
    ("jsd", 0.6, 0.02, 0.8, None, False, False, 17, None, None),
    ("forward_kl", 0.5, 0.05, 1.0, 3.0, False, True, None, 1.7, None),
    ("forward_kl", 0.5, 0.05, 0.9, 2.5, True, True, None, 0.7, 0),  # capped student, uncapped teacher
    ("reverse_kl", 0.5, 0.03, 1.0, None, False, False, 17, None, 3.0),  # uncapped student, capped teacher
    ("jsd", 0.4, 0.02, 1.2, 2.0, False, False, None, None, 5.0),  # two caps, one shared head
]


@pytest.fixture(autouse=True)
def small_fast_blocks(monkeypatch):
    """Blocks of a few rows, so that the tests' odd shapes take several fast blocks and partial plans."""
    monkeypatch.setitem(fast.MIN_FAST_BLOCK_ROWS, "cpu", 4)


def _rel(got, want):
    return ((got - want).norm() / (want.norm() + 1e-30)).item()


def _budget(mode, n, width, vocab, *, dtype=torch.float32, outputs=3, two=True, shared=True, triton=False):
    """A budget giving ``mode``: the fast plan's answer decides, so the test follows the plan's accounting."""
    if mode == "fast":
        return 1e5
    plan = lambda b: fast.plan_fast(n, width, vocab, dtype, torch.device("cpu"), outputs=outputs,  # noqa: E731
                                    two_contexts=two, shared_head=shared, triton_folds=triton, budget_mb=b)
    for i in range(400):
        b = 0.01 * 1.05 ** i
        p = plan(b)
        if mode == "lean" and p is None and i > 0:
            return b
        if mode == "partial" and p is not None and 0 < p.fast_rows < n:
            return b
    raise AssertionError(f"no budget gives the {mode} mode")


@pytest.fixture
def record_modes(monkeypatch):
    """Rows handed to the fast forward and to the lean forward, call by call."""
    seen = {"fast": [], "lean": []}
    real_fast, real_lean = fast.fast_forward, loop.stats_forward
    monkeypatch.setattr(fast, "fast_forward", lambda f, p, h, *a, **k: seen["fast"].append(h.shape[0])
                        or real_fast(f, p, h, *a, **k))
    monkeypatch.setattr(loop, "stats_forward", lambda f, p, h, *a, **k: seen["lean"].append(h.shape[0])
                        or real_lean(f, p, h, *a, **k))
    return seen


def _check_mode(seen, mode, n):
    if mode == "fast":
        assert seen == {"fast": [n], "lean": []}, seen
    elif mode == "lean":
        assert seen == {"fast": [], "lean": [n]}, seen
    else:
        assert len(seen["fast"]) == 1 and len(seen["lean"]) == 1 and sum(seen["fast"] + seen["lean"]) == n, seen


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_every_mode_matches_fp64_and_the_others(impl, mode, case, record_modes, monkeypatch):
    """Odd shapes, several vocabulary chunks (an odd last one), ignored rows, every divergence and option."""
    monkeypatch.setitem(loop.MAX_COLS, "cpu", 384)  # 1000 columns: chunks of 384, 384, 232
    div, beta, clip, temperature, softcap, bias, separate, teacher_width, teacher_temperature, teacher_cap = case
    if impl == "triton" and teacher_cap is not None and mode != "lean":
        pytest.skip("every mode launches the same kernels: the lean one covers the teacher caps' in the interpreter")
    n, width, vocab = 37, 24, 1000
    inputs = make_inputs(n=n, width=width, vocab=vocab, bias=bias, separate_teacher=separate,
                         teacher_width=teacher_width, ignore_rows=(3, 20), seed=31)
    active = n - 2
    grads = upstream(n, seed=32)
    opts = dict(divergence=div, beta=beta, clip=clip, temperature=temperature, softcap=softcap,
                teacher_temperature=teacher_temperature, teacher_softcap=teacher_cap)
    budget = _budget(mode, active, width, vocab, outputs=3 if div else 2, two=div is not None,
                     shared=not separate and teacher_width is None, triton=impl == "triton")
    got = run(token_stats, inputs, grads, impl=impl, memory_budget_mb=budget, **opts)
    _check_mode(record_modes, mode, active)
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    for i, (g, w) in enumerate(zip(got, want)):
        assert _rel(g, w) < 2e-6, (i, _rel(g, w))
    assert got[3][3].abs().sum() == 0 and got[0][20] == 0
    lean = run(token_stats, inputs, grads, impl=impl, differentiated=(), **opts)
    for g, w in zip(got, lean):
        assert _rel(g, w) < 2e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["partial", "fast"])
@pytest.mark.parametrize("div", [None, ("jsd", 0.3), ("forward_kl", 0.5)])
def test_low_precision_modes_no_worse_than_eager(dtype, mode, div, record_modes):
    """CCE's rule, |impl - fp64| <= |eager low-precision torch - fp64| + tol, in the partial and fast modes."""
    n, width, vocab = 33, 40, 1111
    inputs = make_inputs(n=n, width=width, vocab=vocab, dtype=dtype, seed=7)
    grads = upstream(n, seed=8)
    opts = dict(divergence=None if div is None else div[0], beta=0.5 if div is None else div[1])
    budget = _budget(mode, n, width, vocab, dtype=dtype, outputs=3 if div else 2, two=div is not None)
    got = run(token_stats, inputs, grads, impl="torch", memory_budget_mb=budget, **opts)
    _check_mode(record_modes, mode, n)
    truth = run(token_stats, inputs, grads, impl="eager", **opts)
    assert_no_worse_than_eager(got, run(eager_low_precision, inputs, grads, **opts), truth)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_output_declared_and_the_lean_fallback(impl, record_modes):
    """One declared output: the basis serves the backward. A gradient on another output, or a second backward
    through a retained graph, runs the lean sweep and is still exact."""
    inputs = make_inputs(n=23, width=16, vocab=500, seed=41)
    h, w, ht, y = inputs["hidden"], inputs["weight"], inputs["teacher_hidden"], inputs["targets"]
    kw = dict(targets=y, teacher_hidden=ht, divergence="jsd", beta=0.4, clip=0.05, impl=impl)
    ref = token_stats(h, w, impl="eager", **{k: v for k, v in kw.items() if k != "impl"})
    rows = torch.rand(23, generator=torch.Generator().manual_seed(43)) + 0.5  # a per-row upstream gradient
    g_ref = torch.autograd.grad((ref.divergence * rows).sum() + 0.3 * ref.logp.sum(), (h, w), retain_graph=True)
    g_div = torch.autograd.grad((ref.divergence * rows).sum(), (h, w))
    out = token_stats(h, w, differentiated=("divergence",), **kw)
    backward = []
    real = fast.fast_backward
    fast.fast_backward = lambda *a, **k: backward.append(1) or real(*a, **k)
    try:
        got = torch.autograd.grad((out.divergence * rows).sum(), (h, w), retain_graph=True)
        assert backward == [1] and record_modes["fast"] == [23]
        again = torch.autograd.grad((out.divergence * rows).sum(), (h, w))  # basis consumed: the lean sweep
        assert backward == [1]
        out = token_stats(h, w, differentiated=("divergence",), **kw)
        mixed = torch.autograd.grad((out.divergence * rows).sum() + 0.3 * out.logp.sum(), (h, w))
        assert backward == [1]
    finally:
        fast.fast_backward = real
    for a, b in zip(got + again + mixed, g_div + g_div + g_ref):
        assert _rel(a, b) < 2e-6


def test_no_basis_without_a_backward(record_modes):
    inputs = make_inputs(n=11, width=8, vocab=90, seed=42)
    with torch.no_grad():
        token_stats(inputs["hidden"], inputs["weight"], targets=inputs["targets"])
    token_stats(inputs["hidden"].detach(), inputs["weight"].detach(), targets=inputs["targets"])
    assert record_modes["fast"] == [] and record_modes["lean"] == [11, 11]


@pytest.mark.parametrize("bad,match", [
    (dict(differentiated="logp"), "differentiated must be a sequence"),
    (dict(differentiated=("divergence",)), r"differentiated names \['divergence'\]"),
    (dict(differentiated=("logits",)), r"differentiated names \['logits'\]"),
])
def test_bad_differentiated_names_the_argument(bad, match):
    inputs = make_inputs(n=5, width=8, vocab=40)
    with pytest.raises(ValueError, match=match):
        token_stats(inputs["hidden"], inputs["weight"], targets=inputs["targets"], **bad)


def test_fast_plan_crossover(monkeypatch):
    monkeypatch.setitem(fast.MIN_FAST_BLOCK_ROWS, "cpu", 32)
    cpu = torch.device("cpu")
    plan = lambda b, n=2048: fast.plan_fast(n, 576, 49152, torch.float32, cpu, outputs=1,  # noqa: E731
                                            two_contexts=True, shared_head=True, triton_folds=False, budget_mb=b)
    full = plan(4096)
    assert full.fast_rows == 2048 and full.lean_budget_mb == 4096
    part = plan(256)
    assert 0 < part.fast_rows < 2048 and part.fast_rows % part.rows == 0
    assert part.fast_rows * 49152 * 4 / 2 ** 20 + loop.LEAN_BUDGET_MB / 2 <= 256 + 1e-9
    assert plan(16) is None  # not even one 32-row block with its resident logits
    bigger = plan(1024, n=8192)
    assert part.fast_rows < bigger.fast_rows < 8192  # the gain grows with the budget
    # the target shape on CUDA (bf16 basis): lean at 256 MB, partial at 1 GiB, fast at the 4 GiB default
    gpu = lambda b: fast.plan_fast(8192, 4096, 151936, torch.bfloat16, torch.device("cuda"), outputs=1,  # noqa: E731
                                   two_contexts=True, shared_head=True, triton_folds=True, budget_mb=b)
    assert gpu(256) is None and 0 < gpu(1024).fast_rows < 8192 and gpu(4096).fast_rows == 8192


@pytest.fixture
def poisoned(monkeypatch):
    """Every float buffer the op allocates with torch.empty / empty_like starts as NaN: an element meant to be
    written and left alone shows up in the outputs or gradients."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_like(*a, **k)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES + ("lean_one_block",))
@pytest.mark.parametrize("div", [("jsd", 0.3, 0.05), ("reverse_kl", 0.5, None), (None, 0.5, None)])
def test_poisoned_buffers_are_written_everywhere(impl, mode, div, poisoned, monkeypatch):
    """Several row blocks (or one), vocabulary groups and chunks in every mode: dW written for every group,
    dlogits and basis for every chunk, no NaN left anywhere, and the float64 answer."""
    monkeypatch.setitem(loop.MAX_COLS, "cpu", 256)
    monkeypatch.setattr(loop, "MAX_GROUP_CHUNKS", 2)
    n, width, vocab = 45, 12, 1100
    inputs = make_inputs(n=n, width=width, vocab=vocab, seed=51)
    grads = upstream(n, seed=52)
    opts = dict(divergence=div[0], beta=div[1], clip=div[2])
    if mode.startswith("lean"):
        budget = 0.05 if mode == "lean" else 1e5
        opts["differentiated"] = ()
    else:
        budget = _budget(mode, n, width, vocab, outputs=3 if div[0] else 2, two=div[0] is not None,
                         triton=impl == "triton")
    got = run(token_stats, inputs, grads, impl=impl, memory_budget_mb=budget, **opts)
    opts.pop("differentiated", None)
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all() and _rel(g, w) < 2e-6


def _fold_module(impl):
    if impl == "triton":
        from pydistill.kernels import folds as triton_folds

        return triton_folds
    return torch_folds


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", [StatsConfig(divergence="jsd", beta=0.3, clip=0.05, softcap=3.0, has_targets=True),
                                 StatsConfig(has_targets=True)])
def test_folds_write_their_chunk_and_nothing_past_it(impl, cfg):
    """Each fold's output is a view into a larger sentinel-filled buffer: every element of the view is written
    (no sentinel left inside), none outside it (a mask off by one at a chunk's end shows here)."""
    folds = _fold_module(impl)
    rows, cols, sentinel = 5, 1000 + 37, 1234.5  # an odd width past a whole number of Triton blocks
    g = torch.Generator().manual_seed(61)
    z_s, z_t = torch.randn(rows, cols, generator=g) * 3, torch.randn(rows, cols, generator=g) * 3
    two = cfg.divergence is not None
    y = torch.tensor([0, cols - 1, 7, -1, 500])
    state = torch.full((torch_folds.STATE_ROWS, rows + 3), sentinel)
    view = state[:, 1:rows + 1]
    view.zero_()
    view[torch_folds.M_S] = view[torch_folds.M_T] = -float("inf")
    folds.forward_fold(z_s.clone(), z_t.clone() if two else None, view, y, 0, cfg)
    assert (state[:, 0] == sentinel).all() and (state[:, rows + 1:] == sentinel).all()
    lse_s = loop._lse(view, torch_folds.M_S, torch_folds.S_S)
    lse_t = loop._lse(view, torch_folds.M_T, torch_folds.S_T)
    sums = torch.full((2, rows + 2), sentinel)
    sums[:, 1:rows + 1] = 0
    if two:
        folds.divergence_fold(z_s.clone(), z_t.clone(), lse_s, lse_t, sums[:, 1:rows + 1], cfg)
        assert (sums[:, 0] == sentinel).all() and (sums[:, rows + 1] == sentinel).all()
    entropy, grad_sum = torch.rand(rows, generator=g), sums[1, 1:rows + 1].clone()
    gl, ge, gd = (torch.randn(rows, generator=g) for _ in range(3))
    out = torch.full((rows + 2, cols + 9), sentinel)
    folds.backward_fold(z_s.clone(), z_t.clone() if two else None, lse_s, lse_t, entropy, grad_sum, gl, ge, gd, y,
                        0, cfg, out[1:rows + 1, 4:cols + 4])
    inside = out[1:rows + 1, 4:cols + 4]
    assert not (inside == sentinel).any() and torch.isfinite(inside).all()
    outside = out.clone()
    outside[1:rows + 1, 4:cols + 4] = sentinel
    assert (outside == sentinel).all()
