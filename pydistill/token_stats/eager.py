"""The core op written eagerly: materializes the [N, V] logits.

Used by the tests (``dtype=torch.float64``: the truth every backend is compared with) and by the
benchmarks as the "eager PyTorch" baseline (``dtype=None``: logits in the input dtype, then the
statistics in float32, which is what a user's plain PyTorch loss does). Gradients come from autograd,
so this file is written from the formulas of the forward only.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import StatsConfig


def _scaled_logits(hidden, weight, bias, cfg: StatsConfig, dtype, teacher=False):
    """cap(h W^T + b) / T with the student's cap and T, or the teacher's (``teacher=True``)."""
    if dtype is None:  # eager baseline: GEMM in the input dtype, statistics in float32
        logits = hidden @ weight.t()
        if bias is not None:
            logits = logits + bias
        logits = logits.float()
    else:
        logits = hidden.to(dtype) @ weight.to(dtype).t()
        if bias is not None:
            logits = logits + bias.to(dtype)
    cap = cfg.teacher_cap if teacher else cfg.softcap
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return logits / (cfg.teacher_temperature if teacher else cfg.temperature)


def _divergence_terms(log_q, log_p, cfg: StatsConfig):
    """Per-entry terms d_v of the chosen divergence, [N, V]."""
    p, q = log_p.exp(), log_q.exp()
    if cfg.divergence == "forward_kl":
        return p * (log_p - log_q)
    if cfg.divergence == "reverse_kl":
        return q * (log_q - log_p)
    beta = cfg.beta
    log_m = torch.logaddexp(log_p + torch.log(torch.tensor(beta, dtype=log_p.dtype)),
                            log_q + torch.log(torch.tensor(1.0 - beta, dtype=log_q.dtype)))
    return beta * p * (log_p - log_m) + (1.0 - beta) * q * (log_q - log_m)


def eager_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    cfg: StatsConfig,
    *,
    bias: Optional[torch.Tensor] = None,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    targets: Optional[torch.Tensor] = None,
    active: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = torch.float64,
):
    """(logp, entropy, divergence) per row, each [N], in ``dtype`` (float32 when ``dtype`` is None).

    Inactive rows (``active`` False) give 0 in every output. Outputs that the config does not ask for
    (no targets, no teacher) are zeros. Teacher inputs are detached.
    """
    z_s = _scaled_logits(hidden, weight, bias, cfg, dtype)
    log_q = torch.log_softmax(z_s, dim=-1)
    q = log_q.exp()
    entropy = -(q * log_q).sum(-1)
    zeros = torch.zeros_like(entropy)
    if cfg.has_targets:
        safe = targets.clamp_min(0)
        logp = log_q.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    else:
        logp = zeros
    if cfg.divergence is not None:
        with torch.no_grad():
            z_t = _scaled_logits(teacher_hidden.detach(), teacher_weight.detach(),
                                 None if teacher_bias is None else teacher_bias.detach(), cfg, dtype,
                                 teacher=True)
            log_p = torch.log_softmax(z_t, dim=-1)
        terms = _divergence_terms(log_q, log_p, cfg)
        if cfg.clip is not None:
            terms = terms.clamp(max=cfg.clip)
        divergence = terms.sum(-1)
    else:
        divergence = zeros
    if active is not None:
        keep = active.to(torch.bool)
        logp, entropy, divergence = (torch.where(keep, t, torch.zeros_like(t)) for t in (logp, entropy, divergence))
    return logp, entropy, divergence


def eager_topk_divergence(hidden, weight, cfg: StatsConfig, ids, logprobs, *, tail: bool,
                              bias: Optional[torch.Tensor] = None, active: Optional[torch.Tensor] = None,
                              dtype: torch.dtype = torch.float64):
    """Divergence [N] against a top-k teacher over the materialized [N, V] student log-softmax, in probabilities.

    Entries with id -1 are padding. With ``tail`` the outcomes are the given ids plus one bucket for the rest,
    each tail's mass floored at ``1 - exp(-1e-7)``; without, both sides are renormalized over the given ids.
    """
    log_q = torch.log_softmax(_scaled_logits(hidden, weight, bias, cfg, dtype), dim=-1)
    valid = ids >= 0
    q = torch.where(valid, log_q.gather(1, ids.clamp_min(0)).exp(), torch.zeros((), dtype=dtype))
    p = torch.where(valid, logprobs.to(dtype).exp(), torch.zeros((), dtype=dtype))
    if tail:
        floor = -torch.expm1(torch.tensor(-1e-7, dtype=dtype))
        q = torch.cat([q, (1 - q.sum(1, keepdim=True)).clamp(min=floor)], dim=1)
        p = torch.cat([p, (1 - p.sum(1, keepdim=True)).clamp(min=floor)], dim=1)
    else:
        q = q / q.sum(1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)
        p = p / p.sum(1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)

    def kl(a, b):  # entries a log(a / b) with 0 log 0 = 0 (and no nan in the gradient of the 0 branch)
        some = a > 0
        a_, b_ = torch.where(some, a, torch.ones_like(a)), torch.where(some, b, torch.ones_like(b))
        return torch.where(some, a_ * (torch.log(a_) - torch.log(b_)), torch.zeros_like(a))

    if cfg.divergence == "forward_kl":
        terms = kl(p, q)
    elif cfg.divergence == "reverse_kl":
        terms = kl(q, p)
    else:
        m = cfg.beta * p + (1 - cfg.beta) * q
        terms = cfg.beta * kl(p, m) + (1 - cfg.beta) * kl(q, m)
    if cfg.clip is not None:
        terms = terms.clamp(max=cfg.clip)
    divergence = terms.sum(-1)
    if active is not None:
        divergence = torch.where(active.to(torch.bool), divergence, torch.zeros_like(divergence))
    return divergence
