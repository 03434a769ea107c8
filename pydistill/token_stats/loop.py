"""The chunk loop of the core op: one algorithm on every device.

Forward: for each block of rows, for each vocabulary chunk, one GEMM (both contexts stacked when they share
the head and the copy fits the budget, else two GEMMs on the same W chunk) gives float32 logits — from 16-bit
inputs on CUDA through ``torch.mm(..., out_dtype=torch.float32)``, never rounded to 16 bits — and a fold turns
them into the online per-row state. JSD and the clip take a second sweep with the final log-sum-exps.
Backward: vocabulary groups outermost; per chunk of a group, the same GEMM and a fold that writes the combined
dlogits of all three outputs (bfloat16 for bfloat16 inputs, the compute dtype otherwise) into the group's
buffer; per group, ``dH += dZ_g W_g`` into a float32 accumulator and ``dW_g = dZ_g^T h`` written once in the
weight's dtype: no [V, H] float32 buffer, no atomics.

The folds are :mod:`.folds` (torch) or ``pydistill.kernels.folds`` (Triton); both take the same arguments.
Chunk sizes come from :func:`plan_chunks` and a memory budget.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
import torch

from .config import StatsConfig
from .folds import A_S, G_S, G_T, M_S, M_T, S_S, S_T, STATE_ROWS, Z_Y

# The default of the op's one speed/memory knob, shared by every loss, the trainers' configs and the TRL
# integration. 4 GiB is what a user replacing TRL's chunked head already spends (~3.7 GiB at N=8192, H=4096,
# V=151936 in TRL 1.16): within it a one-output loss at that shape keeps its whole bfloat16 gradient basis
# (2.4 GiB) and runs the fast mode. Lower it on a tight GPU: at 256 MB (LEAN_BUDGET_MB) the lean mode runs there.
DEFAULT_MEMORY_BUDGET_MB = 4096.0
# The lean mode's own budget: two contexts at that shape in bf16 on CUDA within 256 MB (plans asked without
# a budget, and the share a partial plan keeps for its lean rows at most).
LEAN_BUDGET_MB = 256.0
# Live [rows, chunk] temporaries of the torch folds, in units of one logits chunk (measured from folds.py:
# log_q, q, dz and the divergence entries); the Triton folds keep everything in registers.
TORCH_FOLD_TEMPORARIES = 6
MIN_COLS = 256
MAX_COLS = {"cuda": 16384, "cpu": 4096}
COL_ALIGN = 128
MAX_GROUP_CHUNKS = 8
# Fewest rows per block worth re-reading W for (plan_resident): the GEMM's W reads are amortised over them.
MIN_RESIDENT_ROWS = {"cuda": 128, "cpu": 32}


@dataclass(frozen=True)
class ChunkPlan:
    """Rows per block, vocabulary columns per GEMM chunk, dlogits columns per backward dH/dW GEMM (a multiple
    of ``cols``: wider groups mean fewer read-modify-writes of the float32 dH), and whether both contexts share
    one stacked GEMM."""

    rows: int
    cols: int
    group: int
    stacked: bool


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs are computed in float64, everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def device_kind(device: torch.device) -> str:
    """"cuda" or "cpu": which size tables and GEMM paths a device takes (the one place that asks, so that a test
    can run the CUDA branches' logic on CPU tensors)."""
    return "cuda" if device.type == "cuda" else "cpu"


def dlogits_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """bfloat16 dlogits for bfloat16 inputs on CUDA (tensor-core GEMMs); never float16: terms ~1e-10 underflow."""
    if device_kind(device) == "cuda" and dtype == torch.bfloat16:
        return torch.bfloat16
    return compute_dtype(dtype)


def plan_chunks(n: int, width: int, teacher_width: int, vocab: int, dtype: torch.dtype, device: torch.device, *,
                two_contexts: bool, shared_head: bool, triton_folds: bool,
                budget_mb: float = LEAN_BUDGET_MB) -> ChunkPlan:
    """Chunk sizes whose extra memory, forward or backward, stays within ``budget_mb``.

    Counted: the float32 logits chunk(s) and the torch folds' temporaries (per GEMM chunk), the dlogits group
    and, when rows are split, a float32 dW accumulator (per group), the float32 dH accumulator (when the
    gradient is not float32 already), float32 copies of 16-bit operands where the GEMM runs in float32, and the
    stacked [2R, H] copy. Not counted: inputs, returned gradients and O(N) state. At most half of what is left
    after the fixed buffers goes to the logits chunk; the rest widens the dlogits group (up to MAX_GROUP_CHUNKS
    chunks). Rows are halved only when even a MIN_COLS-wide chunk does not fit.
    """
    elem = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    contexts = 2 if two_contexts else 1
    upcast = dtype in (torch.float16, torch.bfloat16) and dlogits_dtype(dtype, device) != torch.bfloat16
    in_elem = torch.empty((), dtype=dtype).element_size()
    dz_elem = torch.empty((), dtype=dlogits_dtype(dtype, device)).element_size()
    fixed = 0
    if dtype != compute_dtype(dtype):
        fixed += n * width * 4  # float32 dH accumulator
    if upcast:
        fixed += (n * width + (n * teacher_width if two_contexts else 0)) * 4  # float32 copies of h (and h_t)
    budget = budget_mb * 2 ** 20
    max_cols = min(vocab, MAX_COLS[device_kind(device)])
    temporaries = 0 if triton_folds else TORCH_FOLD_TEMPORARIES * contexts * elem

    def plan_for(rows, stacked):
        free = budget - fixed - (2 * rows * width * in_elem if stacked else 0)
        logits_per_col = rows * (contexts * elem + temporaries) + (width * 4 if upcast else 0)
        dz_per_col = rows * dz_elem + (width * 4 if rows < n else 0)
        if free <= 0:
            return None
        cols = int(min(free / 2 / logits_per_col, free / (logits_per_col + dz_per_col)))
        cols = min(max_cols, cols if cols >= vocab else cols // COL_ALIGN * COL_ALIGN)
        if cols < min(MIN_COLS, vocab):
            return None
        chunks = int((free - cols * logits_per_col) // (cols * dz_per_col))
        chunks = max(1, min(MAX_GROUP_CHUNKS, chunks, -(-vocab // cols)))
        return ChunkPlan(rows=rows, cols=cols, group=cols * chunks, stacked=stacked)

    rows = n
    while True:
        for stacked in ((True, False) if two_contexts and shared_head and rows == n else (False,)):
            plan = plan_for(rows, stacked)
            if plan is not None:
                return plan
        if rows == 1:  # over budget whatever the split: the smallest plan
            cols = min(MIN_COLS, vocab)
            return ChunkPlan(rows=1, cols=cols, group=cols, stacked=False)
        rows = max(1, rows // 2)


def plan_resident(n: int, width: int, vocab: int, dtype: torch.dtype, device: torch.device, *, shared_head: bool,
                  triton_folds: bool, budget_mb: float = LEAN_BUDGET_MB):
    """The forward plan of JSD and the clip when whole-vocabulary rows fit: row blocks whose [R, V] logits of
    both contexts stay in memory, so the second sweep reuses them instead of recomputing them (12 N H V in all
    instead of 16, at the price of reading W once per row block). None when fewer than MIN_RESIDENT_ROWS rows
    fit or the GEMM would need float32 copies of 16-bit operands."""
    if dtype in (torch.float16, torch.bfloat16) and device_kind(device) != "cuda":
        return None
    elem = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    in_elem = torch.empty((), dtype=dtype).element_size()
    # logits of both contexts, plus (torch folds) the forward fold's copies and its temporaries
    per_row = 2 * vocab * elem * (1 if triton_folds else 2 + TORCH_FOLD_TEMPORARIES) + (2 * width * in_elem
                                                                                          if shared_head else 0)
    rows = min(n, int(budget_mb * 2 ** 20 // per_row))
    minimum = min(n, MIN_RESIDENT_ROWS[device_kind(device)])
    if rows < minimum:
        return None
    return ChunkPlan(rows=rows, cols=vocab, group=vocab, stacked=shared_head)


class _Operands:
    """The GEMM operands of one call, in the dtypes the device multiplies."""

    def __init__(self, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, cfg: StatsConfig):
        self.device = hidden.device
        self.acc = compute_dtype(hidden.dtype)
        # CUDA multiplies 16-bit operands with float32 output (where this torch can); elsewhere operands become
        # the compute dtype.
        self.native = (device_kind(self.device) == "cuda" and hidden.dtype in (torch.float16, torch.bfloat16)
                       and mixed_gemms(self.device, hidden.dtype)[0])
        self.h = self._operand(hidden)
        self.w = weight
        self.b = None if bias is None else bias.to(self.acc)
        self.two = cfg.divergence is not None
        self.shared = self.two and same_tensor(teacher_weight, weight)
        self.ht = self._operand(teacher_hidden) if self.two else None
        self.wt = teacher_weight if self.two else None
        self.bt = None if (not self.two or teacher_bias is None) else teacher_bias.to(self.acc)

    def _operand(self, x):
        return x.contiguous() if (self.native or x.dtype == self.acc) else x.to(self.acc).contiguous()

    def weight_chunk(self, w, c0, c1):
        chunk = w[c0:c1]
        return chunk if (self.native or chunk.dtype == self.acc) else chunk.to(self.acc)

    def mm(self, a, b, out):
        """out = a @ b in out's dtype without rounding the product to a 16-bit dtype first."""
        if a.dtype == out.dtype:
            torch.mm(a, b, out=out)
        else:  # only where mixed_gemms says torch.mm takes out_dtype (self.native)
            torch.mm(a, b, out_dtype=out.dtype, out=out)

    def addmm_(self, acc, a, b):
        """acc += a @ b, accumulated in acc's dtype."""
        if a.dtype == acc.dtype:
            acc.addmm_(a, b)
            return
        mm_out_dtype, addmm_out_dtype = mixed_gemms(a.device, a.dtype)
        if addmm_out_dtype:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        elif mm_out_dtype:  # the product in a temporary, then one addition
            acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
        else:  # float32 copies of the operands
            acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


# (device type, 16-bit dtype) -> (torch.mm takes out_dtype=float32, torch.addmm adds into a float32 ``self``);
# the CUDA kernels of torch 2.8 brought the first, a later release the second (2.8 and 2.9 reject a float32
# ``self`` beside 16-bit operands), and the project supports torch from 2.4. The plans count the native path:
# the fallbacks' float32 copies and temporaries are beyond the budget.
_MIXED_GEMMS: dict = {}


def mixed_gemms(device: torch.device, dtype: torch.dtype) -> tuple:
    """Which float32-output GEMMs of 16-bit operands this torch runs on this device, tried once on 1x1."""
    key = (device.type, dtype)
    if key not in _MIXED_GEMMS:
        one = torch.ones(1, 1, device=device, dtype=dtype)
        acc = torch.zeros(1, 1, device=device, dtype=torch.float32)
        _MIXED_GEMMS[key] = (_runs(lambda: torch.mm(one, one, out_dtype=torch.float32, out=acc)),
                             _runs(lambda: torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)))
    return _MIXED_GEMMS[key]


def _runs(op) -> bool:
    try:
        op()
    except (TypeError, RuntimeError, NotImplementedError):  # no out_dtype keyword, or a dtype/backend refused
        return False
    return True


def autocast_off(device_type: str):
    """A region where no enclosing autocast re-casts the op's GEMMs (a backward run inside an autocast region
    would otherwise drop to 16-bit math)."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def same_tensor(a, b) -> bool:
    """The same memory seen the same way (a detached view of a head is still that head)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype)


class _Logits:
    """Float logits chunks of one row block: a reusable buffer, filled by one or two GEMMs per chunk."""

    def __init__(self, ops: _Operands, plan: ChunkPlan, r0: int, r1: int, with_teacher: bool):
        self.ops, self.r0, self.r1 = ops, r0, r1
        self.rows = r1 - r0
        self.with_teacher = with_teacher
        contexts = 2 if with_teacher else 1
        self.buffer = torch.empty(contexts * self.rows * plan.cols, device=ops.device, dtype=ops.acc)
        self.stack = None
        if with_teacher and ops.shared and plan.stacked:
            self.stack = torch.cat([ops.h[r0:r1], ops.ht[r0:r1]])

    def chunk(self, c0: int, c1: int):
        """(z_s, z_t) raw logits [rows, c1 - c0] (z_t None without the teacher); bias added."""
        ops, cols, rows = self.ops, c1 - c0, self.rows
        if self.with_teacher:
            both = self.buffer[: 2 * rows * cols].view(2 * rows, cols)
            z_s, z_t = both[:rows], both[rows:]
            w = ops.weight_chunk(ops.w, c0, c1).t()
            if self.stack is not None:
                ops.mm(self.stack, w, both)
            else:
                ops.mm(ops.h[self.r0:self.r1], w, z_s)
                wt = w if ops.shared else ops.weight_chunk(ops.wt, c0, c1).t()
                ops.mm(ops.ht[self.r0:self.r1], wt, z_t)
        else:
            z_s, z_t = self.buffer[: rows * cols].view(rows, cols), None
            ops.mm(ops.h[self.r0:self.r1], ops.weight_chunk(ops.w, c0, c1).t(), z_s)
        if ops.b is not None:
            z_s += ops.b[c0:c1]
        if z_t is not None and ops.bt is not None:
            z_t += ops.bt[c0:c1]
        return z_s, z_t


def _row_blocks(n, plan):
    return [(r0, min(r0 + plan.rows, n)) for r0 in range(0, n, plan.rows)]


def _col_chunks(vocab, plan):
    return [(c0, min(c0 + plan.cols, vocab)) for c0 in range(0, vocab, plan.cols)]


def _lse(state, m_row: int, s_row: int):
    """log-sum-exp of a context from its online state rows (running max, rescaled sum of exponentials)."""
    return state[m_row] + torch.log(state[s_row])


def stats_forward(folds, plan: ChunkPlan, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                  targets, cfg: StatsConfig):
    """Per-row (logp, entropy, divergence, lse_s, lse_t, grad_sum) in the compute dtype, [N] each."""
    ops = _Operands(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, cfg)
    n, vocab = hidden.shape[0], weight.shape[0]
    state = torch.zeros(STATE_ROWS, n, device=ops.device, dtype=ops.acc)
    state[M_S] = state[M_T] = -math.inf
    y = targets if targets is not None else torch.full((n,), -1, device=ops.device, dtype=torch.long)
    # One chunk spanning the vocabulary: JSD's and the clip's second sweep reads the same logits (no recompute).
    resident = ops.two and cfg.needs_second_sweep and plan.cols >= vocab
    sums = torch.zeros(2, n, device=ops.device, dtype=ops.acc) if resident else None
    for r0, r1 in _row_blocks(n, plan):
        logits = _Logits(ops, plan, r0, r1, ops.two)
        for c0, c1 in _col_chunks(vocab, plan):
            z_s, z_t = logits.chunk(c0, c1)
            if resident and folds.OVERWRITES_LOGITS:
                folds.forward_fold(z_s.clone(), z_t.clone(), state[:, r0:r1], y[r0:r1], c0, cfg)
            else:
                folds.forward_fold(z_s, z_t, state[:, r0:r1], y[r0:r1], c0, cfg)
        if resident:
            block = state[:, r0:r1]
            folds.divergence_fold(z_s, z_t, _lse(block, M_S, S_S), _lse(block, M_T, S_T), sums[:, r0:r1], cfg)
    if ops.two and cfg.needs_second_sweep and not resident:
        lse_s, lse_t = _lse(state, M_S, S_S), _lse(state, M_T, S_T)
        sums = torch.zeros(2, n, device=ops.device, dtype=ops.acc)
        for r0, r1 in _row_blocks(n, plan):
            logits = _Logits(ops, plan, r0, r1, True)
            for c0, c1 in _col_chunks(vocab, plan):
                z_s, z_t = logits.chunk(c0, c1)
                folds.divergence_fold(z_s, z_t, lse_s[r0:r1], lse_t[r0:r1], sums[:, r0:r1], cfg)
    return finish_forward(state, sums, cfg, targets is not None)


def finish_forward(state, sums, cfg: StatsConfig, has_targets: bool):
    """Per-row (logp, entropy, divergence, lse_s, lse_t, grad_sum) from the final online state and, for JSD
    and the clip, the second sweep's ``sums`` [2, N]. Shared by the lean and the fast forward."""
    lse_s = _lse(state, M_S, S_S)
    entropy = torch.log(state[S_S]) + state[A_S] / state[S_S]
    zeros = torch.zeros_like(lse_s)
    logp = state[Z_Y] - lse_s if has_targets else zeros
    if cfg.divergence is None:
        return logp, entropy, zeros, lse_s, zeros, zeros
    lse_t = _lse(state, M_T, S_T)
    if cfg.needs_second_sweep:
        return logp, entropy, sums[0], lse_s, lse_t, sums[1]
    if cfg.divergence == "forward_kl":
        div = lse_s - lse_t - state[G_T] / state[S_T]
        return logp, entropy, div, lse_s, lse_t, torch.full_like(div, -1.0)
    div = state[G_S] / state[S_S] - lse_s + lse_t  # reverse KL
    return logp, entropy, div, lse_s, lse_t, div + 1.0


def stats_backward(folds, plan: ChunkPlan, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                   targets, cfg: StatsConfig, lse_s, lse_t, entropy, grad_sum, g_logp, g_entropy, g_div,
                   need_weight_grad: bool):
    """(d hidden, d weight or None) in the inputs' dtypes; any upstream gradient may be None (output unused).

    Vocabulary groups outermost: the folds of a group's chunks write its dlogits side by side, then one GEMM
    adds them into dH and one writes the group's rows of dW.
    """
    use_div = cfg.divergence is not None and g_div is not None
    ops = _Operands(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                    cfg if use_div else StatsConfig(temperature=cfg.temperature, softcap=cfg.softcap))
    n, width, vocab = hidden.shape[0], hidden.shape[1], weight.shape[0]
    row = lambda g: None if g is None else g.to(ops.acc).contiguous()  # noqa: E731 (None: the fold skips it)
    g_logp = row(g_logp if targets is not None else None)
    g_entropy, g_div = row(g_entropy), row(g_div)
    y = targets if targets is not None else torch.full((n,), -1, device=ops.device, dtype=torch.long)
    d_hidden = torch.zeros(n, width, device=ops.device, dtype=ops.acc)
    d_weight = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype) if need_weight_grad else None
    dz_dtype = dlogits_dtype(hidden.dtype, ops.device)
    rows = _row_blocks(n, plan)
    logits = [_Logits(ops, plan, r0, r1, use_div) for r0, r1 in rows] if len(rows) == 1 else None
    dz_buffer = torch.empty(plan.rows * plan.group, device=ops.device, dtype=dz_dtype)
    # the dlogits GEMMs multiply in the dlogits dtype: bf16 operands on CUDA, the compute dtype elsewhere
    h_dz = ops.h if ops.h.dtype == dz_dtype else ops.h.to(dz_dtype)
    for g0 in range(0, vocab, plan.group):
        g1 = min(g0 + plan.group, vocab)
        w_g = weight[g0:g1] if weight.dtype == dz_dtype else weight[g0:g1].to(dz_dtype)
        dw_acc = None
        if need_weight_grad and len(rows) > 1:
            dw_acc = torch.zeros(g1 - g0, width, device=ops.device, dtype=ops.acc)
        for i, (r0, r1) in enumerate(rows):
            block_logits = logits[i] if logits is not None else _Logits(ops, plan, r0, r1, use_div)
            dz_g = dz_buffer[: (r1 - r0) * (g1 - g0)].view(r1 - r0, g1 - g0)
            for c0 in range(g0, g1, plan.cols):
                c1 = min(c0 + plan.cols, g1)
                z_s, z_t = block_logits.chunk(c0, c1)
                g_rows = [None if g is None else g[r0:r1] for g in (g_logp, g_entropy, g_div)]
                folds.backward_fold(z_s, z_t if use_div else None, lse_s[r0:r1], lse_t[r0:r1], entropy[r0:r1],
                                    grad_sum[r0:r1], *g_rows, y[r0:r1], c0, cfg, dz_g[:, c0 - g0:c1 - g0])
            ops.addmm_(d_hidden[r0:r1], dz_g, w_g)
            if dw_acc is not None:
                ops.addmm_(dw_acc, dz_g.t(), h_dz[r0:r1])
            elif need_weight_grad:
                _write_weight_grad(d_weight[g0:g1], dz_g.t(), h_dz)
        if dw_acc is not None:
            d_weight[g0:g1].copy_(dw_acc)
    return d_hidden.to(hidden.dtype), d_weight


def _write_weight_grad(out, dz_t, h):
    """dW_c = dZ^T h straight into the weight's dtype (cuBLAS accumulates in float32 inside the GEMM)."""
    if dz_t.dtype == out.dtype:
        torch.mm(dz_t, h, out=out)
    else:
        out.copy_(torch.mm(dz_t, h))
