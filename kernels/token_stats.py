"""Triton backend of the core op (imported as ``pydistill.kernels.token_stats``).

Same contract as :mod:`pydistill.chunked` (``stats_forward`` / ``stats_backward``), on 2-D tiles of
rows x vocabulary:

- forward: a program owns a block of rows and one split of the vocabulary; it walks its [BLOCK_N, BLOCK_V]
  logits tiles (fp32-accumulated dots over H) keeping online max-rescaled statistics (running max, sum of
  exponentials, and the exp-weighted sums the entropy and the KLs need) and writes them as [N, n_splits]
  partials that a few [N]-sized torch ops merge (the split-LSE idea of Cut Cross-Entropy). JSD and the pointwise clip
  need the final log-sum-exps entry by entry: a second kernel sweeps the tiles again.
- backward: each program recomputes its tile, forms the combined dlogits of all three outputs at once and
  adds dz @ W into dH and dz^T @ h into dW with fp32 atomics. No [N, V] tensor ever reaches global memory.
- when the teacher head is the student's (self-distillation), each loaded W tile serves both dots.

The per-entry algebra is the chunked backend's: for the divergence's entries d_v and a_v = q_v dd_v/dq_v,
D = sum_v min(d_v, tau) and dD/dz_v = 1[v in U] a_v - q_v A with A = sum_{u in U} a_u.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..stats_config import StatsConfig

# Tile sizes. The interpreter (TRITON_INTERPRET=1) runs each program in numpy, so larger tiles are faster there.
if os.environ.get("TRITON_INTERPRET") == "1":
    BLOCKS = dict(BLOCK_N=32, BLOCK_V=256, BLOCK_H=64, num_warps=4)
else:
    BLOCKS = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8)

_KIND = {None: 0, "forward_kl": 1, "reverse_kl": 2, "jsd": 3}


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST: the CPU interpreter mishandles bf16 dots, so it multiplies
    fp32 copies there; GPUs take the bf16 operands straight to the tensor cores."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, width, stride_h, stride_w,
                 inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """z = cap(h W^T + b) / T on one tile, fp32; also the softcap's derivative factor (1 without a cap)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_H)
    for k0 in range(0, width, BLOCK_H):
        k_ok = (k0 + ks) < width
        h = tl.load(h_ptr + rows[:, None] * stride_h + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + (k0 + ks)[None, :], mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = _dot(h, tl.trans(w), acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    cap_grad = tl.full((BLOCK_N, BLOCK_V), 1.0, tl.float32)
    if HAS_CAP:
        t = _tanh(acc / softcap)
        acc = softcap * t
        cap_grad = 1.0 - t * t
    return acc * inv_temp, cap_grad


@triton.jit
def _two_logits_tiles(h_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok, width, width_t,
                      stride_h, stride_w, stride_ht, stride_wt, inv_temp, softcap, HAS_BIAS: tl.constexpr,
                      HAS_TBIAS: tl.constexpr, HAS_CAP: tl.constexpr, SHARED_W: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Student and teacher tiles; with a shared head one load of each W tile feeds both dots."""
    if SHARED_W:
        acc_s = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        acc_t = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        ks = tl.arange(0, BLOCK_H)
        for k0 in range(0, width, BLOCK_H):
            k_ok = (k0 + ks) < width
            w = tl.load(w_ptr + cols[:, None] * stride_w + (k0 + ks)[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            h = tl.load(h_ptr + rows[:, None] * stride_h + (k0 + ks)[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            ht = tl.load(ht_ptr + rows[:, None] * stride_ht + (k0 + ks)[None, :],
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc_s = _dot(h, tl.trans(w), acc_s, PRECISION, UPCAST)
            acc_t = _dot(ht, tl.trans(w), acc_t, PRECISION, UPCAST)
        if HAS_BIAS:
            acc_s += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_TBIAS:
            acc_t += tl.load(bt_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        cap_grad = tl.full((BLOCK_N, BLOCK_V), 1.0, tl.float32)
        if HAS_CAP:
            t_s = _tanh(acc_s / softcap)
            acc_s = softcap * t_s
            cap_grad = 1.0 - t_s * t_s
            acc_t = softcap * _tanh(acc_t / softcap)
        z_s = acc_s * inv_temp
        z_t = acc_t * inv_temp
    else:
        z_s, cap_grad = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, width, stride_h, stride_w,
                                     inv_temp, softcap, HAS_BIAS, HAS_CAP, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
        z_t, _ = _logits_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok, width_t, stride_ht, stride_wt,
                              inv_temp, softcap, HAS_TBIAS, HAS_CAP, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
    return z_s, z_t, cap_grad


@triton.jit
def _divergence_entries(log_q, log_p, beta, KIND: tl.constexpr):
    """Per-entry term d_v and a_v = q_v dd_v/dq_v (KIND: 1 forward KL, 2 reverse KL, 3 JSD)."""
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
        x = log_p + tl.log(beta)
        y = log_q + tl.log(1.0 - beta)
        mx = tl.maximum(x, y)
        log_m = mx + tl.log(tl.exp(x - mx) + tl.exp(y - mx))
        l_q = log_q - log_m
        d = beta * p * (log_p - log_m) + (1.0 - beta) * q * l_q
        a = (1.0 - beta) * q * l_q
    return d, a


@triton.jit
def _forward_partials_kernel(
    h_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr, y_ptr,
    m_s_ptr, s_s_ptr, ez_s_ptr, gap_s_ptr, m_t_ptr, s_t_ptr, gap_t_ptr, zy_ptr,
    n_rows, vocab, width, width_t, stride_h, stride_w, stride_ht, stride_wt, n_splits, cols_per_split,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_TEACHER: tl.constexpr,
    SHARED_W: tl.constexpr, HAS_TARGETS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online statistics of one row block over one split of the vocabulary (a few splits per row block give
    the GPU enough programs while the partials stay [N, n_splits], a few floats per row)."""
    pid_n, pid_split = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    v_start = pid_split * cols_per_split
    v_stop = tl.minimum(v_start + cols_per_split, vocab)
    neg_inf = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    zero = tl.zeros((BLOCK_N,), tl.float32)
    m_s, s_s, ez_s, gap_s, m_t, s_t, gap_t, z_y = neg_inf, zero, zero, zero, neg_inf, zero, zero, zero
    if HAS_TARGETS:
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_stop
        valid = col_ok[None, :]
        if HAS_TEACHER:
            z_s, z_t, _ = _two_logits_tiles(h_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok,
                                            width, width_t, stride_h, stride_w, stride_ht, stride_wt, inv_temp,
                                            softcap, HAS_BIAS, HAS_TBIAS, HAS_CAP, SHARED_W, BLOCK_N, BLOCK_V,
                                            BLOCK_H, PRECISION, UPCAST)
        else:
            z_s, _ = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, width, stride_h, stride_w,
                                  inv_temp, softcap, HAS_BIAS, HAS_CAP, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
        m_new = tl.maximum(m_s, tl.max(tl.where(valid, z_s, float("-inf")), axis=1))
        scale = tl.exp(m_s - m_new)
        e_s = tl.where(valid, tl.exp(z_s - m_new[:, None]), 0.0)
        s_s = s_s * scale + tl.sum(e_s, axis=1)
        ez_s = ez_s * scale + tl.sum(e_s * tl.where(valid, z_s, 0.0), axis=1)
        if HAS_TEACHER:
            gap = tl.where(valid, z_s - z_t, 0.0)
            gap_s = gap_s * scale + tl.sum(e_s * gap, axis=1)
            mt_new = tl.maximum(m_t, tl.max(tl.where(valid, z_t, float("-inf")), axis=1))
            scale_t = tl.exp(m_t - mt_new)
            e_t = tl.where(valid, tl.exp(z_t - mt_new[:, None]), 0.0)
            s_t = s_t * scale_t + tl.sum(e_t, axis=1)
            gap_t = gap_t * scale_t + tl.sum(e_t * gap, axis=1)
            m_t = mt_new
        m_s = m_new
        if HAS_TARGETS:
            z_y += tl.sum(tl.where((cols[None, :] == y[:, None]) & valid, z_s, 0.0), axis=1)
    out = rows * n_splits + pid_split
    tl.store(m_s_ptr + out, m_s, mask=row_ok)
    tl.store(s_s_ptr + out, s_s, mask=row_ok)
    tl.store(ez_s_ptr + out, ez_s, mask=row_ok)
    if HAS_TEACHER:
        tl.store(gap_s_ptr + out, gap_s, mask=row_ok)
        tl.store(m_t_ptr + out, m_t, mask=row_ok)
        tl.store(s_t_ptr + out, s_t, mask=row_ok)
        tl.store(gap_t_ptr + out, gap_t, mask=row_ok)
    if HAS_TARGETS:
        tl.store(zy_ptr + out, z_y, mask=row_ok)


@triton.jit
def _divergence_sweep_kernel(
    h_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr, lse_s_ptr, lse_t_ptr, d_ptr, a_ptr,
    n_rows, vocab, width, width_t, stride_h, stride_w, stride_ht, stride_wt, n_splits, cols_per_split,
    inv_temp, softcap, beta, tau,
    HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, HAS_CAP: tl.constexpr, SHARED_W: tl.constexpr,
    KIND: tl.constexpr, HAS_CLIP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Per (row, split): sum_v min(d_v, tau) and sum_{v in U} a_v with the final log-sum-exps."""
    pid_n, pid_split = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    v_start = pid_split * cols_per_split
    v_stop = tl.minimum(v_start + cols_per_split, vocab)
    lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
    d_sum = tl.zeros((BLOCK_N,), tl.float32)
    a_sum = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_stop
        z_s, z_t, _ = _two_logits_tiles(h_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok,
                                        width, width_t, stride_h, stride_w, stride_ht, stride_wt, inv_temp, softcap,
                                        HAS_BIAS, HAS_TBIAS, HAS_CAP, SHARED_W, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
        valid = col_ok[None, :] & row_ok[:, None]
        d, a = _divergence_entries(tl.where(valid, z_s - lse_s[:, None], 0.0),
                                   tl.where(valid, z_t - lse_t[:, None], 0.0), beta, KIND)
        if HAS_CLIP:
            kept = d <= tau
            d = tl.where(kept, d, tau)
            a = tl.where(kept, a, 0.0)
        d_sum += tl.sum(tl.where(valid, d, 0.0), axis=1)
        a_sum += tl.sum(tl.where(valid, a, 0.0), axis=1)
    out = rows * n_splits + pid_split
    tl.store(d_ptr + out, d_sum, mask=row_ok)
    tl.store(a_ptr + out, a_sum, mask=row_ok)


@triton.jit
def _backward_kernel(
    h_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr, y_ptr,
    lse_s_ptr, lse_t_ptr, ent_ptr, gsum_ptr, g_logp_ptr, g_ent_ptr, g_div_ptr,
    dh_ptr, dw_ptr,
    n_rows, vocab, width, width_t, stride_h, stride_w, stride_ht, stride_wt,
    inv_temp, softcap, beta, tau,
    HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, HAS_CAP: tl.constexpr, SHARED_W: tl.constexpr,
    KIND: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_TARGETS: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n, pid_v = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < n_rows, cols < vocab
    if KIND != 0:
        z_s, z_t, cap_grad = _two_logits_tiles(h_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok,
                                               col_ok, width, width_t, stride_h, stride_w, stride_ht, stride_wt,
                                               inv_temp, softcap, HAS_BIAS, HAS_TBIAS, HAS_CAP, SHARED_W, BLOCK_N,
                                               BLOCK_V, BLOCK_H, PRECISION, UPCAST)
    else:
        z_s, cap_grad = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, width, stride_h, stride_w,
                                     inv_temp, softcap, HAS_BIAS, HAS_CAP, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
    valid = col_ok[None, :] & row_ok[:, None]
    lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
    log_q = tl.where(valid, z_s - lse_s[:, None], 0.0)
    q = tl.where(valid, tl.exp(log_q), 0.0)
    g_ent = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
    entropy = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    dz = -g_ent[:, None] * q * (log_q + entropy[:, None])
    if HAS_TARGETS:
        g_logp = tl.load(g_logp_ptr + rows, mask=row_ok, other=0.0)
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
        dz += g_logp[:, None] * (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - q)
    if KIND != 0:
        lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
        d, a = _divergence_entries(log_q, tl.where(valid, z_t - lse_t[:, None], 0.0), beta, KIND)
        if HAS_CLIP:
            a = tl.where(d <= tau, a, 0.0)
        g_div = tl.load(g_div_ptr + rows, mask=row_ok, other=0.0)
        gsum = tl.load(gsum_ptr + rows, mask=row_ok, other=0.0)
        dz += g_div[:, None] * (a - q * gsum[:, None])
    dx = tl.where(valid, dz * cap_grad * inv_temp, 0.0)
    ks = tl.arange(0, BLOCK_H)
    for k0 in range(0, width, BLOCK_H):
        k_ok = (k0 + ks) < width
        w = tl.load(w_ptr + cols[:, None] * stride_w + (k0 + ks)[None, :], mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0)
        dh = _dot(dx.to(w.dtype), w, tl.zeros((BLOCK_N, BLOCK_H), tl.float32), PRECISION, UPCAST)
        tl.atomic_add(dh_ptr + rows[:, None] * width + (k0 + ks)[None, :], dh, mask=row_ok[:, None] & k_ok[None, :])
        if NEED_DW:
            h = tl.load(h_ptr + rows[:, None] * stride_h + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            dw = _dot(tl.trans(dx.to(h.dtype)), h, tl.zeros((BLOCK_V, BLOCK_H), tl.float32), PRECISION, UPCAST)
            tl.atomic_add(dw_ptr + cols[:, None] * width + (k0 + ks)[None, :], dw,
                          mask=col_ok[:, None] & k_ok[None, :])


def _precision(dtype) -> str:
    # fp32 inputs keep full fp32 products (no TF32 rounding of the logits); 16-bit inputs use tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _common(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, cfg: StatsConfig):
    with_teacher = cfg.divergence is not None
    shared = with_teacher and (teacher_weight is weight or (teacher_weight.data_ptr() == weight.data_ptr()
                                                            and teacher_weight.shape == weight.shape
                                                            and teacher_weight.stride() == weight.stride()))
    hidden, weight = hidden.contiguous(), weight.contiguous()
    if with_teacher:
        teacher_hidden = teacher_hidden.contiguous().to(hidden.dtype if shared else teacher_hidden.dtype)
        teacher_weight = weight if shared else teacher_weight.contiguous()
    else:
        teacher_hidden, teacher_weight = hidden, weight  # placeholders, never read
    n, width = hidden.shape
    vocab = weight.shape[0]
    return dict(
        args=(hidden, weight, bias if bias is not None else weight, teacher_hidden, teacher_weight,
              teacher_bias if teacher_bias is not None else weight),
        sizes=(n, vocab, width, teacher_hidden.shape[1], hidden.stride(0), weight.stride(0),
               teacher_hidden.stride(0), teacher_weight.stride(0)),
        flags=dict(HAS_BIAS=bias is not None, HAS_TBIAS=with_teacher and teacher_bias is not None,
                   HAS_CAP=cfg.softcap is not None),
        shared=bool(shared), n=n, vocab=vocab, width=width,
        scalars=(1.0 / cfg.temperature, float(cfg.softcap or 1.0)),
        precision=_precision(hidden.dtype),
        upcast=os.environ.get("TRITON_INTERPRET") == "1" and torch.bfloat16 in (hidden.dtype, teacher_hidden.dtype),
    )


def _merge(m, s, *sums):
    """Merge per-block (max, sum exp, weighted sums) into per-row totals relative to the global max."""
    top = m.max(dim=1).values
    scale = torch.exp(m - top[:, None])
    return top, (s * scale).sum(1), [(x * scale).sum(1) for x in sums]


def _vocab_splits(n: int, vocab: int, block_n: int, block_v: int):
    """How many programs share a row block's vocabulary: enough programs to fill the GPU, few partials."""
    row_blocks = triton.cdiv(n, block_n)
    v_blocks = triton.cdiv(vocab, block_v)
    target = 4 * (torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 1)
    splits = max(1, min(v_blocks, triton.cdiv(target, row_blocks)))
    return splits, triton.cdiv(v_blocks, splits) * block_v


def stats_forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets, cfg: StatsConfig):
    """Per-row (logp, entropy, divergence, lse_s, lse_t, grad_sum), float32 [N] each."""
    c = _common(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, cfg)
    n, vocab = c["n"], c["vocab"]
    bn, bv, bh = BLOCKS["BLOCK_N"], BLOCKS["BLOCK_V"], BLOCKS["BLOCK_H"]
    n_splits, cols_per_split = _vocab_splits(n, vocab, bn, bv)
    dev = hidden.device
    with_teacher = cfg.divergence is not None
    m_s, s_s, ez_s, gap_s, m_t, s_t, gap_t, z_y = (torch.empty(n, n_splits, device=dev, dtype=torch.float32)
                                                   for _ in range(8))
    grid = (triton.cdiv(n, bn), n_splits)
    _forward_partials_kernel[grid](
        *c["args"], targets if cfg.has_targets else z_y, m_s, s_s, ez_s, gap_s, m_t, s_t, gap_t, z_y,
        n, vocab, c["width"], *c["sizes"][3:], n_splits, cols_per_split, *c["scalars"],
        HAS_TEACHER=with_teacher, SHARED_W=c["shared"], HAS_TARGETS=cfg.has_targets,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, PRECISION=c["precision"], UPCAST=c["upcast"], num_warps=BLOCKS["num_warps"], **c["flags"])
    top_s, sum_s, (sum_ez, sum_gap_s) = _merge(m_s, s_s, ez_s, gap_s)
    lse_s = top_s + torch.log(sum_s)
    entropy = lse_s - sum_ez / sum_s
    zeros = torch.zeros(n, device=dev, dtype=torch.float32)
    logp = z_y.sum(1) - lse_s if cfg.has_targets else zeros
    if not with_teacher:
        return logp, entropy, zeros, lse_s, zeros, zeros
    top_t, sum_t, (sum_gap_t,) = _merge(m_t, s_t, gap_t)
    lse_t = top_t + torch.log(sum_t)
    if cfg.needs_second_sweep:
        d_part = torch.empty(n, n_splits, device=dev, dtype=torch.float32)
        a_part = torch.empty_like(d_part)
        _divergence_sweep_kernel[grid](
            *c["args"], lse_s, lse_t, d_part, a_part, n, vocab, c["width"], *c["sizes"][3:], n_splits,
            cols_per_split, *c["scalars"], float(cfg.beta), float(cfg.clip or 0.0), SHARED_W=c["shared"],
            KIND=_KIND[cfg.divergence], HAS_CLIP=cfg.clip is not None, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
            PRECISION=c["precision"], UPCAST=c["upcast"], num_warps=BLOCKS["num_warps"], **c["flags"])
        return logp, entropy, d_part.sum(1), lse_s, lse_t, a_part.sum(1)
    if cfg.divergence == "forward_kl":
        div = lse_s - lse_t - sum_gap_t / sum_t
        return logp, entropy, div, lse_s, lse_t, torch.full_like(div, -1.0)
    div = sum_gap_s / sum_s - lse_s + lse_t
    return logp, entropy, div, lse_s, lse_t, div + 1.0


def stats_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets, cfg: StatsConfig,
                   lse_s, lse_t, entropy, grad_sum, g_logp, g_entropy, g_div, need_weight_grad: bool):
    """(d hidden in hidden's dtype, d weight in float32 or None); any upstream gradient may be None."""
    c = _common(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, cfg)
    n, vocab, width = c["n"], c["vocab"], c["width"]
    bn, bv, bh = BLOCKS["BLOCK_N"], BLOCKS["BLOCK_V"], BLOCKS["BLOCK_H"]
    dev = hidden.device
    zeros = torch.zeros(n, device=dev, dtype=torch.float32)
    as_row = (lambda g: zeros if g is None else g.float().contiguous())  # noqa: E731
    use_div = cfg.divergence is not None and g_div is not None
    d_hidden = torch.zeros(n, width, device=dev, dtype=torch.float32)
    d_weight = torch.zeros(vocab, width, device=dev, dtype=torch.float32) if need_weight_grad else d_hidden
    grid = (triton.cdiv(n, bn), triton.cdiv(vocab, bv))
    _backward_kernel[grid](
        *c["args"], targets if cfg.has_targets else zeros, lse_s, lse_t, entropy, grad_sum, as_row(g_logp),
        as_row(g_entropy), as_row(g_div), d_hidden, d_weight, n, vocab, width, *c["sizes"][3:], *c["scalars"],
        float(cfg.beta), float(cfg.clip or 0.0), SHARED_W=c["shared"],
        KIND=_KIND[cfg.divergence] if use_div else 0, HAS_CLIP=cfg.clip is not None,
        HAS_TARGETS=cfg.has_targets and g_logp is not None, NEED_DW=need_weight_grad, BLOCK_N=bn, BLOCK_V=bv,
        BLOCK_H=bh, PRECISION=c["precision"], UPCAST=c["upcast"], num_warps=BLOCKS["num_warps"], **c["flags"])
    return d_hidden.to(hidden.dtype), (d_weight if need_weight_grad else None)


__all__ = ["BLOCKS", "stats_backward", "stats_forward"]
