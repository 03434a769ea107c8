"""The per-chunk folds of the core op as Triton kernels (imported as ``pydistill.kernels.folds``).

Same three functions, arguments and math as the torch spelling in ``pydistill/token_stats/folds.py``
(whose docstring defines the state and the per-entry algebra); the chunk loop calls these on CUDA. The GEMMs
stay in cuBLAS: each kernel reads one ``[R, C]`` float32 chunk of raw logits, one program per row walking the
chunk in BLOCK-wide vectors, so registers hold a few vectors and scalars (no spills, no atomics, no [N, V]).
"""
from __future__ import annotations

import math

import torch

import triton
import triton.language as tl

from ..token_stats.config import StatsConfig

BLOCK = 1024
OVERWRITES_LOGITS = False  # the kernels only read the logits chunk (the torch folds transform it in place)
NUM_WARPS = 4
KINDS = {None: 0, "forward_kl": 1, "reverse_kl": 2, "jsd": 3}


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _scaled(x, inv_temp, softcap, HAS_CAP: tl.constexpr):
    """z = cap(x) / T."""
    if HAS_CAP:
        x = softcap * _tanh(x / softcap)
    return x * inv_temp


@triton.jit
def _entries(log_q, log_p, beta, log_beta, log_1m_beta, KIND: tl.constexpr):
    """Per-entry d_v and a_v = q_v dd_v/dq_v (KIND 1 forward KL, 2 reverse KL, 3 JSD)."""
    q = tl.exp(log_q)
    if KIND == 1:
        p = tl.exp(log_p)
        d = p * (log_p - log_q)
        a = -p
    elif KIND == 2:
        r = log_q - log_p
        d = q * r
        a = q * (r + 1.0)
    else:
        p = tl.exp(log_p)
        x = log_p + log_beta
        y = log_q + log_1m_beta
        top = tl.maximum(x, y)
        log_m = top + tl.log(1.0 + tl.exp(tl.minimum(x, y) - top))
        l_q = log_q - log_m
        d = beta * p * (log_p - log_m) + (1.0 - beta) * q * l_q
        a = (1.0 - beta) * q * l_q
    return d, a


