"""Float32 math whatever the autocast, for every impl (the op's contract), and the losses inside a compiled step."""
import math

import pytest
import torch

from pydistill import token_stats
from pydistill.losses import distillation_loss

N, H, V = 21, 24, 389


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    return hidden, weight, torch.randn(N, H, generator=g), torch.randint(0, V, (N,), generator=g)


def _outputs_and_grads(hidden, weight, **options):
    stats = token_stats(hidden, weight, **options)
    coef = torch.linspace(0.5, 1.5, N, dtype=stats.logp.dtype)
    loss = (stats.logp + coef * stats.entropy + stats.divergence).sum()
    return [*stats, *torch.autograd.grad(loss, (hidden, weight))]


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton), "eager"])
@pytest.mark.parametrize("options", [dict(divergence="jsd", beta=0.3, clip=0.05), dict(divergence="reverse_kl"),
                                     dict(divergence="forward_kl", topk=5)], ids=["jsd-clip", "reverse", "topk"])
def test_float32_math_under_cpu_autocast(impl, autocast_dtype, options, monkeypatch):
    if impl == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    hidden, weight, teacher, targets = _inputs()
    options = dict(options)
    k = options.pop("topk", None)
    if k:
        with torch.no_grad():
            logprobs, ids = torch.log_softmax(teacher.double() @ weight.double().t(), -1).topk(k, dim=-1)
        options.update(teacher_topk_ids=ids, teacher_topk_logprobs=logprobs.float())
    else:
        options.update(teacher_hidden=teacher)
    want = _outputs_and_grads(hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_(),
                              targets=targets, impl="eager" if not k else "torch",
                              **{key: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                                 for key, v in options.items()})
    with torch.autocast("cpu", dtype=autocast_dtype):  # the backward too runs inside the autocast region
        got = _outputs_and_grads(hidden, weight, targets=targets, impl=impl, **options)
    for name, a, b in zip(["logp", "entropy", "divergence", "d_hidden", "d_weight"], got, want):
        assert a.dtype == torch.float32, name
        scale = float(b.abs().max()) + 1e-6
        assert float((a.double() - b).abs().max()) <= 2e-5 * scale + 1e-6, f"{name} under {autocast_dtype}"


def _step(body, head, x, teacher):
    out = distillation_loss(body(x), head.weight, teacher, divergence="forward_kl")
    out.loss.backward()
    return out.loss.detach()


def test_losses_run_inside_a_compiled_training_step():
    torch.manual_seed(0)
    body, head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 200, bias=False)
    x, teacher = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    want = _step(body, head, x, teacher)
    grads = [p.grad.clone() for p in (*body.parameters(), head.weight)]
    for p in (*body.parameters(), head.weight):
        p.grad = None
    got = torch.compile(_step, backend="eager")(body, head, x, teacher)  # the op is a graph break
    assert math.isclose(float(got), float(want), rel_tol=1e-6)
    for g, p in zip(grads, (*body.parameters(), head.weight)):
        torch.testing.assert_close(p.grad, g)


def test_fullgraph_compile_fails_with_a_line_that_says_why():
    torch._dynamo.reset()
    body, head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 200, bias=False)
    with pytest.raises(Exception, match="fullgraph=False"):
        torch.compile(_step, backend="eager", fullgraph=True)(body, head, torch.randn(2, 5, 16), torch.randn(2, 5, 16))


def test_hidden_states_autocast_made_16_bit_meet_a_float32_head():
    """Under autocast a body's hidden states come out bfloat16 beside a float32 head: the op raises them to the
    head's dtype (autocast would have rounded the head down) and computes in float32."""
    hidden, weight, teacher, targets = _inputs(1)
    body = torch.nn.Linear(H, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h16, t16 = body(hidden), body(teacher)
        assert h16.dtype == t16.dtype == torch.bfloat16
        stats = token_stats(h16, weight, targets=targets, teacher_hidden=t16, divergence="forward_kl")
    want = token_stats(h16.detach().double(), weight.detach().double(), targets=targets,
                       teacher_hidden=t16.detach().double(), divergence="forward_kl", impl="eager")
    for a, b in zip(stats, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_an_empty_vocabulary_is_one_line():
    with pytest.raises(ValueError, match="vocabulary V must be at least 1"):
        token_stats(torch.randn(3, 4), torch.randn(0, 4))
