"""The chunk loop with the torch folds against the float64 eager reference."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from pydistill import token_stats
from pydistill.token_stats import fast, loop
from tests.helpers import assert_no_worse_than_eager, eager_low_precision, make_inputs, run, upstream

OPTION_GRID = list(itertools.product(
    [None, ("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)],
    [None, 0.05],
))


def _options(div, clip, **extra):
    opts = dict(divergence=None if div is None else div[0], beta=0.5 if div is None else div[1], clip=clip)
    opts.update(extra)
    return opts


def _assert_close(got, want, atol, rtol=1e-4, what=""):
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None
            continue
        err = (g - w).abs().max().item()
        assert err <= atol + rtol * w.abs().max().item(), f"{what} output {i}: max error {err:.3e}"


@pytest.mark.parametrize("div,clip", OPTION_GRID)
@pytest.mark.parametrize("separate_teacher", [False, True])
def test_torch_matches_fp64_reference(div, clip, separate_teacher):
    inputs = make_inputs(separate_teacher=separate_teacher, ignore_rows=(3, 20))
    grads = upstream(37)
    opts = _options(div, clip)
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    got = run(token_stats, inputs, grads, impl="torch", **opts)
    _assert_close(got, want, atol=2e-5, what=str(opts))
    assert got[0][3] == 0 and got[1][20] == 0 and got[3][3].abs().sum() == 0


@pytest.mark.parametrize("temperature,softcap,bias,teacher_width",
                         [(0.7, None, True, None), (1.3, 4.0, False, 17), (1.0, 2.5, True, 31)])
@pytest.mark.parametrize("div", [("forward_kl", 0.5), ("jsd", 0.3), ("reverse_kl", 0.5)])
@pytest.mark.parametrize("clip", [None, 0.02])
def test_torch_temperature_softcap_bias_teacher_width(temperature, softcap, bias, teacher_width, div, clip):
    inputs = make_inputs(n=29, width=20, vocab=777, bias=bias, teacher_width=teacher_width, seed=4)
    grads = upstream(29, seed=5)
    opts = _options(div, clip, temperature=temperature, softcap=softcap)
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    got = run(token_stats, inputs, grads, impl="torch", **opts)
    _assert_close(got, want, atol=2e-5, what=str(opts))


def test_separate_teacher_bias_defaults():
    """With a shared head the teacher reuses the student's bias; with its own head it has none unless given."""
    base = make_inputs(n=9, width=8, vocab=50, bias=True, seed=2)
    h, w, ht, b = base["hidden"], base["weight"], base["teacher_hidden"], base["bias"]
    shared = token_stats(h, w, teacher_hidden=ht, bias=b, divergence="forward_kl").divergence
    explicit = token_stats(h, w, teacher_hidden=ht, teacher_weight=w, bias=b, teacher_bias=b,
                           divergence="forward_kl").divergence
    no_teacher_bias = token_stats(h, w, teacher_hidden=ht, teacher_weight=w, bias=b,
                                  divergence="forward_kl").divergence
    torch.testing.assert_close(shared, explicit)
    assert (shared - no_teacher_bias).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["eager", "torch"])
def test_teacher_temperature_divides_the_capped_teacher_logits(impl):
    """z_t = cap(h_t W^T + b) / T_t and z_s = cap(h W^T + b) / T, written out from [N, V] logits in float64."""
    inputs = make_inputs(n=11, width=12, vocab=97, bias=True, seed=6)
    h, w, ht, b = inputs["hidden"], inputs["weight"], inputs["teacher_hidden"], inputs["bias"]
    cap = lambda x: 2.5 * torch.tanh(x / 2.5)  # noqa: E731
    z_s = cap(h.double() @ w.double().t() + b.double()) / 0.8
    z_t = cap(ht.double() @ w.double().t() + b.double()) / 0.4
    log_q, log_p = z_s.log_softmax(-1), z_t.log_softmax(-1)
    want = (log_p.exp() * (log_p - log_q)).sum(-1)
    got = token_stats(h, w, teacher_hidden=ht, bias=b, divergence="forward_kl", temperature=0.8, softcap=2.5,
                      teacher_temperature=0.4, impl=impl).divergence
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


SOFTCAP_PAIRS = [(2.5, 0), (None, 3.0), (2.5, 4.0)]  # (student cap, teacher cap; 0: the teacher has none)


