"""The core op's CUDA-only branches, run on CPU tensors before a GPU runs them.

``loop.device_kind`` is the one place that asks whether a tensor is on CUDA; patched to say "cuda", CPU tensors
take the CUDA path: bfloat16 dlogits and gradient basis, 16-bit GEMM operands with float32 output, the CUDA size
tables. The CPU build of torch has no kernel for ``torch.mm``/``torch.addmm`` with ``out_dtype``, so those two are
replaced by stand-ins that apply the dtype rules of a given torch release's CUDA kernels and compute in float32
(as cuBLAS accumulates).
"""
import os

import pytest
import torch

from pydistill import token_stats
from pydistill.token_stats import fast, loop
from tests.helpers import make_inputs, run, upstream

REAL_MM, REAL_ADDMM = torch.mm, torch.addmm
HALF = (torch.float16, torch.bfloat16)


def _dtype_rules(a, b, out_dtype, out):
    if a.dtype != b.dtype:
        raise RuntimeError("input dtypes must be the same")
    if not (out_dtype == a.dtype or (out_dtype == torch.float32 and a.dtype in HALF)):
        raise RuntimeError("out_dtype must be the same as input dtype or fp32 for fp16/bf16 inputs")
    if out is not None and out.dtype != out_dtype:
        raise RuntimeError("out_dtype must be the same as the dtype of the provided out tensor")


def cuda_gemms(release: str, calls: list):
    """torch.mm and torch.addmm as CUDA runs them in ``release``: "2.11" (both take out_dtype, addmm into a
    float32 self), "2.9" (out_dtype, but addmm's self must have the operands' dtype), "2.7" (no out_dtype)."""
    def mm(a, b, *args, out_dtype=None, **kw):
        if out_dtype is None:
            return REAL_MM(a, b, *args, **kw)
        if release == "2.7":
            raise TypeError("mm() received an invalid combination of arguments - got (out_dtype=...)")
        out = kw.get("out")
        _dtype_rules(a, b, out_dtype, out)
        calls.append(("mm", a.dtype, out_dtype))
        product = REAL_MM(a.float(), b.float()).to(out_dtype)
        return product if out is None else out.copy_(product)

    def addmm(acc, a, b, *args, out_dtype=None, **kw):
        if out_dtype is None:
            return REAL_ADDMM(acc, a, b, *args, **kw)
        if release == "2.7":
            raise TypeError("addmm() received an invalid combination of arguments - got (out_dtype=...)")
        out = kw.get("out")
        _dtype_rules(a, b, out_dtype, out)
        if release == "2.9" and acc.dtype != b.dtype:
            raise RuntimeError(f"self and mat2 must have the same dtype, but got {acc.dtype} and {b.dtype}")
        if acc.dtype not in (out_dtype, a.dtype):
            raise RuntimeError("self dtype must match either out_dtype or mat1 dtype")
        calls.append(("addmm", a.dtype, out_dtype))
        total = (acc.float() + REAL_MM(a.float(), b.float())).to(out_dtype)
        return total if out is None else out.copy_(total)
    return mm, addmm


@pytest.fixture
def as_cuda(monkeypatch):
    """Make CPU tensors take the CUDA branches under one release's GEMM rules; returns the out_dtype calls."""
    def patch(release):
        calls = []
        mm, addmm = cuda_gemms(release, calls)
        monkeypatch.setattr(loop, "device_kind", lambda device: "cuda")
        monkeypatch.setattr(loop, "_MIXED_GEMMS", {})  # the capability probe runs again under these rules
        monkeypatch.setattr(torch, "mm", mm)
        monkeypatch.setattr(torch, "addmm", addmm)
        return calls
    return patch


def _rel_errors(got, want):
    return [((g - w).norm() / (w.norm() + 1e-30)).item() for g, w in zip(got, want) if w is not None]


# (rows, memory budget in MB, rows the plan keeps fast) per mode and teacher: lean over several row blocks and
# dlogits groups (strided dz views, the float32 dW accumulator), all rows fast, and a partial plan (fast rows,
# then lean rows adding into the same bfloat16 dW)
MODES = {("lean", None): (45, 0.05, 0), ("fast", None): (45, 4096.0, 45), ("partial", None): (600, 2.96, 512),
         ("lean", "jsd"): (45, 0.05, 0), ("fast", "jsd"): (45, 4096.0, 45), ("partial", "jsd"): (600, 5.6, 512)}


