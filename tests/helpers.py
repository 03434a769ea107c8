"""Shared builders for the core-op tests."""
from __future__ import annotations

import torch


def make_inputs(n=37, width=24, vocab=1000, *, dtype=torch.float32, teacher_width=None, separate_teacher=False,
                bias=False, ignore_rows=(), seed=0, device="cpu", weight_grad=True):
    """Random inputs scaled so logits span a realistic range (std ~ 3)."""
    g = torch.Generator().manual_seed(seed)
    tw = teacher_width or width
    hidden = torch.randn(n, width, generator=g)
    weight = torch.randn(vocab, width, generator=g) * (3.0 / width ** 0.5)
    teacher_hidden = torch.randn(n, tw, generator=g)
    teacher_weight = torch.randn(vocab, tw, generator=g) * (3.0 / tw ** 0.5) if (separate_teacher or tw != width) else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    for r in ignore_rows:
        targets[r] = -100
    b = torch.randn(vocab, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    out = dict(hidden=cast(hidden).requires_grad_(), weight=cast(weight).requires_grad_(weight_grad),
               teacher_hidden=cast(teacher_hidden), teacher_weight=cast(teacher_weight),
               targets=targets.to(device), bias=cast(b))
    return out


def upstream(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3)]


def run(fn, inputs, grads, **options):
    """Outputs and gradients of one implementation; upstream gradients on all three outputs at once."""
    hidden, weight = inputs["hidden"], inputs["weight"]
    hidden.grad = None
    weight.grad = None
    kw = {k: v for k, v in inputs.items() if k not in ("hidden", "weight")}
    if options.get("divergence") is None:
        kw.pop("teacher_hidden")
        kw.pop("teacher_weight")
    kw.update(options)
    outs = fn(hidden, weight, **kw)
    total = sum((o.double() * g.to(o.device)).sum() for o, g in zip(outs, grads))
    total.backward()
    result = [o.detach().double().cpu() for o in outs] + [hidden.grad.double().cpu()]
    result.append(weight.grad.double().cpu() if weight.requires_grad else None)
    return result


def eager_low_precision(hidden, weight, **kw):
    """What a plain PyTorch loss does: logits in the input dtype, statistics in float32."""
    from pydistill.token_stats.eager import eager_token_stats
    from pydistill.token_stats.config import StatsConfig

    cfg = StatsConfig(divergence=kw.get("divergence"), beta=kw.get("beta", 0.5), has_targets=True)
    tw = kw["teacher_weight"] if kw.get("teacher_weight") is not None else weight
    return eager_token_stats(hidden, weight, cfg, teacher_hidden=kw.get("teacher_hidden"), teacher_weight=tw,
                                 targets=kw["targets"], dtype=None)


def assert_no_worse_than_eager(got, low, truth, rtol=1e-4):
    """CCE's acceptance rule, |impl - fp64| <= |eager low-precision - fp64| + tol, output by output, with the
    error measured as a relative Frobenius norm: a max-abs error on bf16-rounded gradients is one rounding step
    of a single element either way and says nothing about which is closer."""
    for i, (g, lo, t) in enumerate(zip(got, low, truth)):
        if t is None:
            continue
        scale = t.norm().item() + 1e-12
        err, base = (g - t).norm().item() / scale, (lo - t).norm().item() / scale
        assert err <= base + rtol, f"output {i}: relative error {err:.3e} vs eager {base:.3e}"


def count_head_reads(monkeypatch) -> list:
    """Every ``read_head`` a pydistill module makes from now on, as the id of the (unwrapped) model read: under
    FSDP2 each read gathers the head's shards, so a step should read each model once."""
    import sys

    import pydistill.boundary as boundary

    real, reads = boundary.read_head, []

    def counted(model):
        reads.append(id(boundary.unwrap(model)))
        return real(model)

    for module in list(sys.modules.values()):  # every module that imported the name
        if getattr(module, "read_head", None) is real and module.__name__.startswith("pydistill"):
            monkeypatch.setattr(module, "read_head", counted)
    return reads