@pytest.mark.parametrize("impl", ["eager", "torch"])
@pytest.mark.parametrize("softcap,teacher_softcap", SOFTCAP_PAIRS, ids=["cap-none", "none-cap", "cap-cap"])
@pytest.mark.parametrize("div", [("forward_kl", 0.5, None), ("reverse_kl", 0.5, 0.04), ("jsd", 0.3, None)])
def test_teacher_softcap_caps_the_teacher_logits_only(impl, softcap, teacher_softcap, div):
    """z_s = cap_s(h W^T + b) / T, z_t = cap_t(h_t W_t^T) / T_t (a separate head, no bias), written out in float64:
    outputs and gradients, odd shapes."""
    inputs = make_inputs(n=13, width=11, vocab=301, bias=True, teacher_width=7, seed=8)
    h, w, ht, wt, b = (inputs[k] for k in ("hidden", "weight", "teacher_hidden", "teacher_weight", "bias"))
    y = inputs["targets"]

    def capped(x, c):
        return x if not c else c * torch.tanh(x / c)

    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    log_q = (capped(h64 @ w64.t() + b.double(), softcap) / 0.8).log_softmax(-1)
    log_p = (capped(ht.double() @ wt.double().t(), teacher_softcap) / 0.6).log_softmax(-1)
    name, beta, clip = div
    q, p = log_q.exp(), log_p.exp()
    if name == "forward_kl":
        terms = p * (log_p - log_q)
    elif name == "reverse_kl":
        terms = q * (log_q - log_p)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        terms = beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m)
    want = (terms if clip is None else terms.clamp(max=clip)).sum(-1)
    want_logp = log_q.gather(1, y[:, None]).squeeze(1)
    got = token_stats(h, w, targets=y, teacher_hidden=ht, teacher_weight=wt, bias=b, divergence=name, beta=beta,
                      clip=clip, temperature=0.8, softcap=softcap, teacher_temperature=0.6,
                      teacher_softcap=teacher_softcap, impl=impl)
    torch.testing.assert_close(got.divergence.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.logp.double(), want_logp, rtol=1e-5, atol=1e-6)
    g = torch.linspace(-1, 1, 13, dtype=torch.float64)
    grads = torch.autograd.grad((got.divergence.double() * g).sum() + got.logp.double().sum(), (h, w))
    wants = torch.autograd.grad((want * g).sum() + want_logp.sum(), (h64, w64))
    for got_grad, want_grad in zip(grads, wants):
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-6)


def test_teacher_softcap_defaults_to_the_students():
    inputs = make_inputs(n=9, width=8, vocab=50, separate_teacher=True, seed=2)
    h, w, ht, wt = inputs["hidden"], inputs["weight"], inputs["teacher_hidden"], inputs["teacher_weight"]
    run_with = lambda **o: token_stats(h, w, teacher_hidden=ht, teacher_weight=wt, divergence="forward_kl",  # noqa
                                       softcap=2.0, **o).divergence
    torch.testing.assert_close(run_with(), run_with(teacher_softcap=2.0))
    assert (run_with() - run_with(teacher_softcap=0)).abs().max() > 1e-3


def test_bad_teacher_softcap_is_refused():
    inputs = make_inputs(n=4, width=8, vocab=50, seed=2)
    h, w, ht = inputs["hidden"], inputs["weight"], inputs["teacher_hidden"]
    for bad in (-1.0, float("nan"), True, "none"):
        with pytest.raises(ValueError, match=r"teacher_softcap must be None \(the student's softcap\), 0"):
            token_stats(h, w, teacher_hidden=ht, divergence="forward_kl", teacher_softcap=bad)
    with pytest.raises(ValueError, match="teacher_softcap applies to a teacher given as teacher_hidden"):
        token_stats(h, w, divergence="forward_kl", teacher_topk_ids=torch.arange(3).expand(4, 3),
                    teacher_topk_logprobs=torch.full((4, 3), -2.0), teacher_softcap=3.0)