@pytest.mark.parametrize("release", ["2.11", "2.9", "2.7"])
@pytest.mark.parametrize("mode,div", list(MODES))
def test_bf16_cuda_path_matches_float64(as_cuda, release, mode, div):
    n, budget, fast_rows = MODES[mode, div]
    width, vocab = (16, 700) if n < 100 else (8, 300)
    inputs = make_inputs(n=n, width=width, vocab=vocab, dtype=torch.bfloat16, bias=n < 100, seed=3)
    grads = upstream(n)
    opts = dict(divergence=div, clip=0.05 if div else None)
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    calls = as_cuda(release)
    assert loop.dlogits_dtype(torch.bfloat16, inputs["hidden"].device) == torch.bfloat16
    plan = fast.plan_fast(n, width, vocab, torch.bfloat16, inputs["hidden"].device, outputs=2 + (div is not None),
                          two_contexts=div is not None, shared_head=True, triton_folds=False, budget_mb=budget)
    assert (plan.fast_rows if plan else 0) == fast_rows
    got = run(token_stats, inputs, grads, impl="torch", memory_budget_mb=budget, **opts)
    errors = _rel_errors(got, want)
    assert max(errors[:3]) < 1e-5, errors  # float32 logits from bf16 operands: the outputs are exact
    assert max(errors[3:]) < 2e-2, errors  # gradients through bf16 dlogits
    kinds = {c[0] for c in calls}
    assert kinds == {"2.11": {"mm", "addmm"}, "2.9": {"mm"}, "2.7": set()}[release]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
@pytest.mark.parametrize("budget", [0.1, 4096.0])
def test_bf16_cuda_path_with_triton_folds(as_cuda, monkeypatch, budget):
    """The Triton backward kernel writing bfloat16 into strided views whose row stride is not the logits chunk's:
    a 512-column dlogits group of 256-column chunks over 3 row blocks (lean), the [N, V] basis (fast)."""
    monkeypatch.setitem(loop.MAX_COLS, "cuda", 256)  # chunks narrower than V=700, as V=151936 is on a GPU
    inputs = make_inputs(n=45, width=16, vocab=700, dtype=torch.bfloat16, seed=5)
    grads = upstream(45, seed=2)
    opts = dict(divergence="reverse_kl", clip=0.05)
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    as_cuda("2.11")
    plan = loop.plan_chunks(45, 16, 16, 700, torch.bfloat16, inputs["hidden"].device, two_contexts=True,
                            shared_head=True, triton_folds=True, budget_mb=budget)
    assert plan.cols == 256 and (budget > 1 or (plan.group, plan.rows) == (512, 22))
    errors = _rel_errors(run(token_stats, inputs, grads, impl="triton", memory_budget_mb=budget, **opts), want)
    assert max(errors[:3]) < 1e-5 and max(errors[3:]) < 2e-2, errors


@pytest.mark.parametrize("release,expected", [("2.11", (True, True)), ("2.9", (True, False)),
                                              ("2.7", (False, False))])
def test_mixed_gemms_probe_reads_each_release(as_cuda, release, expected):
    """The probe answers (mm takes out_dtype, addmm adds into a float32 self) instead of raising."""
    as_cuda(release)
    assert loop.mixed_gemms(torch.device("cpu"), torch.bfloat16) == expected


