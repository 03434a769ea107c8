"""The per-chunk folds of the core op, spelled in torch (CPU and any device without Triton).

The top-level ``kernels/folds.py`` (shipped as ``pydistill.kernels.folds``) spells the same three functions as
Triton kernels, with the same arguments and the same math (the torch spelling groups terms to save passes over a
chunk); the chunk loop (:mod:`.loop`) calls whichever one the device takes.
Each fold receives one GEMM output chunk, ``[R, C]`` raw logits ``x = h W[c0:c1]^T + b`` in the compute dtype
(float32, float64 for float64 inputs), and turns it into per-row statistics or into the chunk's dlogits.

Definitions shared by both spellings (``T`` temperature, ``c`` softcap):
- ``z = cap(x) / T`` with ``cap(x) = c tanh(x / c)``; ``dz/dx = (1 - tanh^2(x / c)) / T``. The teacher's
  context has its own T and c (``cfg.teacher_temperature``, ``cfg.teacher_cap``: by default the student's; a
  teacher head without a cap beside a capped student has none); it never takes a gradient.
- per-row online state, rescaled as the running max ``m`` grows (``e_v = exp(z_v - m)``):
  ``s = sum e``, ``a = sum e (m - z)`` (every term >= 0, so the entropy ``log s + a / s`` is never negative),
  ``g = sum e (z_s - z_t)`` under each context's own ``e``, and the target's logit.
- per entry of the divergence: ``d_v`` and ``a_v = q_v dd_v/dq_v``; with the clip tau, ``U = {v: d_v <= tau}``,
  ``D = sum_v min(d_v, tau)`` and ``dD/dz_v = 1[v in U] a_v - q_v A`` with ``A = sum_{u in U} a_u``.
"""
from __future__ import annotations

import math

import torch

from .config import StatsConfig

# The torch folds transform logits in place (their chunk is the loop's own buffer); the Triton folds only read.
OVERWRITES_LOGITS = True
# e^x is spelled 2^(x log2 e): on the CI machine's CPU (AMD EPYC, torch 2.13) aten's exp2 is 4.5x faster than its
# exp over a [128, 4096] float32 chunk (90 vs 403 us, one thread), so even with the multiply's extra pass it
# halves the folds' exponentials, the largest share of their time.
LOG2E = 1.0 / math.log(2.0)
# Rows of the forward state tensor [STATE_ROWS, N].
M_S, S_S, A_S, G_S, M_T, S_T, G_T, Z_Y = range(8)
STATE_ROWS = 8


def _transform_(x: torch.Tensor, cfg: StatsConfig, teacher: bool = False) -> torch.Tensor:
    """x -> cap(x) / T in place with the student's cap and T, or the teacher's (the GEMM buffer is the loop's
    own)."""
    cap, temperature = (cfg.teacher_cap, cfg.teacher_temperature) if teacher else (cfg.softcap, cfg.temperature)
    if cap is not None:
        x.div_(cap).tanh_().mul_(cap)
    if temperature != 1.0:
        x.mul_(1.0 / temperature)
    return x


def _exp(x: torch.Tensor) -> torch.Tensor:
    """exp(x) as a new tensor (through exp2: see LOG2E)."""
    return (x * LOG2E).exp2_()


def _dot(x, y):
    """Row-wise sum of x * y without an [R, C] temporary."""
    return torch.linalg.vecdot(x, y, dim=1)


def _entries(log_q, log_p, q, cfg: StatsConfig, need_d: bool = True):
    """Per-entry (d_v or None, a_v) of the configured divergence (q = exp(log_q), passed in: both callers have it).

    ``need_d=False`` (the backward without the clip, where only a_v enters) skips d_v's passes over the chunk.
    """
    if cfg.divergence == "forward_kl":
        p = _exp(log_p)
        return (p * (log_p - log_q) if need_d else None), p.neg_()
    if cfg.divergence == "reverse_kl":
        r = log_q - log_p
        d = q * r if need_d else None
        return d, r.add_(1.0).mul_(q)
    beta = cfg.beta
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    l_q = log_q - log_m
    a = l_q.mul_(q).mul_(1.0 - beta)
    if not need_d:
        return None, a
    return log_m.neg_().add_(log_p).mul_(_exp(log_p)).mul_(beta).add_(a), a


def _unclipped(a, d, cfg: StatsConfig):
    """a_v on the entries the clip leaves alone, 0 elsewhere (a multiply: torch.where is slow on the CPU)."""
    return a if cfg.clip is None else a.mul_(d <= cfg.clip)