def test_teacher_temperature_is_refused_for_a_topk_teacher():
    inputs = make_inputs(n=4, width=8, vocab=50, seed=2)
    ids = torch.arange(3).expand(4, 3)
    with pytest.raises(ValueError, match="teacher_temperature"):
        token_stats(inputs["hidden"], inputs["weight"], divergence="forward_kl", teacher_topk_ids=ids,
                    teacher_topk_logprobs=torch.full((4, 3), -2.0), teacher_temperature=0.5)
    with pytest.raises(ValueError, match="teacher_temperature must be None or a finite number > 0"):
        token_stats(inputs["hidden"], inputs["weight"], teacher_hidden=inputs["teacher_hidden"],
                    divergence="forward_kl", teacher_temperature=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("div", [None, ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_low_precision_no_worse_than_eager(dtype, div):
    """CCE's rule: |impl - fp64| <= |eager low-precision torch - fp64| + tol, for every output and gradient."""
    inputs = make_inputs(n=33, width=40, vocab=1111, dtype=dtype, seed=7)
    grads = upstream(33, seed=8)
    opts = _options(div, None)
    truth = run(token_stats, inputs, grads, impl="eager", **opts)
    got = run(token_stats, inputs, grads, impl="torch", **opts)

    assert_no_worse_than_eager(got, run(eager_low_precision, inputs, grads, **opts), truth)


def test_weight_without_grad_and_upstream_subsets():
    inputs = make_inputs(n=21, width=12, vocab=313, weight_grad=False, seed=3)
    grads = upstream(21)
    grads[1] = torch.zeros(21, dtype=torch.float64)  # entropy unused
    opts = _options(("jsd", 0.5), 0.1)
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    got = run(token_stats, inputs, grads, impl="torch", **opts)
    assert got[4] is None
    _assert_close(got, want, atol=2e-5)
    # Only one output used: the others' upstream gradients arrive as None.
    h = inputs["hidden"]
    h.grad = None
    token_stats(h, inputs["weight"], teacher_hidden=inputs["teacher_hidden"], divergence="reverse_kl").divergence.sum().backward()
    g_one = h.grad.clone()
    h.grad = None
    token_stats(h, inputs["weight"], teacher_hidden=inputs["teacher_hidden"], divergence="reverse_kl",
                impl="eager").divergence.sum().backward()
    torch.testing.assert_close(g_one, h.grad, atol=2e-5, rtol=1e-4)


def test_all_masked_gives_zeros_and_zero_grads():
    inputs = make_inputs(n=6, width=8, vocab=40)
    h, w = inputs["hidden"], inputs["weight"]
    out = token_stats(h, w, targets=torch.full((6,), -100), teacher_hidden=inputs["teacher_hidden"],
                      divergence="jsd", clip=0.1)
    loss = out.logp.sum() + out.entropy.sum() + out.divergence.sum()
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    out = token_stats(h, w, mask=torch.zeros(6, dtype=torch.bool))
    out.entropy.sum().backward()
    assert not torch.isnan(h.grad).any()


def test_mask_gathers_rows_out(monkeypatch):
    """Masked rows never reach the backend: only active rows are handed to the sweeps."""
    seen = []
    real_forward, real_backward = loop.stats_forward, loop.stats_backward
    monkeypatch.setattr(loop, "stats_forward", lambda f, p, h, *a, **k: seen.append(h.shape[0]) or real_forward(f, p, h, *a, **k))
    monkeypatch.setattr(loop, "stats_backward", lambda f, p, h, *a, **k: seen.append(h.shape[0]) or real_backward(f, p, h, *a, **k))
    inputs = make_inputs(n=20, width=8, vocab=64)
    mask = torch.arange(20) % 2 == 0
    real_fast = fast.fast_forward
    monkeypatch.setattr(fast, "fast_forward", lambda f, p, h, *a, **k: seen.append(-h.shape[0]) or real_fast(f, p, h, *a, **k))
    for differentiated, want in (((), [10, 10]), (None, [-10])):  # lean: both sweeps; fast: the forward only
        seen.clear()
        out = token_stats(inputs["hidden"], inputs["weight"], mask=mask.float(), targets=inputs["targets"],
                          differentiated=differentiated)
        out.logp.sum().backward()
        assert seen == want
    assert torch.all(out.logp[~mask] == 0) and torch.all(inputs["hidden"].grad[~mask] == 0)


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("div", [("reverse_kl", 0.5), ("jsd", 0.5)])
def test_torch_never_allocates_n_by_v(div):
    """Every tensor produced by any op in forward and backward stays far below N x V elements."""
    n, width, vocab = 512, 32, 20000
    inputs = make_inputs(n=n, width=width, vocab=vocab, seed=9)
    tracker = _LargestAllocation()
    with tracker:
        out = token_stats(inputs["hidden"], inputs["weight"], targets=inputs["targets"],
                          teacher_hidden=inputs["teacher_hidden"], divergence=div[0], beta=div[1], clip=0.05,
                          memory_budget_mb=8, differentiated=())  # () pins the lean mode; fast keeps [F, V]
        (out.logp.sum() + out.entropy.sum() + out.divergence.sum()).backward()
    plan = loop.plan_chunks(n, width, width, vocab, torch.float32, torch.device("cpu"), two_contexts=True,
                            shared_head=True, triton_folds=False, budget_mb=8)
    tile = 2 * plan.rows * plan.cols  # both contexts' logits chunk
    assert tracker.largest <= max(tile, vocab * width), (tracker.largest, n * vocab)
    assert tracker.largest < n * vocab / 4
    # the same tracker sees the eager reference's [N, V] logits, so it can fail
    eager = _LargestAllocation()
    with eager:
        token_stats(inputs["hidden"], inputs["weight"], targets=inputs["targets"], impl="eager")
    assert eager.largest >= n * vocab


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 23), width=st.integers(1, 19), vocab=st.integers(2, 300),
       div=st.sampled_from([None, "forward_kl", "reverse_kl", "jsd"]), beta=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
       clip=st.sampled_from([None, 0.01, 0.3]), temperature=st.sampled_from([0.5, 1.0, 2.0]),
       softcap=st.sampled_from([None, 3.0]), seed=st.integers(0, 2 ** 16))
def test_hypothesis_shapes_and_options(n, width, vocab, div, beta, clip, temperature, softcap, seed):
    inputs = make_inputs(n=n, width=width, vocab=vocab, seed=seed, ignore_rows=(0,) if n > 2 else ())
    grads = upstream(n, seed=seed + 1)
    opts = dict(divergence=div, beta=beta, clip=clip, temperature=temperature, softcap=softcap)
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    got = run(token_stats, inputs, grads, impl="torch", **opts)
    _assert_close(got, want, atol=3e-5, what=str(opts))
    for t in got[:3]:
        assert torch.isfinite(t).all()


def test_beta_endpoints_are_the_kls():
    inputs = make_inputs(n=11, width=10, vocab=97)
    h, w, ht = inputs["hidden"], inputs["weight"], inputs["teacher_hidden"]
    for beta, name in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        torch.testing.assert_close(token_stats(h, w, teacher_hidden=ht, divergence="jsd", beta=beta).divergence,
                                   token_stats(h, w, teacher_hidden=ht, divergence=name).divergence)
    mid = token_stats(h, w, teacher_hidden=ht, divergence="jsd", beta=1e-9).divergence
    assert mid.abs().max() < 1e-6  # the JSD formula itself vanishes at the endpoints


@pytest.mark.parametrize("bad,match", [
    (dict(hidden=torch.randn(4, 8, 2)), "hidden must be 2-D"),
    (dict(weight=torch.randn(30, 7)), r"weight must have shape \[V, H\] with H=8"),
    (dict(weight=torch.randn(30, 8, dtype=torch.float64)), "weight dtype"),
    (dict(hidden=torch.randn(4, 8).to(torch.int32)), "hidden must be float32"),
    (dict(teacher_weight=torch.randn(31, 8)), "teacher_weight must have V=30"),
    (dict(teacher_weight=torch.randn(30, 5)), r"teacher_weight must have shape \[V, H_t\]"),
    (dict(teacher_hidden=torch.randn(5, 8)), "teacher_hidden must have N=4"),
    (dict(temperature=0.0), "temperature must be"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(beta=1.5), r"beta must be a number in \[0, 1\]"),
    (dict(beta=-0.1), r"beta must be a number in \[0, 1\]"),
    (dict(clip=0.0), "clip"),
    (dict(clip=-2.0), "clip"),
    (dict(softcap=0.0), "softcap"),
    (dict(targets=torch.tensor([0, 1, 30, 2])), r"targets must be in \[0, V=30\)"),
    (dict(targets=torch.tensor([0, 1, -5, 2])), r"targets must be in \[0, V=30\)"),
    (dict(targets=torch.tensor([0, 1, 2])), r"targets must have shape \[N\]=\[4\]"),
    (dict(targets=torch.tensor([0.0, 1, 2, 3])), "targets must be int64"),
    (dict(mask=torch.ones(5, dtype=torch.bool)), r"mask must have shape \[N\]=\[4\]"),
    (dict(divergence="kl"), "divergence must be one of"),
    (dict(divergence=None), "divergence must be set"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(bias=torch.randn(29)), r"bias must have shape \[V\]=\[30\]"),
    (dict(teacher_hidden=None), "teacher_hidden .* is required"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(30, 8), teacher_hidden=torch.randn(4, 8),
                teacher_weight=None, divergence="forward_kl")
    args.update(bad)
    hidden, weight = args.pop("hidden"), args.pop("weight")
    with pytest.raises(ValueError, match=match):
        token_stats(hidden, weight, **args)


def test_triton_impl_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
        token_stats(torch.randn(3, 4), torch.randn(10, 4), impl="triton")