def test_auto_takes_the_torch_folds_for_float64_on_cuda(as_cuda):
    """impl="auto" on CUDA picks Triton, whose folds take no float64: a float64 call must run, not raise."""
    inputs = make_inputs(n=9, width=6, vocab=50, dtype=torch.float64, seed=1)
    grads = upstream(9)
    opts = dict(divergence="reverse_kl")
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    as_cuda("2.11")
    assert max(_rel_errors(run(token_stats, inputs, grads, **opts), want)) < 1e-10


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_auto_takes_the_torch_folds_for_a_float64_teacher_with_support_topk(as_cuda, dtype, tolerance):
    """support_topk takes the teacher's log-probs at the student's top-k ids in the teacher's own dtype: with a
    float64 teacher beside a 16/32-bit student, impl="auto" on CUDA runs the student's op in the Triton folds and
    the teacher's in the torch folds (it passed the student's choice, Triton, to the teacher and raised)."""
    inputs = make_inputs(n=9, width=6, vocab=50, dtype=dtype, separate_teacher=True, seed=1)
    inputs["teacher_hidden"] = inputs["teacher_hidden"].double()
    inputs["teacher_weight"] = inputs["teacher_weight"].double()
    grads = upstream(9)
    opts = dict(divergence="jsd", beta=0.3, support_topk=4)
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    as_cuda("2.11")
    errors = _rel_errors(run(token_stats, inputs, grads, **opts), want)
    assert max(errors[:3]) < 1e-5 and max(errors[3:]) < tolerance, errors
    with pytest.raises(ValueError, match="impl='triton' with support_topk takes a float32, bfloat16 or float16 "
                                         "teacher_hidden"):
        run(token_stats, inputs, grads, impl="triton", **opts)


def test_fast_mode_sums_several_outputs_bases_in_float32(as_cuda):
    """Fast mode with several outputs carrying gradient forms dZ = sum_k g_k B_k from bfloat16 bases: summed in
    float32 and rounded once (as the lean fold rounds its dlogits), its gradients are about as close to float64
    as lean's; what is left (~8% here) is each basis's own bf16 rounding, inherent to a bf16 basis. Summed in
    bf16 (each g_k, product and partial sum rounded) they were ~21% further from float64 than lean's."""
    n, width, vocab = 200, 32, 2000
    cases = []
    for div in (None, "jsd", "reverse_kl", "forward_kl"):  # 2 outputs (logp, entropy), then 3
        inputs = make_inputs(n=n, width=width, vocab=vocab, dtype=torch.bfloat16, bias=True, seed=0)
        opts = dict(divergence=div, clip=0.05 if div else None)
        cases.append((inputs, opts, run(token_stats, inputs, upstream(n), impl="eager", **opts)))
    as_cuda("2.11")
    ratios = []
    for inputs, opts, want in cases:
        two = opts["divergence"] is not None
        for budget, fast_rows in ((0.05, 0), (4096.0, n)):  # all rows lean, then all fast
            plan = fast.plan_fast(n, width, vocab, torch.bfloat16, torch.device("cpu"), outputs=2 + two,
                                  two_contexts=two, shared_head=True, triton_folds=False, budget_mb=budget)
            assert (plan.fast_rows if plan else 0) == fast_rows
        lean, fast_mode = (_rel_errors(run(token_stats, inputs, upstream(n), impl="torch", memory_budget_mb=budget,
                                           **opts), want)[3:] for budget in (0.05, 4096.0))
        ratios += [f / le for f, le in zip(fast_mode, lean)]
    assert sum(ratios) / len(ratios) < 1.12 and max(ratios) < 1.2, ratios


def test_fast_backward_rounds_the_sum_of_bfloat16_bases_once():
    """The combined dZ that fast_backward leaves in the first basis is the float32 sum of g_k B_k rounded to
    bfloat16 once: within half a bfloat16 step of the exact sum (over row blocks: 70 rows, 32 per block on a CPU)."""
    g = torch.Generator().manual_seed(4)
    n, width, vocab = 70, 8, 300
    basis = torch.randn(3, n, vocab, generator=g).to(torch.bfloat16)
    gradients = [torch.randn(n, generator=g) for _ in range(3)]
    exact = sum(b.double() * gk.double().unsqueeze(1) for b, gk in zip(basis, gradients))
    scale = sum((b.double() * gk.double().unsqueeze(1)).abs() for b, gk in zip(basis, gradients))
    hidden = torch.randn(n, width, generator=g).to(torch.bfloat16)
    weight = torch.randn(vocab, width, generator=g).to(torch.bfloat16)
    fast.fast_backward(basis, gradients, hidden, weight, need_weight_grad=True)
    error = (basis[0].double() - exact).abs()
    assert bool((error <= exact.abs() * 2 ** -8 + scale * 2 ** -22).all()), float((error / exact.abs()).max())
