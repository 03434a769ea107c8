"""A teacher given as top-k log-probs (served by vLLM or cached): the divergence over the k given tokens and a tail.

The student side stays fused: its full-vocabulary normalizer comes from the chunk loop (one context, so the
fast mode applies), its logits at the teacher's k ids from a gathered [N, k] product. Given
``lse = z_y - logp_y`` (the op's logp of an anchor token y and the gathered z_y), ``log q_j = z_j - lse`` is exact
and differentiable through both. What follows is O(N k) work on [N, k + 1] tensors.

Outcomes: with ``tail=True`` the k given tokens and one tail bucket holding the rest of the vocabulary,
``p_tail = 1 - sum_j p_j`` and ``q_tail = 1 - sum_j q_j``; both tails are floored at ``1 - exp(-TAIL_FLOOR)``
(~1e-7; the same floor as TRL's ServerDistillationTrainer) so that a top-k holding all the mass in float32
gives a finite log. With ``tail=False`` both distributions are renormalized over the k tokens (TRL's
``loss_add_tail=False``).
"""
from __future__ import annotations

import math

import torch

from .config import StatsConfig

TAIL_FLOOR = 1e-7
# Teacher log-probs arrive rounded (server float32, JSON decimals): a row's mass may exceed 1 by this much.
MASS_TOLERANCE = 1e-3
PADDING_ID = -1
GATHER_BLOCK_MB = 64.0


def check_topk_teacher(ids, logprobs, n: int, vocab: int, device) -> torch.Tensor:
    """Validate a top-k teacher and return its [N, k] mask of real (non-padding) entries."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] < 1:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"teacher_topk_ids must have shape [N, k] with N={n} and k >= 1, got {shape}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"teacher_topk_ids must be int64 or int32 token ids, got {ids.dtype}")
    if not isinstance(logprobs, torch.Tensor) or logprobs.shape != ids.shape:
        shape = tuple(logprobs.shape) if isinstance(logprobs, torch.Tensor) else type(logprobs).__name__
        raise ValueError(f"teacher_topk_logprobs must have the shape of teacher_topk_ids {tuple(ids.shape)}, "
                         f"got {shape}")
    if not logprobs.is_floating_point():
        raise ValueError(f"teacher_topk_logprobs must be floating point, got {logprobs.dtype}")
    for name, t in (("teacher_topk_ids", ids), ("teacher_topk_logprobs", logprobs)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {device}")
    valid = ids != PADDING_ID
    bad = valid & ((ids < 0) | (ids >= vocab))
    if bool(bad.any()):
        raise ValueError(f"teacher_topk_ids must be in [0, V={vocab}) or the padding id {PADDING_ID}, "
                         f"found {int(ids[bad][0])}")
    lp = logprobs.double()
    if bool((valid & ~torch.isfinite(lp)).any()):
        raise ValueError("teacher_topk_logprobs must be finite where teacher_topk_ids is not the padding id "
                         f"{PADDING_ID} (a given token with probability 0 makes reverse KL infinite)")
    if bool((valid & (lp > MASS_TOLERANCE)).any()):
        raise ValueError(f"teacher_topk_logprobs must be <= 0 (log-probabilities), found "
                         f"{float(lp[valid & (lp > MASS_TOLERANCE)][0]):.6g}")
    ordered = torch.where(valid, ids.long(), torch.full_like(ids.long(), PADDING_ID)).sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != PADDING_ID)
    if bool(repeated.any()):
        row = int(repeated.any(dim=1).nonzero()[0])
        raise ValueError(f"teacher_topk_ids has a repeated token id in row {row}: each row's ids must be distinct")
    mass = torch.where(valid, lp, torch.full_like(lp, -math.inf)).logsumexp(dim=1)
    if bool((mass > math.log1p(MASS_TOLERANCE)).any()):
        row = int((mass > math.log1p(MASS_TOLERANCE)).nonzero()[0])
        raise ValueError(f"teacher_topk_logprobs sum to probability {math.exp(float(mass[row])):.6f} > 1 in row "
                         f"{row} (tolerance {MASS_TOLERANCE})")
    return valid


class _GatheredLogits(torch.autograd.Function):
    """``h_n . W[ids[n, j]] (+ b)`` for each row n and column j, [N, m] in the compute dtype; rows in blocks so
    the gathered [rows, m, H] weights stay within ``block_elems``. The backward recomputes the gathers; the weight
    gradient is accumulated in float32 over the distinct ids only (no [V, H] float32 buffer)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, compute_dtype, block_rows):
        ctx.save_for_backward(hidden, weight, ids)
        ctx.compute_dtype, ctx.block_rows = compute_dtype, block_rows
        out = torch.empty(ids.shape, dtype=compute_dtype, device=hidden.device)
        for start in range(0, ids.shape[0], block_rows):
            rows = slice(start, start + block_rows)
            w = weight.index_select(0, ids[rows].reshape(-1)).view(*ids[rows].shape, -1).to(compute_dtype)
            out[rows] = torch.einsum("rh,rmh->rm", hidden[rows].to(compute_dtype), w)
        if bias is not None:
            out += bias.to(compute_dtype)[ids]
        return out

    @staticmethod
    def backward(ctx, grad):
        from .loop import autocast_off

        with autocast_off(grad.device.type):
            return _GatheredLogits._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        hidden, weight, ids = ctx.saved_tensors
        dtype, block = ctx.compute_dtype, ctx.block_rows
        grad = grad.to(dtype)
        d_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = d_weight = None
        if ctx.needs_input_grad[1]:
            distinct, where = torch.unique(ids, return_inverse=True)
            acc = torch.zeros(distinct.numel(), weight.shape[1], dtype=dtype, device=weight.device)
        for start in range(0, ids.shape[0], block):
            rows = slice(start, start + block)
            g = grad[rows]
            if d_hidden is not None:
                w = weight.index_select(0, ids[rows].reshape(-1)).view(*ids[rows].shape, -1).to(dtype)
                d_hidden[rows] = torch.einsum("rm,rmh->rh", g, w).to(hidden.dtype)
            if acc is not None:
                contrib = g.unsqueeze(-1) * hidden[rows].to(dtype).unsqueeze(1)
                acc.index_add_(0, where[rows].reshape(-1), contrib.reshape(-1, weight.shape[1]))
        if acc is not None:
            d_weight = torch.zeros_like(weight)
            d_weight.index_copy_(0, distinct, acc.to(weight.dtype))
        return d_hidden, d_weight, None, None, None, None


