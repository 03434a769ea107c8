"""The per-chunk folds of the core op, spelled in torch (CPU and any device without Triton).

``pydistill/kernels/folds.py`` spells the same three functions as Triton kernels, with the same arguments and
the same arithmetic in the same order; the chunk loop (:mod:`.loop`) calls whichever one the device takes.
Each fold receives one GEMM output chunk, ``[R, C]`` raw logits ``x = h W[c0:c1]^T + b`` in the compute dtype
(float32, float64 for float64 inputs), and turns it into per-row statistics or into the chunk's dlogits.

Definitions shared by both spellings (``T`` temperature, ``c`` softcap):
- ``z = cap(x) / T`` with ``cap(x) = c tanh(x / c)``; ``dz/dx = (1 - tanh^2(x / c)) / T``.
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

# Rows of the forward state tensor [STATE_ROWS, N].
M_S, S_S, A_S, G_S, M_T, S_T, G_T, Z_Y = range(8)
STATE_ROWS = 8


def _transform_(x: torch.Tensor, cfg: StatsConfig) -> torch.Tensor:
    """x -> cap(x) / T in place (the GEMM buffer is the loop's own)."""
    if cfg.softcap is not None:
        x.div_(cfg.softcap).tanh_().mul_(cfg.softcap)
    if cfg.temperature != 1.0:
        x.mul_(1.0 / cfg.temperature)
    return x


def _rescaled(z, m_old):
    """exp(z - m_new), exp(m_old - m_new) and m_new for one chunk of a context."""
    m_new = torch.maximum(m_old, z.amax(dim=1))
    return torch.exp(z - m_new.unsqueeze(1)), torch.exp(m_old - m_new), m_new


def _entries(log_q, log_p, cfg: StatsConfig):
    """Per-entry d_v and a_v of the configured divergence."""
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
    e_s, scale_s, m_new = _rescaled(z_s, m_s)
    # sum e (m - z) under the new max: the old sum grows by (m_new - m_old) per unit of the old s.
    shift = torch.where(s_s > 0, (m_new - m_s) * s_s, torch.zeros_like(s_s))
    a_s.copy_(scale_s * (a_s + shift) + (e_s * (m_new.unsqueeze(1) - z_s)).sum(1))
    s_s.mul_(scale_s).add_(e_s.sum(1))
    m_s.copy_(m_new)
    if z_t is None:
        return
    _transform_(z_t, cfg)
    gap = z_s - z_t
    g_s.mul_(scale_s).add_((e_s * gap).sum(1))
    e_t, scale_t, mt_new = _rescaled(z_t, m_t)
    g_t.mul_(scale_t).add_((e_t * gap).sum(1))
    s_t.mul_(scale_t).add_(e_t.sum(1))
    m_t.copy_(mt_new)


def divergence_fold(z_s, z_t, lse_s, lse_t, sums, cfg: StatsConfig) -> None:
    """Add one chunk's sum_v min(d_v, tau) to ``sums[0]`` and sum_{v in U} a_v to ``sums[1]`` (``sums`` [2, R]).

    Needs the final log-sum-exps, hence its own sweep (JSD and the clip only).
    """
    _transform_(z_s, cfg)
    _transform_(z_t, cfg)
    d, a = _entries(z_s - lse_s.unsqueeze(1), z_t - lse_t.unsqueeze(1), cfg)
    if cfg.clip is not None:
        kept = d <= cfg.clip
        d = torch.where(kept, d, torch.full_like(d, cfg.clip))
        a = torch.where(kept, a, torch.zeros_like(a))
    sums[0] += d.sum(1)
    sums[1] += a.sum(1)


def backward_fold(z_s, z_t, lse_s, lse_t, entropy, grad_sum, g_logp, g_entropy, g_div, targets, col0: int,
                  cfg: StatsConfig, out) -> None:
    """Write the chunk's dlogits of ``sum(g_logp logp + g_entropy H + g_div D)`` w.r.t. the raw logits into ``out``.

    ``z_t`` is None when no divergence gradient flows; ``g_*`` are [R] (zeros where an output is unused);
    ``grad_sum`` is A per row; ``out`` is [R, C] in the dlogits dtype.
    """
    _transform_(z_s, cfg)
    log_q = z_s - lse_s.unsqueeze(1)
    q = log_q.exp()
    dz = -(g_entropy.unsqueeze(1) * q) * (log_q + entropy.unsqueeze(1))
    dz -= g_logp.unsqueeze(1) * q
    width = z_s.shape[1]
    local = targets - col0
    inside = (local >= 0) & (local < width)
    dz.scatter_add_(1, local.clamp(0, width - 1).unsqueeze(1),
                    torch.where(inside, g_logp, torch.zeros_like(g_logp)).unsqueeze(1))
    if z_t is not None:
        _transform_(z_t, cfg)
        d, a = _entries(log_q, z_t - lse_t.unsqueeze(1), cfg)
        if cfg.clip is not None:
            a = torch.where(d <= cfg.clip, a, torch.zeros_like(a))
        dz += g_div.unsqueeze(1) * (a - q * grad_sum.unsqueeze(1))
    if cfg.softcap is not None:
        t = z_s * (cfg.temperature / cfg.softcap)
        dz *= 1.0 - t * t
    if cfg.temperature != 1.0:
        dz *= 1.0 / cfg.temperature
    out.copy_(dz)