@triton.jit
def _forward_fold_kernel(zs_ptr, zt_ptr, z_stride, state_ptr, state_stride, y_ptr, col0, n_cols, inv_temp, softcap,
                         t_inv_temp, t_softcap, HAS_TEACHER: tl.constexpr, HAS_CAP: tl.constexpr,
                         T_HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * z_stride
    st = state_ptr + row
    m_s = tl.load(st)
    s_s = tl.load(st + state_stride)
    a_s = tl.load(st + 2 * state_stride)
    g_s = tl.load(st + 3 * state_stride)
    m_t = tl.load(st + 4 * state_stride)
    s_t = tl.load(st + 5 * state_stride)
    g_t = tl.load(st + 6 * state_stride)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        ok = cols < n_cols
        zs = _scaled(tl.load(zs_ptr + base + cols, mask=ok, other=0.0), inv_temp, softcap, HAS_CAP)
        m_new = tl.maximum(m_s, tl.max(tl.where(ok, zs, float("-inf")), axis=0))
        scale = tl.exp(m_s - m_new)
        e = tl.where(ok, tl.exp(zs - m_new), 0.0)
        shift = tl.where(s_s > 0, m_new - m_s, 0.0) * s_s  # 0, not inf * 0, before the first block
        a_s = scale * (a_s + shift) + tl.sum(e * (m_new - zs), axis=0)
        s_s = s_s * scale + tl.sum(e, axis=0)
        if HAS_TEACHER:
            zt = _scaled(tl.load(zt_ptr + base + cols, mask=ok, other=0.0), t_inv_temp, t_softcap, T_HAS_CAP)
            gap = zs - zt
            g_s = g_s * scale + tl.sum(e * gap, axis=0)
            mt_new = tl.maximum(m_t, tl.max(tl.where(ok, zt, float("-inf")), axis=0))
            scale_t = tl.exp(m_t - mt_new)
            e_t = tl.where(ok, tl.exp(zt - mt_new), 0.0)
            g_t = g_t * scale_t + tl.sum(e_t * gap, axis=0)
            s_t = s_t * scale_t + tl.sum(e_t, axis=0)
            m_t = mt_new
        m_s = m_new
    local = tl.load(y_ptr + row) - col0
    inside = (local >= 0) & (local < n_cols)
    picked = _scaled(tl.load(zs_ptr + base + tl.where(inside, local, 0)), inv_temp, softcap, HAS_CAP)
    z_y = tl.where(inside, picked, tl.load(st + 7 * state_stride))
    tl.store(st, m_s)
    tl.store(st + state_stride, s_s)
    tl.store(st + 2 * state_stride, a_s)
    tl.store(st + 7 * state_stride, z_y)
    if HAS_TEACHER:
        tl.store(st + 3 * state_stride, g_s)
        tl.store(st + 4 * state_stride, m_t)
        tl.store(st + 5 * state_stride, s_t)
        tl.store(st + 6 * state_stride, g_t)


@triton.jit
def _divergence_fold_kernel(zs_ptr, zt_ptr, z_stride, lse_s_ptr, lse_t_ptr, sums_ptr, sums_stride, n_cols,
                            inv_temp, softcap, t_inv_temp, t_softcap, beta, log_beta, log_1m_beta, tau,
                            KIND: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_CAP: tl.constexpr,
                            T_HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * z_stride
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    d_acc = tl.zeros((BLOCK,), tl.float32)
    a_acc = tl.zeros((BLOCK,), tl.float32)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        ok = cols < n_cols
        # the teacher's chunk first: in the other order ptxas (sm_90a) spills 4 B for a capped student beside an
        # uncapped teacher (forward KL)
        zt = _scaled(tl.load(zt_ptr + base + cols, mask=ok, other=0.0), t_inv_temp, t_softcap, T_HAS_CAP)
        zs = _scaled(tl.load(zs_ptr + base + cols, mask=ok, other=0.0), inv_temp, softcap, HAS_CAP)
        d, a = _entries(zs - lse_s, zt - lse_t, beta, log_beta, log_1m_beta, KIND)
        if HAS_CLIP:
            kept = d <= tau
            d = tl.where(kept, d, tau)
            a = tl.where(kept, a, 0.0)
        d_acc += tl.where(ok, d, 0.0)
        a_acc += tl.where(ok, a, 0.0)
    out = sums_ptr + row
    tl.store(out, tl.load(out) + tl.sum(d_acc, axis=0))
    tl.store(out + sums_stride, tl.load(out + sums_stride) + tl.sum(a_acc, axis=0))


@triton.jit
def _backward_fold_kernel(zs_ptr, zt_ptr, z_stride, out_ptr, out_stride, lse_s_ptr, lse_t_ptr, ent_ptr, gsum_ptr,
                          g_logp_ptr, g_ent_ptr, g_div_ptr, y_ptr, col0, n_cols, inv_temp, softcap, t_inv_temp,
                          t_softcap, beta, log_beta, log_1m_beta, tau, KIND: tl.constexpr, HAS_CLIP: tl.constexpr,
                          HAS_CAP: tl.constexpr, T_HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * z_stride
    out_base = row.to(tl.int64) * out_stride
    lse_s = tl.load(lse_s_ptr + row)
    entropy = tl.load(ent_ptr + row)
    g_logp = tl.load(g_logp_ptr + row)
    g_ent = tl.load(g_ent_ptr + row)
    local = tl.load(y_ptr + row) - col0
    if KIND != 0:
        lse_t = tl.load(lse_t_ptr + row)
        gsum = tl.load(gsum_ptr + row)
        g_div = tl.load(g_div_ptr + row)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(zs_ptr + base + cols, mask=ok, other=0.0)
        if HAS_CAP:
            t = _tanh(x / softcap)
            zs = softcap * t * inv_temp
        else:
            zs = x * inv_temp
        log_q = zs - lse_s
        q = tl.exp(log_q)
        dz = -g_ent * q * (log_q + entropy) - g_logp * q + tl.where(cols == local, g_logp, 0.0)
        if KIND != 0:
            zt = _scaled(tl.load(zt_ptr + base + cols, mask=ok, other=0.0), t_inv_temp, t_softcap, T_HAS_CAP)
            d, a = _entries(log_q, zt - lse_t, beta, log_beta, log_1m_beta, KIND)
            if HAS_CLIP:
                a = tl.where(d <= tau, a, 0.0)
            dz += g_div * (a - q * gsum)
        if HAS_CAP:
            dz = dz * (1.0 - t * t)
        dz = dz * inv_temp
        tl.store(out_ptr + out_base + cols, dz.to(out_ptr.dtype.element_ty), mask=ok)


def _scalars(cfg: StatsConfig):
    """inv_temp, softcap, the teacher's inv_temp and softcap, beta, log beta, log(1 - beta), tau as the kernels take
    them (finite placeholders)."""
    beta = cfg.beta if cfg.divergence == "jsd" else 0.5
    return (1.0 / cfg.temperature, float(cfg.softcap or 1.0), 1.0 / cfg.teacher_temperature,
            float(cfg.teacher_cap or 1.0), beta, math.log(beta), math.log1p(-beta), float(cfg.clip or 0.0))


def forward_fold(z_s, z_t, state, targets, col0: int, cfg: StatsConfig) -> None:
    """Triton spelling of :func:`pydistill.token_stats.folds.forward_fold` (same contract)."""
    rows, cols = z_s.shape
    inv_temp, softcap, t_inv_temp, t_softcap = _scalars(cfg)[:4]
    _forward_fold_kernel[(rows,)](
        z_s, z_s if z_t is None else z_t, z_s.stride(0), state, state.stride(0), targets, col0, cols, inv_temp,
        softcap, t_inv_temp, t_softcap, HAS_TEACHER=z_t is not None, HAS_CAP=cfg.softcap is not None,
        T_HAS_CAP=z_t is not None and cfg.teacher_cap is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)


def divergence_fold(z_s, z_t, lse_s, lse_t, sums, cfg: StatsConfig) -> None:
    """Triton spelling of :func:`pydistill.token_stats.folds.divergence_fold` (same contract)."""
    rows, cols = z_s.shape
    _divergence_fold_kernel[(rows,)](
        z_s, z_t, z_s.stride(0), lse_s, lse_t, sums, sums.stride(0), cols, *_scalars(cfg),
        KIND=KINDS[cfg.divergence], HAS_CLIP=cfg.clip is not None, HAS_CAP=cfg.softcap is not None,
        T_HAS_CAP=cfg.teacher_cap is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)


def backward_fold(z_s, z_t, lse_s, lse_t, entropy, grad_sum, g_logp, g_entropy, g_div, targets, col0: int,
                  cfg: StatsConfig, out) -> None:
    """Triton spelling of :func:`pydistill.token_stats.folds.backward_fold` (same contract)."""
    rows, cols = z_s.shape
    with_div = z_t is not None and g_div is not None
    if g_logp is None or g_entropy is None or g_div is None:  # the kernel reads every gradient: zeros stand in
        zeros = torch.zeros_like(lse_s)
        g_logp, g_entropy = (zeros if g is None else g for g in (g_logp, g_entropy))
    _backward_fold_kernel[(rows,)](
        z_s, z_t if with_div else z_s, z_s.stride(0), out, out.stride(0), lse_s, lse_t if with_div else lse_s,
        entropy, grad_sum if with_div else lse_s, g_logp, g_entropy, g_div if with_div else g_logp, targets, col0,
        cols, *_scalars(cfg), KIND=KINDS[cfg.divergence] if with_div else 0,
        HAS_CLIP=with_div and cfg.clip is not None, HAS_CAP=cfg.softcap is not None,
        T_HAS_CAP=with_div and cfg.teacher_cap is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)


def launch_configurations():
    """Every (kernel, signature, constexprs) the library can launch: what the compile check builds.

    Logits chunks are always float32; dlogits are bfloat16 (bf16 inputs) or float32 (fp32 and fp16 inputs).
    """
    f32, i32, i64 = "*fp32", "i32", "*i64"
    fwd = dict(zs_ptr=f32, zt_ptr=f32, z_stride=i32, state_ptr=f32, state_stride=i32, y_ptr=i64, col0=i32,
               n_cols=i32, inv_temp="fp32", softcap="fp32", t_inv_temp="fp32", t_softcap="fp32")
    div = dict(zs_ptr=f32, zt_ptr=f32, z_stride=i32, lse_s_ptr=f32, lse_t_ptr=f32, sums_ptr=f32, sums_stride=i32,
               n_cols=i32, inv_temp="fp32", softcap="fp32", t_inv_temp="fp32", t_softcap="fp32", beta="fp32",
               log_beta="fp32", log_1m_beta="fp32", tau="fp32")
    caps = [(cap, t_cap) for cap in (False, True) for t_cap in (False, True)]  # each context's cap, or none
    for teacher in (False, True):
        for cap, t_cap in (caps if teacher else [(False, False), (True, False)]):
            yield _forward_fold_kernel, fwd, dict(HAS_TEACHER=teacher, HAS_CAP=cap, T_HAS_CAP=t_cap, BLOCK=BLOCK)
    for kind in (1, 2, 3):
        for clip in (False, True):
            for cap, t_cap in caps:
                yield _divergence_fold_kernel, div, dict(KIND=kind, HAS_CLIP=clip, HAS_CAP=cap, T_HAS_CAP=t_cap,
                                                         BLOCK=BLOCK)
    for out in ("*bf16", f32):
        bwd = dict(zs_ptr=f32, zt_ptr=f32, z_stride=i32, out_ptr=out, out_stride=i32, lse_s_ptr=f32, lse_t_ptr=f32,
                   ent_ptr=f32, gsum_ptr=f32, g_logp_ptr=f32, g_ent_ptr=f32, g_div_ptr=f32, y_ptr=i64, col0=i32,
                   n_cols=i32, inv_temp="fp32", softcap="fp32", t_inv_temp="fp32", t_softcap="fp32", beta="fp32",
                   log_beta="fp32", log_1m_beta="fp32", tau="fp32")
        for kind in (0, 1, 2, 3):
            for clip in ((False,) if kind == 0 else (False, True)):
                for cap, t_cap in (caps if kind else [(False, False), (True, False)]):
                    yield _backward_fold_kernel, bwd, dict(KIND=kind, HAS_CLIP=clip, HAS_CAP=cap, T_HAS_CAP=t_cap,
                                                           BLOCK=BLOCK)


__all__ = ["BLOCK", "NUM_WARPS", "backward_fold", "divergence_fold", "forward_fold", "launch_configurations"]