def forward_fold(z_s, z_t, state, targets, col0: int, cfg: StatsConfig) -> None:
    """Fold one chunk into the online state.

    Args:
        z_s, z_t: [R, C] raw logits of the student and the teacher (``z_t`` None without a teacher); overwritten.
        state: [STATE_ROWS, R] view of the rows' state, updated in place.
        targets: [R] token ids (-1 where there is none).
        col0: vocabulary index of the chunk's first column.
    """
    _transform_(z_s, cfg)
    m_s, s_s, a_s, g_s, m_t, s_t, g_t, z_y = state.unbind(0)
    width = z_s.shape[1]
    local = targets - col0
    inside = (local >= 0) & (local < width)
    picked = z_s.gather(1, local.clamp(0, width - 1).unsqueeze(1)).squeeze(1)
    z_y.copy_(torch.where(inside, picked, z_y))
    gap = None
    if z_t is not None:
        _transform_(z_t, cfg, teacher=True)
        gap = z_s - z_t
    m_new = torch.maximum(m_s, z_s.amax(dim=1))
    scale = torch.exp(m_s - m_new)
    # z - m <= 0 exactly (a scaled difference can round above 0 at the max, and the entropy below 0); in place:
    # z_s is not needed any more
    shifted = z_s.sub_(m_new.unsqueeze(1))
    e = _exp(shifted)
    # sum e (m - z) under the new max: the old sum grows by (m_new - m_old) per unit of the old s.
    shift = torch.where(s_s > 0, m_new - m_s, torch.zeros_like(s_s)) * s_s  # 0, not inf * 0, at the start
    a_s.copy_(scale * (a_s + shift) - _dot(e, shifted))
    s_s.mul_(scale).add_(e.sum(1))
    m_s.copy_(m_new)
    if z_t is None:
        return
    g_s.mul_(scale).add_(_dot(e, gap))
    mt_new = torch.maximum(m_t, z_t.amax(dim=1))
    scale_t = torch.exp(m_t - mt_new)
    e_t = torch.add(mt_new.unsqueeze(1) * -LOG2E, z_t, alpha=LOG2E, out=z_t).exp2_()
    g_t.mul_(scale_t).add_(_dot(e_t, gap))
    s_t.mul_(scale_t).add_(e_t.sum(1))
    m_t.copy_(mt_new)


def divergence_fold(z_s, z_t, lse_s, lse_t, sums, cfg: StatsConfig) -> None:
    """Add one chunk's sum_v min(d_v, tau) to ``sums[0]`` and sum_{v in U} a_v to ``sums[1]`` (``sums`` [2, R]).

    Needs the final log-sum-exps, hence its own sweep (JSD and the clip only).
    """
    log_q = _transform_(z_s, cfg).sub_(lse_s.unsqueeze(1))
    log_p = _transform_(z_t, cfg, teacher=True).sub_(lse_t.unsqueeze(1))
    q = None if cfg.divergence == "forward_kl" else _exp(log_q)
    d, a = _entries(log_q, log_p, q, cfg)
    a = _unclipped(a, d, cfg)
    sums[0] += (d if cfg.clip is None else d.clamp_(max=cfg.clip)).sum(1)
    sums[1] += a.sum(1)


def backward_fold(z_s, z_t, lse_s, lse_t, entropy, grad_sum, g_logp, g_entropy, g_div, targets, col0: int,
                  cfg: StatsConfig, out) -> None:
    """Write the chunk's dlogits of ``sum(g_logp logp + g_entropy H + g_div D)`` w.r.t. the raw logits into ``out``.

    ``z_t`` is None when no divergence gradient flows; ``g_*`` are [R], or None where an output carries no
    gradient (its terms are skipped, not multiplied by zero); ``grad_sum`` is A per row; ``out`` is [R, C] in the
    dlogits dtype.
    """
    _transform_(z_s, cfg)
    cap_grad = None
    if cfg.softcap is not None:
        t = z_s * (cfg.temperature / cfg.softcap)
        cap_grad = t.mul_(t).neg_().add_(1.0)
    log_q = z_s.sub_(lse_s.unsqueeze(1))
    q = _exp(log_q)
    # every term proportional to q in one per-row coefficient: q (c - g_H log q), c = -g_logp - g_H H - g_D A
    coef = torch.zeros_like(lse_s)
    if g_logp is not None:
        coef -= g_logp
    if g_entropy is not None:
        coef -= g_entropy * entropy
    div_term = None
    if z_t is not None and g_div is not None:
        coef -= g_div * grad_sum
        log_p = _transform_(z_t, cfg, teacher=True).sub_(lse_t.unsqueeze(1))
        d, a = _entries(log_q, log_p, q, cfg, need_d=cfg.clip is not None)
        div_term = _unclipped(a, d, cfg).mul_(g_div.unsqueeze(1))
    # formed in ``out`` itself when it has the compute dtype (one pass less than a temporary and a copy)
    dz = out if out.dtype == q.dtype else torch.empty_like(q)
    if g_entropy is None:
        torch.mul(q, coef.unsqueeze(1), out=dz)
    else:
        torch.mul(log_q, -g_entropy.unsqueeze(1), out=dz).add_(coef.unsqueeze(1)).mul_(q)
    if div_term is not None:
        dz += div_term
    if g_logp is not None:
        width = z_s.shape[1]
        local = targets - col0
        inside = (local >= 0) & (local < width)
        dz.scatter_add_(1, local.clamp(0, width - 1).unsqueeze(1),
                        torch.where(inside, g_logp, torch.zeros_like(g_logp)).unsqueeze(1))
    if cap_grad is not None:
        dz *= cap_grad
    if cfg.temperature != 1.0:
        dz *= 1.0 / cfg.temperature
    if dz is not out:
        out.copy_(dz)
