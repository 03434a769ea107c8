"""The Triton backend against the float64 reference and the torch folds.

On a CPU these run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py), on small odd shapes;
on a GPU they run natively, and the gpu-marked tests add determinism and real-scale checks.
"""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pydistill import token_stats
from tests.helpers import assert_no_worse_than_eager, eager_low_precision, make_inputs, run, upstream

pytestmark = pytest.mark.triton
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)
triton = pytest.importorskip("triton")

N, H, V = 37, 24, 1000  # none is a multiple of any block size


def _close(got, want, atol=2e-5, rtol=1e-4):
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None
            continue
        err = (g - w).abs().max().item()
        assert err <= atol + rtol * w.abs().max().item(), f"output {i}: max error {err:.3e}"


@pytest.mark.parametrize("div,beta", [(None, 0.5), ("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0),
                                      ("jsd", 0.3), ("jsd", 1.0)])
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("separate_teacher", [False, True])
def test_triton_matches_reference_and_torch(div, beta, clip, separate_teacher):
    if div is None and (clip is not None or separate_teacher):
        pytest.skip("no teacher: clip and teacher head do not apply")
    inputs = make_inputs(n=N, width=H, vocab=V, separate_teacher=separate_teacher, ignore_rows=(3, 20), seed=1,
                         device=DEVICE)
    grads = upstream(N)
    opts = dict(divergence=div, beta=beta, clip=clip)
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    got = run(token_stats, inputs, grads, impl="triton", **opts)
    _close(got, want)
    _close(got, run(token_stats, inputs, grads, impl="torch", **opts))


@pytest.mark.parametrize("temperature,softcap,bias,teacher_width,div", [
    (0.7, None, True, None, ("reverse_kl", 0.5, 0.02)),
    (1.3, 4.0, False, 17, ("jsd", 0.3, None)),
    (1.0, 2.5, True, 31, ("forward_kl", 0.5, 0.05)),
])
def test_triton_temperature_softcap_bias_teacher_width(temperature, softcap, bias, teacher_width, div):
    inputs = make_inputs(n=29, width=20, vocab=777, bias=bias, teacher_width=teacher_width, seed=4, device=DEVICE)
    grads = upstream(29, seed=5)
    opts = dict(divergence=div[0], beta=div[1], clip=div[2], temperature=temperature, softcap=softcap)
    _close(run(token_stats, inputs, grads, impl="triton", **opts),
           run(token_stats, inputs, grads, impl="eager", **opts))


@pytest.mark.parametrize("softcap,teacher_softcap,div", [
    (2.5, 0, ("forward_kl", 0.5, 0.05)),  # capped student, uncapped teacher
    (None, 3.0, ("reverse_kl", 0.5, None)),  # uncapped student, capped teacher
    (2.0, 4.0, ("jsd", 0.3, None)),  # two caps
], ids=["cap-none", "none-cap", "cap-cap"])
def test_triton_teacher_softcap(softcap, teacher_softcap, div):
    inputs = make_inputs(n=19, width=12, vocab=301, bias=True, teacher_width=9, seed=9, device=DEVICE)
    grads = upstream(19, seed=10)
    opts = dict(divergence=div[0], beta=div[1], clip=div[2], temperature=0.9, softcap=softcap,
                teacher_temperature=0.7, teacher_softcap=teacher_softcap)
    _close(run(token_stats, inputs, grads, impl="triton", **opts),
           run(token_stats, inputs, grads, impl="eager", **opts))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("div", [None, "reverse_kl", "jsd"])
def test_triton_low_precision_no_worse_than_eager(dtype, div):
    inputs = make_inputs(n=33, width=40, vocab=1111, dtype=dtype, seed=7, device=DEVICE)
    grads = upstream(33, seed=8)
    opts = dict(divergence=div, beta=0.3)
    truth = run(token_stats, inputs, grads, impl="eager", **opts)
    got = run(token_stats, inputs, grads, impl="triton", **opts)
    assert_no_worse_than_eager(got, run(eager_low_precision, inputs, grads, **opts), truth)


def test_triton_frozen_weight_masked_rows_and_all_masked():
    inputs = make_inputs(n=21, width=12, vocab=313, weight_grad=False, seed=3, device=DEVICE)
    grads = upstream(21)
    opts = dict(divergence="jsd", beta=0.5, clip=0.1, mask=(torch.arange(21) % 3 != 0).to(DEVICE))
    got = run(token_stats, inputs, grads, impl="triton", **opts)
    assert got[4] is None
    _close(got, run(token_stats, inputs, grads, impl="eager", **opts))
    h = inputs["hidden"]
    h.grad = None
    out = token_stats(h, inputs["weight"], teacher_hidden=inputs["teacher_hidden"], divergence="reverse_kl",
                      mask=torch.zeros(21, dtype=torch.bool, device=DEVICE), impl="triton")
    (out.divergence.sum() + out.entropy.sum()).backward()
    assert out.divergence.abs().sum() == 0 and torch.equal(h.grad, torch.zeros_like(h))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_triton_is_deterministic_on_gpu():
    """No atomics anywhere: outputs and gradients are bitwise stable run to run."""
    inputs = make_inputs(n=1031, width=256, vocab=5003, dtype=torch.bfloat16, seed=2, device="cuda")
    grads = upstream(1031)
    first = run(token_stats, inputs, grads, impl="triton", divergence="jsd", beta=0.5, clip=0.05)
    for _ in range(3):
        again = run(token_stats, inputs, grads, impl="triton", divergence="jsd", beta=0.5, clip=0.05)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_triton_real_scale_matches_torch():
    """Qwen-sized head (N=8192, H=4096, V=151936) in bf16: Triton and torch folds agree."""
    inputs = make_inputs(n=8192, width=4096, vocab=151936, dtype=torch.bfloat16, seed=0, device="cuda")
    grads = upstream(8192)
    opts = dict(divergence="reverse_kl")
    got = run(token_stats, inputs, grads, impl="triton", **opts)
    want = run(token_stats, inputs, grads, impl="torch", **opts)
    _close(got[:3], want[:3], atol=2e-3, rtol=2e-3)
    _close(got[3:], want[3:], atol=2e-2, rtol=2e-2)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 19), width=st.integers(1, 17), vocab=st.integers(2, 1500),
       div=st.sampled_from([None, "forward_kl", "reverse_kl", "jsd"]), beta=st.sampled_from([0.0, 0.25, 1.0]),
       clip=st.sampled_from([None, 0.01, 0.3]), temperature=st.sampled_from([0.5, 1.0, 2.0]),
       softcap=st.sampled_from([None, 3.0]), budget=st.sampled_from([256.0, 0.05]), seed=st.integers(0, 2 ** 16))
def test_triton_hypothesis_shapes_options_and_budgets(n, width, vocab, div, beta, clip, temperature, softcap, budget,
                                                      seed):
    """Odd shapes, every option, and budgets small enough to split rows and vocabulary: Triton folds = float64."""
    inputs = make_inputs(n=n, width=width, vocab=vocab, seed=seed, ignore_rows=(0,) if n > 2 else (), device=DEVICE)
    grads = upstream(n, seed=seed + 1)
    opts = dict(divergence=div, beta=beta, clip=clip, temperature=temperature, softcap=softcap)
    want = run(token_stats, inputs, grads, impl="eager", **opts)
    got = run(token_stats, inputs, grads, impl="triton", memory_budget_mb=budget, **opts)
    _close(got, want, atol=3e-5)
