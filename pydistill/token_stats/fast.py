"""The fast mode of the core op: the gradient formed in the forward, 4 GEMM passes instead of 6.

A row block whose logits stay in memory over the whole vocabulary knows its final log-sum-exps (and the clip's
and JSD's sums) before it leaves the forward, so the same folds that the lean backward runs can run there and
write the gradient of each output w.r.t. the raw logits with a unit upstream gradient: the *basis* B_k, one
[F, V] per output the caller will differentiate (``differentiated``). The upstream gradient g_k is per row, so
the backward only multiplies: dZ = sum_k g_k B_k, dH = dZ W, dW = dZ^T h. With one output carrying gradient
(every loss in ``pydistill.losses`` but the blend) that is dH = g (B W) and dW = B^T (g h), no [F, V] temporary.

The basis is kept in the dlogits dtype (bfloat16 for bfloat16 inputs on CUDA, the compute dtype elsewhere) and
grows with N: :func:`plan_fast` gives it the rows that fit the memory budget (all, some or none); the other rows
take the lean mode (:mod:`.loop`), so the gain grows with the budget instead of falling off a cliff.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import loop
from .config import StatsConfig
from .folds import M_S, M_T, S_S, S_T, STATE_ROWS

OUTPUTS = ("logp", "entropy", "divergence")
# At most this share of the budget, and never more than LEAN_BUDGET_MB, is kept for the lean rows of a partial
# plan: beyond a few hundred MB wider lean chunks gain little, while each basis row saves a third of its GEMMs.
LEAN_RESERVE_SHARE = 0.5
# Rows per fast block: more rows amortise each read of W; the block's logits must stay resident.
# On CUDA 512 rows (1024 stacked) keep a bf16 GEMM over a [V, H] head compute-bound (the H100's ridge is
# ~260 FLOP/byte), so re-reading W per block costs no time; the CPU's GEMMs saturate at far fewer rows.
FAST_BLOCK_ROWS = {"cuda": 512, "cpu": 128}
# Fewer rows than this re-read W for too little work: on CUDA a block's GEMM turns memory-bound and the re-reads
# cost more than the recompute the block saves, so such budgets stay lean.
MIN_FAST_BLOCK_ROWS = {"cuda": 256, "cpu": 32}


@dataclass(frozen=True)
class FastPlan:
    """Rows taking the fast path (the first ``fast_rows``), rows per resident block, vocabulary columns per GEMM,
    whether both contexts share one stacked GEMM, and the budget left to the lean rows."""

    fast_rows: int
    rows: int
    cols: int
    stacked: bool
    lean_budget_mb: float


def basis_bytes_per_row(vocab: int, outputs: int, dtype: torch.dtype, device: torch.device) -> int:
    dz = torch.empty((), dtype=loop.dlogits_dtype(dtype, device)).element_size()
    return outputs * vocab * dz


def plan_fast(n: int, width: int, vocab: int, dtype: torch.dtype, device: torch.device, *, outputs: int,
              two_contexts: bool, shared_head: bool, triton_folds: bool, budget_mb: float) -> Optional[FastPlan]:
    """How many rows (a prefix) keep a gradient basis within ``budget_mb``; None when too few fit.

    Counted while the fast rows are formed: the basis (``outputs`` x V per row), the block's resident float32
    logits of each context, the torch folds' temporaries per chunk, the stacked copy. The crossover: all rows
    fast when ``N * outputs * V * b + working <= budget`` (b = 2 bytes for bfloat16 on CUDA, 4 otherwise); some
    when the basis of at least one block fits beside the lean rows' reserve; none below.
    """
    kind = loop.device_kind(device)
    elem = torch.empty((), dtype=loop.compute_dtype(dtype)).element_size()
    in_elem = torch.empty((), dtype=dtype).element_size()
    contexts = 2 if two_contexts else 1
    cols = min(vocab, loop.MAX_COLS[kind])
    temporaries = 0 if triton_folds else (loop.TORCH_FOLD_TEMPORARIES + 1) * contexts * elem * cols
    upcast = dtype in (torch.float16, torch.bfloat16) and not (kind == "cuda" and dtype == torch.bfloat16)
    budget = budget_mb * 2 ** 20
    per_row = basis_bytes_per_row(vocab, outputs, dtype, device)
    fixed = cols * width * 4 if upcast else 0  # one float32 copy of a W chunk
    if dtype != loop.compute_dtype(dtype):
        fixed += n * width * 4  # the float32 dH accumulator of the backward

    def working(rows):
        return fixed + rows * (contexts * vocab * elem + temporaries + (2 * width * in_elem if shared_head else 0))

    rows = min(n, FAST_BLOCK_ROWS[kind])
    while rows > MIN_FAST_BLOCK_ROWS[kind] and working(rows) > budget / 4:
        rows = max(MIN_FAST_BLOCK_ROWS[kind], rows // 2)
    stacked = two_contexts and shared_head
    if n * per_row + working(rows) <= budget:
        return FastPlan(fast_rows=n, rows=rows, cols=cols, stacked=stacked, lean_budget_mb=budget_mb)
    reserve = min(budget * LEAN_RESERVE_SHARE, loop.LEAN_BUDGET_MB * 2 ** 20)
    fast_rows = int((budget - max(working(rows), reserve)) // per_row) // rows * rows
    if fast_rows < max(rows, MIN_FAST_BLOCK_ROWS[kind]):
        return None
    return FastPlan(fast_rows=fast_rows, rows=rows, cols=cols, stacked=stacked,
                    lean_budget_mb=(budget - fast_rows * per_row) / 2 ** 20)


def _chunk_logits(ops, stack, r0, r1, c0, c1, two, storage):
    """(z_s, z_t) raw float logits [R, c1 - c0] of rows r0:r1 in ``storage`` (the chunk's resident buffer,
    reused block after block); ``stack`` is the block's [2R, H] student-over-teacher rows when both contexts
    share the head, else None."""
    rows, w = r1 - r0, ops.weight_chunk(ops.w, c0, c1).t()
    buffer = storage[: (2 if two else 1) * rows * (c1 - c0)].view(-1, c1 - c0)
    if stack is not None:
        ops.mm(stack, w, buffer)
    else:
        ops.mm(ops.h[r0:r1], w, buffer[:rows])
        if two:
            ops.mm(ops.ht[r0:r1], w if ops.shared else ops.weight_chunk(ops.wt, c0, c1).t(), buffer[rows:])
    z_s, z_t = buffer[:rows], (buffer[rows:] if two else None)
    if ops.b is not None:
        z_s += ops.b[c0:c1]
    if z_t is not None and ops.bt is not None:
        z_t += ops.bt[c0:c1]
    return z_s, z_t


def fast_forward(folds, plan: FastPlan, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                 targets, cfg: StatsConfig, outputs):
    """The lean forward's six per-row tensors for these rows, plus the basis [len(outputs), N, V].

    Per block: one GEMM per chunk and context (kept), the forward fold over the chunks, the divergence fold
    (JSD, clip) with the block's final log-sum-exps, then per output the backward fold with a unit upstream
    gradient writing that output's basis rows. The torch folds transform their chunk in place, so every fold
    but the last reads a copy.
    """
    ops = loop._Operands(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, cfg)
    n, vocab = hidden.shape[0], weight.shape[0]
    basis = torch.empty(len(outputs), n, vocab, device=ops.device, dtype=loop.dlogits_dtype(hidden.dtype, ops.device))
    state = torch.zeros(STATE_ROWS, n, device=ops.device, dtype=ops.acc)
    state[M_S] = state[M_T] = -math.inf
    sums = torch.zeros(2, n, device=ops.device, dtype=ops.acc)
    y = targets if targets is not None else torch.full((n,), -1, device=ops.device, dtype=torch.long)
    col_chunks = [(c0, min(c0 + plan.cols, vocab)) for c0 in range(0, vocab, plan.cols)]
    # Buffers allocated once and reused by every block: fresh [R, C] allocations per chunk cost the CPU a page
    # fault per 4 KiB (glibc maps blocks this large anew each time), more than the folds themselves.
    contexts = 2 if ops.two else 1
    resident = [torch.empty(contexts * min(plan.rows, n) * (c1 - c0), device=ops.device, dtype=ops.acc)
                for c0, c1 in col_chunks]
    scratch = torch.empty(contexts * min(plan.rows, n) * plan.cols, device=ops.device, dtype=ops.acc) \
        if folds.OVERWRITES_LOGITS else None

    def copy(z_s, z_t):
        """A copy of the pair in the scratch buffer when the folds overwrite their input, else the pair."""
        if scratch is None:
            return z_s, z_t
        out = scratch[: contexts * z_s.numel()].view(-1, z_s.shape[1])
        out[: z_s.shape[0]].copy_(z_s)
        if z_t is not None:
            out[z_s.shape[0]:].copy_(z_t)
        return out[: z_s.shape[0]], (out[z_s.shape[0]:] if z_t is not None else None)

    for r0 in range(0, n, plan.rows):
        r1 = min(r0 + plan.rows, n)
        stack = torch.cat([ops.h[r0:r1], ops.ht[r0:r1]]) if ops.two and plan.stacked else None
        chunks = [_chunk_logits(ops, stack, r0, r1, c0, c1, ops.two, storage)
                  for (c0, c1), storage in zip(col_chunks, resident)]
        block = state[:, r0:r1]
        for (c0, _), (z_s, z_t) in zip(col_chunks, chunks):
            folds.forward_fold(*copy(z_s, z_t), block, y[r0:r1], c0, cfg)
        lse_s, lse_t = loop._lse(block, M_S, S_S), loop._lse(block, M_T, S_T)
        if ops.two and cfg.needs_second_sweep:
            for z_s, z_t in chunks:
                folds.divergence_fold(*copy(z_s, z_t), lse_s, lse_t, sums[:, r0:r1], cfg)
        _, entropy, _, _, _, grad_sum = loop.finish_forward(block, sums[:, r0:r1], cfg, targets is not None)
        one = torch.ones_like(lse_s)
        for k, name in enumerate(outputs):
            g = [one if name == o else None for o in OUTPUTS]
            last = k == len(outputs) - 1
            for (c0, c1), (z_s, z_t) in zip(col_chunks, chunks):
                z_s, z_t = (z_s, z_t) if last else copy(z_s, z_t)
                folds.backward_fold(z_s, z_t if name == "divergence" else None, lse_s, lse_t, entropy, grad_sum,
                                    *g, y[r0:r1], c0, cfg, basis[k, r0:r1, c0:c1])
    return loop.finish_forward(state, sums, cfg, targets is not None) + (basis,)


def fast_backward(basis, gradients, hidden, weight, need_weight_grad: bool, d_weight=None):
    """(dH in the compute dtype, dW in the weight's dtype or None) of these rows from the basis and the per-row
    upstream gradients (one per basis output, None where the output carries none). Consumes the basis when
    more than one output carries gradient (they are summed into the first one's storage). ``d_weight``: the
    lean rows' dW, which this adds to instead of allocating a second [V, H]."""
    present = [(k, g) for k, g in enumerate(gradients) if g is not None]
    acc = loop.compute_dtype(hidden.dtype)
    n, width = hidden.shape
    if not present:
        return (torch.zeros(n, width, device=hidden.device, dtype=acc),
                (torch.zeros_like(weight) if d_weight is None else d_weight) if need_weight_grad else None)
    k0, g = present[0]
    dz = basis[k0]
    if len(present) > 1:  # dZ = sum_k g_k B_k into the first basis's storage, then a unit row gradient
        _combine(dz, [(basis[k], gk) for k, gk in present], acc)
        g = torch.ones_like(g)
    g = g.to(acc)
    # g (B W): the per-row factor after the GEMM; B^T (g h): the factor on the small [N, H] side
    gh = (hidden.to(acc) * g.unsqueeze(1)).to(dz.dtype)
    vocab = weight.shape[0]
    # the whole vocabulary in one GEMM when no operand needs a float32 copy (a torch without float32-output
    # GEMMs of 16-bit operands, before 2.8, copies each chunk)
    whole = weight.dtype == dz.dtype and (dz.dtype == acc or loop.mixed_gemms(dz.device, dz.dtype)[0])
    step = vocab if whole else loop.MAX_COLS[loop.device_kind(dz.device)]
    d_hidden = torch.zeros(n, width, device=hidden.device, dtype=acc)
    accumulate = d_weight is not None
    if need_weight_grad and not accumulate:
        d_weight = torch.empty_like(weight)
    ops = loop._Operands.__new__(loop._Operands)  # only its GEMM helpers are used
    for c0 in range(0, vocab, step):
        c1 = min(c0 + step, vocab)
        w = weight[c0:c1] if weight.dtype == dz.dtype else weight[c0:c1].to(dz.dtype)
        ops.addmm_(d_hidden, dz[:, c0:c1], w)
        if need_weight_grad and accumulate and d_weight.dtype == dz.dtype:
            ops.addmm_(d_weight[c0:c1], dz[:, c0:c1].t(), gh)
        elif need_weight_grad and accumulate:  # a 16-bit dW (the CPU's basis is float32): one rounding of the sum
            d_weight[c0:c1].copy_(torch.addmm(d_weight[c0:c1].to(dz.dtype), dz[:, c0:c1].t(), gh))
        elif need_weight_grad:
            loop._write_weight_grad(d_weight[c0:c1], dz[:, c0:c1].t(), gh)
    return d_hidden.mul_(g.unsqueeze(1)), d_weight


def _combine(dz, terms, acc):
    """dz = sum_k g_k B_k over the (basis, row gradient) ``terms``, dz being the first term's basis. A 16-bit
    basis is summed in the compute dtype a row block at a time and rounded once, as the lean mode's fold rounds
    its dlogits (rounding each g_k, product and partial sum to bfloat16 cost about a fifth more gradient error);
    a block's float32 sum is no larger than one context's logits of the smallest fast block the forward kept."""
    rows = lambda g, r0, r1: g[r0:r1].to(acc).unsqueeze(1)  # noqa: E731
    n = dz.shape[0]
    if dz.dtype == acc:
        dz.mul_(rows(terms[0][1], 0, n))
        for b, gk in terms[1:]:
            dz.addcmul_(b, rows(gk, 0, n))
        return
    step = max(1, min(n, MIN_FAST_BLOCK_ROWS[loop.device_kind(dz.device)]))
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        total = dz[r0:r1] * rows(terms[0][1], r0, r1)  # 16-bit times float32: a float32 block
        for b, gk in terms[1:]:
            total.addcmul_(b[r0:r1], rows(gk, r0, r1))
        dz[r0:r1].copy_(total)
