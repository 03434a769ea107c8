"""The autograd node of the core op and its two modes side by side.

The first ``fast_rows`` rows (as many as :func:`.fast.plan_fast` lets the memory budget hold) keep a gradient
basis formed in the forward (:mod:`.fast`); the others take the lean forward and its single recompute sweep
backward (:mod:`.loop`). Both modes run the same folds, :mod:`.folds` or ``pydistill.kernels.folds``.
"""
from __future__ import annotations

import torch

from . import fast, loop
from . import folds as torch_folds


def _folds(impl: str):
    if impl == "triton":
        from ..kernels import folds as triton_folds

        return triton_folds
    return torch_folds


class _TokenStatsFunction(torch.autograd.Function):
    """One autograd node over both modes: the first ``fast_rows`` rows keep a gradient basis (:mod:`.fast`),
    the rest take the lean forward and its single recompute sweep backward (:mod:`.loop`)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets, cfg, impl,
                budget_mb, differentiated):
        ctx.set_materialize_grads(False)  # an unused output passes None, not zeros, to the backward
        ctx.empty = hidden.shape[0] == 0
        if ctx.empty:  # nothing active: no sweep at all, zero gradients
            ctx.save_for_backward(hidden, weight)
            empty = hidden.new_zeros(0, dtype=loop.compute_dtype(hidden.dtype))
            return empty, empty.clone(), empty.clone()
        folds = _folds(impl)
        n, two = hidden.shape[0], cfg.divergence is not None
        shared = two and loop.same_tensor(teacher_weight, weight)
        sizes = (hidden.shape[1], teacher_hidden.shape[1] if two else 0, weight.shape[0], hidden.dtype, hidden.device)
        fast_plan = None
        if differentiated:
            fast_plan = fast.plan_fast(n, sizes[0], sizes[2], sizes[3], sizes[4], outputs=len(differentiated),
                                       two_contexts=two, shared_head=shared, triton_folds=impl == "triton",
                                       budget_mb=budget_mb)
        f = fast_plan.fast_rows if fast_plan is not None else 0
        ctx.cfg, ctx.folds, ctx.impl, ctx.budget_mb, ctx.fast_rows = cfg, folds, impl, budget_mb, f
        ctx.lean_budget_mb = fast_plan.lean_budget_mb if f else budget_mb
        ctx.differentiated, ctx.basis = differentiated, None
        parts = []
        if f:
            *stats, ctx.basis = fast.fast_forward(folds, fast_plan, hidden[:f], weight, bias,
                                                  _rows(teacher_hidden, 0, f), teacher_weight, teacher_bias,
                                                  _rows(targets, 0, f), cfg, differentiated)
            parts.append(stats)
        if f < n:
            parts.append(_lean_forward(folds, cfg, impl, fast_plan.lean_budget_mb if f else budget_mb, hidden[f:],
                                       weight, bias, _rows(teacher_hidden, f, n), teacher_weight, teacher_bias,
                                       _rows(targets, f, n), shared))
        logp, entropy, div, lse_s, lse_t, grad_sum = (torch.cat(p) if len(parts) > 1 else p[0] for p in zip(*parts))
        ctx.save_for_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets,
                              lse_s, lse_t, entropy, grad_sum)
        return logp, entropy, div

    @staticmethod
    def backward(ctx, g_logp, g_entropy, g_div):
        device = next((g.device.type for g in (g_logp, g_entropy, g_div) if g is not None), None)
        with loop.autocast_off(device):
            return _TokenStatsFunction._backward(ctx, g_logp, g_entropy, g_div)

    @staticmethod
    def _backward(ctx, g_logp, g_entropy, g_div):
        if torch.is_grad_enabled():  # create_graph=True: the sweep's gradients are not themselves differentiable
            raise RuntimeError("token_stats is differentiable once: second derivatives (create_graph=True, "
                               "double backward) are not supported; use impl='eager' for them")
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # freed on return; a retained graph's second backward runs lean
        basis, ctx.basis = getattr(ctx, "basis", None), None
        if not (need_hidden or need_weight):
            return (None,) * 11
        if ctx.empty:
            hidden, weight = ctx.saved_tensors
            return (torch.zeros_like(hidden) if need_hidden else None,
                    torch.zeros_like(weight) if need_weight else None) + (None,) * 9
        (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets,
         lse_s, lse_t, entropy, grad_sum) = ctx.saved_tensors
        cfg, n = ctx.cfg, hidden.shape[0]
        grads = dict(logp=g_logp if targets is not None else None, entropy=g_entropy,
                     divergence=g_div if cfg.divergence is not None else None)
        # the basis serves only when every output carrying gradient has one: else the lean mode runs for all rows
        f = ctx.fast_rows if basis is not None and all(
            name in ctx.differentiated for name, g in grads.items() if g is not None) else 0
        if not f:
            basis = None  # the lean sweep of every row has the whole budget once the basis is gone
        d_lean = d_weight = None
        if f < n:  # lean rows first, within what the basis leaves (as in the forward); one dW for both parts
            budget = ctx.lean_budget_mb if f else ctx.budget_mb
            d_lean, d_weight = _lean_backward(ctx, f, n, budget, hidden, weight, bias, teacher_hidden,
                                              teacher_weight, teacher_bias, targets, lse_s, lse_t, entropy,
                                              grad_sum, g_logp, g_entropy, g_div, need_weight)
        d_hidden = d_lean
        if f:
            d_fast, d_weight = fast.fast_backward(basis, [_rows(grads[name], 0, f) for name in ctx.differentiated],
                                                  hidden[:f], weight, need_weight, d_weight)
            del basis
            d_fast = d_fast.to(hidden.dtype)
            d_hidden = d_fast if d_lean is None else torch.cat([d_fast, d_lean])
        return (d_hidden if need_hidden else None, d_weight if need_weight else None) + (None,) * 9


def _rows(t, r0, r1):
    return None if t is None else t[r0:r1]


def _lean_forward(folds, cfg, impl, budget_mb, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                  targets, shared):
    """The lean forward of these rows: chunked GEMMs and folds, O(N) state, nothing kept for the backward."""
    two = cfg.divergence is not None
    plan = loop.plan_chunks(hidden.shape[0], hidden.shape[1], teacher_hidden.shape[1] if two else 0, weight.shape[0],
                            hidden.dtype, hidden.device, two_contexts=two, shared_head=shared,
                            triton_folds=impl == "triton", budget_mb=budget_mb)
    forward_plan = None
    if cfg.needs_second_sweep and plan.cols < weight.shape[0]:
        forward_plan = loop.plan_resident(hidden.shape[0], hidden.shape[1], weight.shape[0], hidden.dtype,
                                          hidden.device, shared_head=plan.stacked, triton_folds=impl == "triton",
                                          budget_mb=budget_mb)
    return loop.stats_forward(folds, forward_plan or plan, hidden, weight, bias, teacher_hidden, teacher_weight,
                              teacher_bias, targets, cfg)


def _lean_backward(ctx, r0, r1, budget_mb, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                   targets, lse_s, lse_t, entropy, grad_sum, g_logp, g_entropy, g_div, need_weight):
    """The lean backward of rows r0:r1: one recompute sweep."""
    cfg, two = ctx.cfg, ctx.cfg.divergence is not None
    h = hidden[r0:r1]
    plan = loop.plan_chunks(h.shape[0], h.shape[1], teacher_hidden.shape[1] if two else 0, weight.shape[0],
                            h.dtype, h.device, two_contexts=two,
                            shared_head=two and loop.same_tensor(teacher_weight, weight),
                            triton_folds=ctx.impl == "triton", budget_mb=budget_mb)
    return loop.stats_backward(
        ctx.folds, plan, h, weight, bias, _rows(teacher_hidden, r0, r1), teacher_weight, teacher_bias,
        _rows(targets, r0, r1), cfg, lse_s[r0:r1], lse_t[r0:r1], entropy[r0:r1], grad_sum[r0:r1],
        _rows(g_logp, r0, r1), _rows(g_entropy, r0, r1), _rows(g_div, r0, r1), need_weight)