def gathered_logits(hidden, weight, bias, ids, cfg: StatsConfig, compute_dtype, budget_mb: float):
    """The student's scaled logits ``cap(h . W[id] + b) / T`` at ``ids`` [N, m], differentiable."""
    per_row = ids.shape[1] * hidden.shape[1] * torch.empty((), dtype=compute_dtype).element_size() * 2
    # The gathered [rows, m, H] weights are O(N k H) work, small beside the vocabulary loop: blocks of at most
    # GATHER_BLOCK_MB keep them from taking the budget that the loop's fast mode would use for its basis.
    block_mb = min(budget_mb / 2, GATHER_BLOCK_MB)
    block_rows = max(1, min(ids.shape[0], int(block_mb * 2 ** 20 // max(per_row, 1))))
    z = _GatheredLogits.apply(hidden, weight, None if bias is None else bias.detach(), ids, compute_dtype,
                              block_rows)
    if cfg.softcap is not None:
        z = cfg.softcap * torch.tanh(z / cfg.softcap)
    return z / cfg.temperature


def anchored_log_probs(hidden, weight, bias, ids, anchor, anchor_logp, cfg: StatsConfig, budget_mb: float):
    """log q at ``ids`` [N, m] from the chunk loop's log-prob of one ``anchor`` token per row: with the gathered
    scaled logits z, ``lse = z_anchor - logp_anchor`` and ``log q_j = z_j - lse``, differentiable through both."""
    from .loop import compute_dtype

    z = gathered_logits(hidden, weight, bias, torch.cat([ids, anchor.unsqueeze(1)], dim=1), cfg,
                        compute_dtype(hidden.dtype), budget_mb)
    return z[:, :-1] - (z[:, -1] - anchor_logp).unsqueeze(1)


def _tail(log_probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_j exp(log_probs_j)) over the valid entries, the mass floored at 1 - exp(-TAIL_FLOOR)."""
    kept = torch.where(valid, log_probs, torch.full_like(log_probs, -math.inf))
    log_sum = kept.logsumexp(dim=1, keepdim=True).clamp(max=-TAIL_FLOOR)
    return torch.log(-torch.expm1(log_sum))


def _renormalized(log_probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    kept = torch.where(valid, log_probs, torch.full_like(log_probs, -math.inf))
    norm = kept.logsumexp(dim=1, keepdim=True)
    return log_probs - torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))


def topk_divergence(log_q: torch.Tensor, log_p: torch.Tensor, valid: torch.Tensor, cfg: StatsConfig,
                    tail: bool) -> torch.Tensor:
    """Per-row divergence [N] between student log-probs ``log_q`` and teacher log-probs ``log_p`` at the same k
    token ids ([N, k], ``valid`` marking real entries), over the k tokens and a tail bucket (``tail=True``) or
    over the k tokens renormalized (``tail=False``); ``cfg`` gives the divergence, beta and clip."""
    if tail:
        log_q = torch.cat([log_q, _tail(log_q, valid)], dim=1)
        log_p = torch.cat([log_p, _tail(log_p, valid)], dim=1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
    else:
        log_q, log_p = _renormalized(log_q, valid), _renormalized(log_p, valid)
    # Padding entries take log-prob 0 and weight 0: no inf or nan reaches a product or its gradient.
    zero = torch.zeros_like(log_q)
    log_q, log_p = torch.where(valid, log_q, zero), torch.where(valid, log_p, zero)
    p, q = log_p.exp() * valid, log_q.exp() * valid
    if cfg.divergence == "forward_kl":
        terms = p * (log_p - log_q)
    elif cfg.divergence == "reverse_kl":
        terms = q * (log_q - log_p)
    else:
        beta = cfg.beta
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        terms = beta * p * (log_p - log_m) + (1.0 - beta) * q * (log_q - log_m)
    if cfg.clip is not None:
        terms = terms.clamp(max=cfg.clip)
    return (terms * valid).sum(dim=1)


def topk_token_stats(hidden, weight, ids, logprobs, *, tail: bool, targets, bias, cfg: StatsConfig, mask,
                     ignore_index: int, impl: str, memory_budget_mb: float, lean_op, differentiated=None):
    """:func:`pydistill.token_stats` with a top-k teacher: ``(logp, entropy, divergence)``, each [N].

    ``lean_op`` is ``token_stats`` itself (one context, no teacher): it gives logp of an anchor token (the
    target, or else the teacher's first id) and the entropy; the divergence comes from :func:`topk_divergence`.
    The divergence's gradient reaches the op through that logp, so ``differentiated`` (the caller's outputs with
    a gradient) maps to the inner call's: logp for the divergence or logp, entropy for entropy.
    """
    from .loop import compute_dtype

    n, vocab = hidden.shape[0], weight.shape[0]
    active = torch.ones(n, dtype=torch.bool, device=hidden.device)
    if targets is not None:
        active &= targets != ignore_index
    if mask is not None:
        active &= mask != 0
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == n:
        ids = ids.masked_fill(~active.unsqueeze(1), PADDING_ID)  # inactive rows may hold anything, as in targets
    valid = check_topk_teacher(ids, logprobs, n, vocab, hidden.device)
    ids = torch.where(valid, ids.long(), torch.zeros_like(ids, dtype=torch.long))
    if targets is not None:
        anchor_targets = targets
        anchor = torch.where((targets >= 0) & (targets < vocab), targets.long(), torch.zeros_like(targets.long()))
    else:
        anchor = anchor_targets = ids[:, 0]
    inner = None if differentiated is None else (
        ("logp",) * bool({"logp", "divergence"} & set(differentiated)) + ("entropy",) * ("entropy" in differentiated))
    logp, entropy, _ = lean_op(hidden, weight, targets=anchor_targets, bias=bias, temperature=cfg.temperature,
                               softcap=cfg.softcap, mask=mask, ignore_index=ignore_index, impl=impl,
                               memory_budget_mb=memory_budget_mb, differentiated=inner)
    rows = active.nonzero().squeeze(1)
    dtype = compute_dtype(hidden.dtype)
    log_q = anchored_log_probs(hidden.index_select(0, rows), weight, bias, ids.index_select(0, rows),
                               anchor.index_select(0, rows), logp.index_select(0, rows), cfg, memory_budget_mb)
    divergence = topk_divergence(log_q, logprobs.index_select(0, rows).to(dtype), valid.index_select(0, rows),
                                 cfg, tail)
    divergence = torch.zeros(n, dtype=divergence.dtype, device=hidden.device).index_copy(0, rows, divergence)
    if targets is None:
        logp = torch.zeros_like(logp)
    return logp, entropy, divergence


@torch.no_grad()
def topk_support(hidden, weight, k: int, *, bias=None, memory_budget_mb: float = 256.0) -> torch.Tensor:
    """The ids of the k largest logits ``h . W + b`` of each row, [N, k] int64, by a sweep over vocabulary chunks
    that keeps a running top-k (no [N, V] tensor). Softcap and temperature are monotonic: they do not change it."""
    n, vocab = hidden.shape[0], weight.shape[0]
    if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= vocab):
        raise ValueError(f"k must be an int in [1, V={vocab}], got {k!r}")
    cols = max(k, min(vocab, int(memory_budget_mb * 2 ** 20 // 3 // max(4 * n, 1))))
    best = hidden.new_full((n, 0), float("-inf"), dtype=torch.float32)
    best_ids = torch.empty(n, 0, dtype=torch.long, device=hidden.device)
    h = hidden.float()
    for start in range(0, vocab, cols):
        z = h @ weight[start:start + cols].float().t()
        if bias is not None:
            z += bias[start:start + cols].float()
        values, ids = z.topk(min(k, z.shape[1]), dim=1)
        best, where = torch.cat([best, values], 1).topk(min(k, best.shape[1] + values.shape[1]), dim=1)
        best_ids = torch.cat([best_ids, ids + start], 1).gather(1, where)
    return best_ids


@torch.no_grad()
def logprobs_at(hidden, weight, ids, *, bias=None, temperature: float = 1.0, softcap=None, impl: str = "auto",
                memory_budget_mb: float = 256.0, lean_op=None) -> torch.Tensor:
    """log softmax(cap(h . W + b) / T) at ``ids`` [N, k], float32, from the chunk loop's normalizer and a gathered
    product (no [N, V] tensor): a local teacher's log-probs on a support chosen elsewhere."""
    cfg = StatsConfig(temperature=float(temperature), softcap=softcap)
    anchor = ids[:, 0]
    logp = lean_op(hidden, weight, targets=anchor, bias=bias, temperature=temperature, softcap=softcap, impl=impl,
                   memory_budget_mb=memory_budget_mb).logp
    return anchored_log_probs(hidden, weight, bias, ids, anchor, logp, cfg, memory_budget_mb)


def student_support(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, k, active, cfg: StatsConfig,
                    impl: str, memory_budget_mb: float, lean_op):
    """A top-k teacher on the student's own support: the student's k most likely ids per active row and the
    teacher's log-probs there, [N, k] each (padding on inactive rows), neither carrying gradient."""
    n = hidden.shape[0]
    rows = torch.arange(n, device=hidden.device) if active is None else active.nonzero().squeeze(1)
    ids = torch.full((n, k), PADDING_ID, dtype=torch.long, device=hidden.device)
    logprobs = torch.full((n, k), -math.inf, dtype=torch.float32, device=hidden.device)
    chosen = topk_support(hidden.index_select(0, rows).detach(), weight.detach(), k, bias=bias,
                          memory_budget_mb=memory_budget_mb)
    ids[rows] = chosen
    logprobs[rows] = logprobs_at(teacher_hidden.index_select(0, rows), teacher_weight, chosen, bias=teacher_bias,
                                 temperature=cfg.teacher_temperature, softcap=cfg.teacher_cap, impl=impl,
                                 memory_budget_mb=memory_budget_mb, lean_op=lean_op).float()
    return ids, logprobs
