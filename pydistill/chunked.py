"""Vocabulary-chunked PyTorch backend of the core op (CPU and any non-CUDA device).

Forward: one sweep over vocabulary chunks with online max-rescaled statistics gives the log-sum-exps,
logp, entropy and the unclipped KLs; JSD and clipping take a second sweep with the final log-sum-exps.
Backward: one recompute sweep forms the combined dlogits of all three outputs chunk by chunk and
accumulates dh and dW. Peak extra memory is O(N x chunk), never O(N x V). Every GEMM runs in float32
so that logits are never rounded to a low-precision dtype before exp/log.

The per-entry algebra (see docs in :func:`pydistill.token_stats`): for the divergence's entries
d_v and a_v = q_v * d d_v / d q_v, with U the entries that the clip leaves alone,
D = sum_v min(d_v, tau) and dD/dz_v = 1[v in U] a_v - q_v * A, A = sum_{u in U} a_u.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .stats_config import StatsConfig

# Elements of one [rows, chunk] float32 tile; about ten such temporaries live at once.
DEFAULT_TILE_ELEMENTS = 1 << 21


def chunk_size_for(n_rows: int, vocab: int, tile_elements: int = DEFAULT_TILE_ELEMENTS) -> int:
    """Vocabulary chunk so that one [n_rows, chunk] tile holds about ``tile_elements`` entries."""
    return int(max(256, min(vocab, tile_elements // max(n_rows, 1))))


def _chunk_logits(h32, weight, bias, start, stop, cfg: StatsConfig):
    """z = cap(h W[start:stop]^T + b) / T in float32, and the softcap's derivative factor (or None)."""
    x = h32 @ weight[start:stop].to(torch.float32).t()
    if bias is not None:
        x += bias[start:stop].to(torch.float32)
    cap_grad = None
    if cfg.softcap is not None:
        t = torch.tanh(x / cfg.softcap)
        x = cfg.softcap * t
        cap_grad = 1.0 - t * t
    return x / cfg.temperature, cap_grad


def _divergence_entries(log_q, log_p, cfg: StatsConfig):
    """Per-entry term d_v and a_v = q_v * (d d_v / d q_v) of the configured divergence."""
    q = log_q.exp()
    if cfg.divergence == "forward_kl":
        p = log_p.exp()
        return p * (log_p - log_q), -p
    if cfg.divergence == "reverse_kl":
        r = log_q - log_p
        return q * r, q * (r + 1.0)
    beta = cfg.beta
    p = log_p.exp()
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    l_q = log_q - log_m
    return beta * p * (log_p - log_m) + (1.0 - beta) * q * l_q, (1.0 - beta) * q * l_q


class _Online:
    """Running max m, s = sum exp(z - m) and named sums sum exp(z - m) * f of one context, rescaled as m grows."""

    def __init__(self, n, device):
        self.m = torch.full((n,), -math.inf, device=device)
        self.s = torch.zeros(n, device=device)
        self.sums = {}

    def update(self, logits, **weighted):
        m_new = torch.maximum(self.m, logits.amax(dim=1))
        scale = torch.exp(self.m - m_new)
        e = torch.exp(logits - m_new.unsqueeze(1))
        self.s = self.s * scale + e.sum(1)
        for name, f in weighted.items():
            old = self.sums.get(name)
            new = (e * f).sum(1)
            self.sums[name] = new if old is None else old * scale + new
        self.m = m_new

    def lse(self):
        return self.m + torch.log(self.s)

    def mean(self, name):
        """E[f] under the context's softmax."""
        return self.sums[name] / self.s


