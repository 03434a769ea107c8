"""Benchmark cases: each builds inputs once and returns a closure running one forward + backward."""
from __future__ import annotations

import torch

from pydistill import token_stats
from pydistill.reference import reference_token_stats
from pydistill.stats_config import StatsConfig

SHAPES = {  # (N tokens, H, V)
    "cpu-small": (512, 576, 8192),
    "smollm2": (2048, 576, 49152),
    "llama3-8b": (8192, 4096, 128256),
    "qwen": (8192, 4096, 151936),
}


def make_inputs(n, width, vocab, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, width, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, width, generator=g) / width ** 0.5).to(device, dtype).requires_grad_()
    teacher = torch.randn(n, width, generator=g).to(device, dtype)
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    # gradients exist before the timed run, so "extra memory" is what the op needs beyond inputs and grads
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    return hidden, weight, teacher, targets


def core_op(impl, divergence="reverse_kl", masked=0.0):
    """Two contexts sharing the lm_head: logp + entropy + divergence, forward and backward.

    ``impl``: "eager" (logits in the input dtype, statistics in float32), "compile" (torch.compile of eager),
    or a backend of token_stats ("chunked", "triton"). ``masked``: share of rows masked out (first error).
    """
    def build(hidden, weight, teacher, targets):
        n = hidden.shape[0]
        mask = torch.arange(n, device=hidden.device) >= int(masked * n)
        if impl in ("eager", "compile"):
            cfg = StatsConfig(divergence=divergence, has_targets=True)

            def eager(h, w, t, y):
                return reference_token_stats(h, w, cfg, teacher_hidden=t, teacher_weight=w, targets=y, dtype=None,
                                             active=mask)

            fn = torch.compile(eager) if impl == "compile" else eager

            def step():
                out = fn(hidden, weight, teacher, targets)
                (out[0].sum() + out[1].sum() + out[2].sum()).backward()
        else:
            def step():
                out = token_stats(hidden, weight, targets=targets, teacher_hidden=teacher, divergence=divergence,
                                  mask=mask, impl=impl)
                (out.logp.sum() + out.entropy.sum() + out.divergence.sum()).backward()
        return step
    return build


CASES = {
    "core-eager": core_op("eager"),
    "core-compile": core_op("compile"),
    "core-chunked": core_op("chunked"),
    "core-triton": core_op("triton"),
    "core-chunked-jsd-clip": core_op("chunked", divergence="jsd"),
    **{f"mask{int(p * 100)}-chunked": core_op("chunked", masked=p) for p in (0.0, 0.25, 0.5, 0.75)},
    **{f"mask{int(p * 100)}-triton": core_op("triton", masked=p) for p in (0.0, 0.25, 0.5, 0.75)},
}