def stats_forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets,
                  cfg: StatsConfig, chunk: Optional[int] = None):
    """Per-row (logp, entropy, divergence, lse_s, lse_t, grad_sum), float32 [N] each."""
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    chunk = chunk or chunk_size_for(n, vocab)
    h32 = hidden.to(torch.float32)
    with_teacher = cfg.divergence is not None
    ht32 = teacher_hidden.to(torch.float32) if with_teacher else None
    student, teacher = _Online(n, dev), _Online(n, dev)
    target_logit = torch.zeros(n, device=dev)
    rows = torch.arange(n, device=dev)
    for start in range(0, vocab, chunk):
        stop = min(start + chunk, vocab)
        z_s, _ = _chunk_logits(h32, weight, bias, start, stop, cfg)
        if with_teacher:
            z_t, _ = _chunk_logits(ht32, teacher_weight, teacher_bias, start, stop, cfg)
            gap = z_s - z_t
            student.update(z_s, z=z_s, gap=gap)  # E_q[z_s] for entropy, E_q[z_s - z_t] for reverse KL
            teacher.update(z_t, gap=gap)  # E_p[z_s - z_t] for forward KL
        else:
            student.update(z_s, z=z_s)
        if cfg.has_targets:
            inside = (targets >= start) & (targets < stop)
            local = (targets - start).clamp(0, stop - start - 1)
            target_logit = torch.where(inside, z_s[rows, local], target_logit)
    lse_s = student.lse()
    entropy = lse_s - student.mean("z")
    zeros = torch.zeros(n, device=dev)
    logp = target_logit - lse_s if cfg.has_targets else zeros
    if not with_teacher:
        return logp, entropy, zeros, lse_s, zeros, zeros
    lse_t = teacher.lse()
    if cfg.needs_second_sweep:
        div, grad_sum = _second_sweep(h32, weight, bias, ht32, teacher_weight, teacher_bias, lse_s, lse_t, cfg, chunk)
    elif cfg.divergence == "forward_kl":
        div = lse_s - lse_t - teacher.mean("gap")
        grad_sum = torch.full_like(div, -1.0)
    else:  # reverse_kl
        div = student.mean("gap") - lse_s + lse_t
        grad_sum = div + 1.0
    return logp, entropy, div, lse_s, lse_t, grad_sum


def _second_sweep(h32, weight, bias, ht32, teacher_weight, teacher_bias, lse_s, lse_t, cfg, chunk):
    vocab = weight.shape[0]
    div = torch.zeros_like(lse_s)
    grad_sum = torch.zeros_like(lse_s)
    for start in range(0, vocab, chunk):
        stop = min(start + chunk, vocab)
        z_s, _ = _chunk_logits(h32, weight, bias, start, stop, cfg)
        z_t, _ = _chunk_logits(ht32, teacher_weight, teacher_bias, start, stop, cfg)
        d, a = _divergence_entries(z_s - lse_s.unsqueeze(1), z_t - lse_t.unsqueeze(1), cfg)
        if cfg.clip is not None:
            kept = d <= cfg.clip
            div += torch.where(kept, d, torch.full_like(d, cfg.clip)).sum(1)
            grad_sum += torch.where(kept, a, torch.zeros_like(a)).sum(1)
        else:
            div += d.sum(1)
            grad_sum += a.sum(1)
    return div, grad_sum


def stats_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets,
                   cfg: StatsConfig, lse_s, lse_t, entropy, grad_sum, g_logp, g_entropy, g_div,
                   need_weight_grad: bool, chunk: Optional[int] = None):
    """(d hidden in hidden's dtype, d weight in float32 or None) from per-row upstream gradients.

    Any of ``g_logp``, ``g_entropy``, ``g_div`` may be None (that output was not used).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    chunk = chunk or chunk_size_for(n, vocab)
    h32 = hidden.to(torch.float32)
    use_div = cfg.divergence is not None and g_div is not None
    ht32 = teacher_hidden.to(torch.float32) if use_div else None
    use_logp = cfg.has_targets and g_logp is not None
    d_hidden = torch.zeros_like(h32)
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
    rows = torch.arange(n, device=hidden.device)
    for start in range(0, vocab, chunk):
        stop = min(start + chunk, vocab)
        z_s, cap_grad = _chunk_logits(h32, weight, bias, start, stop, cfg)
        log_q = z_s - lse_s.unsqueeze(1)
        q = log_q.exp()
        dz = torch.zeros_like(z_s)
        if use_logp:
            dz -= g_logp.unsqueeze(1) * q
            inside = (targets >= start) & (targets < stop)
            local = (targets - start).clamp(0, stop - start - 1)
            dz[rows, local] += torch.where(inside, g_logp, torch.zeros_like(g_logp))
        if g_entropy is not None:
            dz -= (g_entropy.unsqueeze(1) * q) * (log_q + entropy.unsqueeze(1))
        if use_div:
            z_t, _ = _chunk_logits(ht32, teacher_weight, teacher_bias, start, stop, cfg)
            d, a = _divergence_entries(log_q, z_t - lse_t.unsqueeze(1), cfg)
            if cfg.clip is not None:
                a = torch.where(d <= cfg.clip, a, torch.zeros_like(a))
            dz += g_div.unsqueeze(1) * (a - q * grad_sum.unsqueeze(1))
        dx = dz / cfg.temperature
        if cap_grad is not None:
            dx *= cap_grad
        d_hidden += dx @ weight[start:stop].to(torch.float32)
        if need_weight_grad:
            d_weight[start:stop] = dx.t() @ h32
    return d_hidden.to(hidden.dtype), d_weight
