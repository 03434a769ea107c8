"""The core fused op: per-token logp, entropy and teacher-student divergence from hidden states.

The whole op lives in this package: :func:`token_stats` (the public function and its validation), the chunk loop
(:mod:`.loop`), the per-chunk folds in torch (:mod:`.folds`; their Triton spelling is the top-level
``kernels/folds.py``, shipped as ``pydistill.kernels.folds``), the fast mode's gradient basis (:mod:`.fast`) and the
autograd node that splits rows between the modes (:mod:`.modes`), a teacher given as top-k log-probs
(:mod:`.topk`), the options (:mod:`.config`) and the eager float64 spelling every test compares with (:mod:`.eager`).
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple, Optional, Sequence

import torch

from . import loop
from .modes import _TokenStatsFunction
from .config import DIVERGENCES, StatsConfig

IMPLS = ("auto", "triton", "torch", "eager")


class TokenStats(NamedTuple):
    """Per-row outputs of :func:`token_stats`, each [N]; zeros on inactive rows."""

    logp: torch.Tensor
    entropy: torch.Tensor
    divergence: torch.Tensor


def _number(x) -> bool:
    """A real int or float (a bool is not a number here: ``beta=True`` is a mistake, not 1.0)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_matrix(name, t, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {device}: all inputs must share a device")


def _check_bias(name, b, vocab, weight_name, device):
    if b is None:
        return
    if b.dim() != 1 or b.shape[0] != vocab:
        raise ValueError(f"{name} must have shape [V]=[{vocab}] to match {weight_name}, got {tuple(b.shape)}")
    if b.device != device:
        raise ValueError(f"{name} is on {b.device} but hidden is on {device}")


def _resolve_divergence(divergence, beta):
    if divergence is None:
        return None
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES} or None, got {divergence!r}")
    if divergence == "jsd":
        if not (_number(beta) and 0.0 <= beta <= 1.0):
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
        if beta == 0.0:
            return "forward_kl"
        if beta == 1.0:
            return "reverse_kl"
    return divergence


def _float32_outside_graphs(fn):
    """The op's math is float32 (float64 for float64) whatever autocast region encloses it: autocast is turned
    off inside, and hidden states it produced in a 16-bit dtype are brought up to their head's dtype (autocast
    would have rounded the head down instead). Under ``torch.compile`` the op is a graph break: its chunk loop
    runs as it is written, outside the graph."""
    @functools.wraps(fn)
    def run(hidden, weight, **options):
        device = hidden.device.type if isinstance(hidden, torch.Tensor) else None
        if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
            return fn(hidden, weight, **options)
        with torch.autocast(device, enabled=False):
            if isinstance(weight, torch.Tensor) and hidden.dtype != weight.dtype:
                hidden = hidden.to(weight.dtype)
            teacher, head = options.get("teacher_hidden"), options.get("teacher_weight")
            head = weight if head is None else head
            if isinstance(teacher, torch.Tensor) and isinstance(head, torch.Tensor) and teacher.dtype != head.dtype:
                options["teacher_hidden"] = teacher.to(head.dtype)
            return fn(hidden, weight, **options)

    reason = ("pydistill.token_stats runs its own vocabulary-chunk loop outside the graph: compile the step with "
              "fullgraph=False (the op is one graph break)")
    try:
        return torch.compiler.disable(run, reason=reason)
    except TypeError:  # a torch whose disable() takes no reason
        return torch.compiler.disable(run)


@_float32_outside_graphs
def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    targets: Optional[torch.Tensor] = None,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    divergence: Optional[str] = None,
    beta: float = 0.5,
    clip: Optional[float] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    teacher_temperature: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    mask: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    impl: str = "auto",
    memory_budget_mb: float = loop.DEFAULT_MEMORY_BUDGET_MB,
    differentiated: Optional[Sequence[str]] = None,
    teacher_topk_ids: Optional[torch.Tensor] = None,
    teacher_topk_logprobs: Optional[torch.Tensor] = None,
    topk_tail: bool = True,
    support_topk: Optional[int] = None,
) -> TokenStats:
    """Equivalent to statistics of ``log_softmax(cap(h W^T + b) / T)`` row by row, without materializing [N, V].

    Per row: the log-probability of ``targets``, the entropy and the divergence to the teacher. Logits of each
    context: ``z = cap(h @ W.T + b) / temperature`` with ``cap(x) = softcap * tanh(x / softcap)``
    when ``softcap`` is set (the model's cap on its raw logits, then the sampling temperature). Student
    ``q = softmax(z_s)``, teacher ``p = softmax(z_t)``. All math runs in float32 (float64 for float64 inputs);
    logits are never rounded to a 16-bit dtype. The work is a loop over vocabulary chunks (and row blocks):
    per chunk one GEMM (both contexts at once when they share the head), then a fold into per-row state;
    JSD and the clip take a second sweep; the backward recomputes each chunk once and forms the gradients of
    all three outputs together. No [N, V] tensor exists at any point.

    Args:
        hidden: student hidden states h_s, [N, H], float32/bfloat16/float16, or float64 (``impl="torch"``:
            computed in float64).
        weight: lm_head weight W, [V, H], same dtype as ``hidden``. Its gradient is computed only when it
            requires grad (frozen under LoRA otherwise).
        targets: token ids y, [N] int64 in [0, V) or ``ignore_index``. Rows with ``ignore_index`` are
            inactive. Without targets ``logp`` is zeros.
        teacher_hidden: teacher hidden states h_t, [N, H_t]; required when ``divergence`` is set. Never
            receives a gradient.
        teacher_weight: teacher lm_head W_t, [V, H_t]. Default: ``weight`` (self-distillation: one model,
            two contexts; one read of each W tile serves both GEMMs on the Triton path).
        bias, teacher_bias: optional [V] biases. ``teacher_bias`` defaults to ``bias`` when the head is
            shared, and to no bias when ``teacher_weight`` is given. Biases get no gradient.
        divergence: None, ``"forward_kl"`` (KL(p||q), mode-covering), ``"reverse_kl"`` (KL(q||p),
            mode-seeking) or ``"jsd"``: generalized JSD_beta = beta KL(p||M) + (1-beta) KL(q||M),
            M = beta p + (1-beta) q. Convention of TRL GKD and Liger: ``beta=0`` is exactly forward
            KL(p||q) and ``beta=1`` exactly reverse KL(q||p) (the JSD formula itself tends to 0 there).
        beta: JSD interpolation in [0, 1]; read only for ``"jsd"``.
        clip: pointwise clip tau > 0 (OPSD v3): D = sum_v min(d_v, tau) over the per-entry terms d_v of
            the chosen divergence (for forward KL d_v = p_v log(p_v / q_v)); terms may be negative, only
            the top is bounded, and clipped entries pass no gradient.
        temperature: T > 0, applied to both contexts unless ``teacher_temperature`` is given.
        softcap: c > 0 or None.
        teacher_temperature: T_t > 0, the teacher context's own temperature: ``z_t = cap(h_t W_t^T + b_t) / T_t``
            (a sharper teacher, T_t < T, for a model with a softcap too); None: ``temperature``.
        teacher_softcap: c_t, the teacher context's own cap, for a teacher head whose cap is not the student's:
            None (default): ``softcap``; ``0``: the teacher's logits are not capped (a teacher head without a cap
            beside a capped student); c_t > 0: ``z_t = c_t tanh(x_t / c_t) / T_t``.
        mask: optional [N] bool or numeric; rows that are False/0 are inactive. Inactive rows are gathered
            out before any GEMM: they cost nothing, give 0 in every output and receive zero gradient.
        ignore_index: the inactive-row marker in ``targets``.
        impl: how the per-chunk folds run, the chunk loop being the same: ``"auto"`` (Triton on CUDA, torch
            elsewhere and for float64), ``"triton"`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``), ``"torch"``, or
            ``"eager"`` (float64, materializes [N, V]; for tests; ``"reference"`` is its former name).
        teacher_topk_ids, teacher_topk_logprobs: a teacher given as its top-k log-probs instead of
            ``teacher_hidden`` (served by vLLM or cached): [N, k] token ids in [0, V) (distinct within a row, any
            order; -1 pads a row with fewer than k) and their log-probs (<= 0; the row's mass at most 1 + 1e-3).
            The divergence is then over k + 1 outcomes, the k tokens and a tail bucket holding the rest of the
            vocabulary on each side (``topk_tail=True``; each tail's mass floored at ~1e-7), or over the k tokens
            renormalized on both sides (``topk_tail=False``, TRL's ``loss_add_tail=False``); the clip applies per
            outcome. ``temperature`` and ``softcap`` apply to the student only: the teacher's log-probs are used
            as given, so ask the server for them at the temperature you distill at. The student's normalizer is
            still over the full vocabulary (the chunk loop, one context); no [N, V] tensor exists.
        support_topk: k, with ``teacher_hidden``: the divergence over the student's own k most likely tokens
            (plus a tail bucket with ``topk_tail``), the teacher's log-probs taken at those ids (SDPO/SDFT's
            ``topk_logits``, ROSD's original top-100 + tail). The ids carry no gradient. The teacher's log-probs
            are computed in ``teacher_hidden``'s dtype (``impl="auto"`` picks their folds by it; ``"triton"``
            refuses a float64 teacher there).
        memory_budget_mb: the one speed/memory knob: extra memory the op may use beyond its inputs and returned
            gradients (logits and dlogits chunks, the float32 dH accumulator, fold temporaries, the gradient
            basis). It picks the mode: *fast* when the basis of every row fits (``N * len(differentiated) * V``
            elements, 2 bytes each for bfloat16 on CUDA, 4 otherwise, plus a resident row block's logits): the
            gradient is formed in the forward and the backward costs dH and dW only (4 GEMM passes of 2NHV for
            two contexts instead of 6); *partial* when only some rows' basis fits: those rows fast, the rest
            lean; *lean* below that: no [N, V] buffer, the backward recomputes each chunk once. Chunk sizes are
            the largest that fit. The default, 4096 MB (``loop.DEFAULT_MEMORY_BUDGET_MB``), is what TRL's chunked
            head already takes at N=8192, H=4096, V=151936 (~3.7 GiB): a one-output loss runs fast there.
            256 MB keeps a two-context bf16 call at that shape lean on CUDA.
        differentiated: the outputs whose gradient the caller's loss uses, among ``"logp"``, ``"entropy"`` and
            ``"divergence"``; default all that exist (logp with targets, the divergence with a teacher). The
            fast mode keeps one basis per name; a backward where an output outside it carries gradient runs
            the lean mode (always exact, only slower); ``()`` pins the lean mode. Without grad mode or a tensor
            requiring grad no basis is formed.

    Returns:
        :class:`TokenStats` ``(logp, entropy, divergence)``, float32 [N] each (float64 for float64 inputs),
        differentiable once (a second derivative raises) w.r.t.
        ``hidden`` and ``weight``. A backward through any combination of them runs one recompute sweep.
        An all-inactive batch gives zeros connected to the graph, so its loss backpropagates zero gradients.

    Raises:
        ValueError naming the argument for wrong shapes, dtypes, devices or out-of-range options.
    """
    _check_matrix("hidden", hidden, hidden.device if isinstance(hidden, torch.Tensor) else None)
    device = hidden.device
    if device.type == "meta":
        raise ValueError("hidden is on the meta device: token_stats needs tensors with data (cpu or cuda)")
    _check_matrix("weight", weight, device)
    n, width = hidden.shape
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight has no rows: the vocabulary V must be at least 1")
    if weight.shape[1] != width:
        raise ValueError(f"weight must have shape [V, H] with H={width} (hidden's), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    _check_bias("bias", bias, vocab, "weight", device)
    if impl == "reference":
        from .._deprecated import warn_once

        warn_once("impl='reference'", "impl='eager'")
        impl = "eager"
    if impl not in IMPLS:
        renamed = " ('chunked' is now called 'torch')" if impl == "chunked" else ""
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}{renamed}")
    if not (_number(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if teacher_temperature is not None and not (_number(teacher_temperature) and teacher_temperature > 0):
        raise ValueError(f"teacher_temperature must be None or a finite number > 0, got {teacher_temperature!r}")
    if softcap is not None and not (_number(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if teacher_softcap is not None and not (_number(teacher_softcap) and teacher_softcap >= 0):
        raise ValueError(f"teacher_softcap must be None (the student's softcap), 0 (the teacher's logits are not "
                         f"capped) or a finite number > 0, got {teacher_softcap!r}")
    if clip is not None and not (_number(clip) and clip > 0):
        raise ValueError(f"clip (tau) must be None or a finite number > 0, got {clip!r}")
    if not (_number(beta) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    resolved = _resolve_divergence(divergence, beta)
    topk = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if topk:
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("give the teacher either as teacher_hidden (and teacher_weight) or as "
                             "teacher_topk_ids with teacher_topk_logprobs, not both")
        if teacher_topk_ids is None or teacher_topk_logprobs is None:
            raise ValueError("teacher_topk_ids and teacher_topk_logprobs must be given together")
        if resolved is None:
            raise ValueError("divergence must be set ('forward_kl', 'reverse_kl' or 'jsd') when a top-k teacher "
                             "is given")
        if teacher_softcap is not None:
            raise ValueError("teacher_softcap applies to a teacher given as teacher_hidden: a top-k teacher's "
                             "log-probs are used as given")
        if teacher_temperature is not None:
            raise ValueError("teacher_temperature applies to a teacher given as teacher_hidden: a top-k teacher's "
                             "log-probs are used as given (ask the server for them at that temperature)")
        if not isinstance(topk_tail, bool):
            raise ValueError(f"topk_tail must be True or False, got {topk_tail!r}")

    if resolved is not None and not topk:
        if teacher_hidden is None:
            raise ValueError(f"teacher_hidden [N, H_t] is required when divergence={divergence!r}")
        _check_matrix("teacher_hidden", teacher_hidden, device)
        if teacher_hidden.shape[0] != n:
            raise ValueError(f"teacher_hidden must have N={n} rows like hidden, got {tuple(teacher_hidden.shape)}")
        if teacher_weight is None:
            teacher_weight = weight
            if teacher_bias is None:
                teacher_bias = bias
        _check_matrix("teacher_weight", teacher_weight, device)
        if teacher_weight.shape[0] != vocab:
            raise ValueError(f"teacher_weight must have V={vocab} rows like weight, got {tuple(teacher_weight.shape)}")
        if teacher_weight.shape[1] != teacher_hidden.shape[1]:
            raise ValueError(f"teacher_weight must have shape [V, H_t] with H_t={teacher_hidden.shape[1]} "
                             f"(teacher_hidden's), got {tuple(teacher_weight.shape)}")
        if teacher_weight.dtype != teacher_hidden.dtype:
            raise ValueError(f"teacher_weight dtype {teacher_weight.dtype} must match teacher_hidden dtype "
                             f"{teacher_hidden.dtype}")
        _check_bias("teacher_bias", teacher_bias, vocab, "teacher_weight", device)
        teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    elif teacher_hidden is not None or teacher_weight is not None:
        raise ValueError("divergence must be set ('forward_kl', 'reverse_kl' or 'jsd') when teacher_hidden "
                         "or teacher_weight is given")

    active = None
    if targets is not None:
        if not isinstance(targets, torch.Tensor) or targets.shape != (n,):
            raise ValueError(f"targets must have shape [N]=[{n}], got "
                             f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
        if targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
        if targets.device != device:
            raise ValueError(f"targets is on {targets.device} but hidden is on {device}")
        targets = targets.long().contiguous()  # the folds index it as a dense [N] vector
        active = targets != ignore_index
        bad = active & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            first = int(targets[bad][0])
            raise ValueError(f"targets must be in [0, V={vocab}) or ignore_index={ignore_index}, found {first}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != (n,):
            raise ValueError(f"mask must have shape [N]=[{n}], got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but hidden is on {device}")
        if mask.is_floating_point() and not bool(torch.isfinite(mask).all()):
            raise ValueError("mask must be finite (bool, or numeric where 0 marks an inactive row)")
        mask = mask != 0
        active = mask if active is None else active & mask

    cfg = StatsConfig(temperature=float(temperature), softcap=None if softcap is None else float(softcap),
                      teacher_temperature=None if teacher_temperature is None else float(teacher_temperature),
                      teacher_softcap=None if teacher_softcap is None else float(teacher_softcap),
                      divergence=resolved, beta=float(beta), clip=None if clip is None else float(clip),
                      has_targets=targets is not None)
    if not (_number(memory_budget_mb) and memory_budget_mb > 0):
        raise ValueError(f"memory_budget_mb must be a finite number > 0, got {memory_budget_mb!r}")
    differentiated = _resolve_differentiated(differentiated, cfg)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        differentiated = ()  # no backward will come: forming a basis would only cost
    requested_impl = impl
    if impl == "auto":
        # the Triton folds take no float64 (the torch folds compute it in float64)
        cuda = loop.device_kind(device) == "cuda" and hidden.dtype != torch.float64
        impl = "triton" if cuda and _triton_available() else "torch"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run on the CPU")
    if impl == "triton" and hidden.dtype == torch.float64:
        raise ValueError("impl='triton' takes float32, bfloat16 or float16 hidden states, got float64")

    if support_topk is not None:
        if resolved is None or topk:
            raise ValueError("support_topk needs a teacher given as teacher_hidden and a divergence")
        if requested_impl == "triton" and teacher_hidden.dtype == torch.float64:
            raise ValueError("impl='triton' with support_topk takes a float32, bfloat16 or float16 teacher_hidden "
                             "(its log-probs run in its own dtype), got float64")
        from .topk import student_support

        # The teacher's log-probs run in the teacher's own dtype: "auto" chooses its folds by that dtype.
        teacher_topk_ids, teacher_topk_logprobs = student_support(
            hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, support_topk, active, cfg,
            requested_impl, memory_budget_mb, lean_op=token_stats)
        topk = True
    if topk:
        from .topk import topk_token_stats

        return TokenStats(*topk_token_stats(
            hidden, weight, teacher_topk_ids, teacher_topk_logprobs, tail=topk_tail, targets=targets, bias=bias,
            cfg=cfg, mask=mask, ignore_index=ignore_index, impl=impl, memory_budget_mb=memory_budget_mb,
            differentiated=differentiated, lean_op=token_stats))
    if impl == "eager":
        from .eager import eager_token_stats

        outs = eager_token_stats(hidden, weight, cfg, bias=bias, teacher_hidden=teacher_hidden,
                                 teacher_weight=teacher_weight, teacher_bias=teacher_bias, targets=targets,
                                 active=active)
        return TokenStats(*(o.to(loop.compute_dtype(hidden.dtype)) for o in outs))

    if active is None or bool(active.all()):
        return TokenStats(*_TokenStatsFunction.apply(hidden, weight, bias, teacher_hidden, teacher_weight,
                                                     teacher_bias, targets, cfg, impl, memory_budget_mb,
                                                     differentiated))
    # Gather the active rows once: inactive rows never reach a GEMM, forward or backward.
    rows = active.nonzero().squeeze(1)
    outs = _TokenStatsFunction.apply(
        hidden.index_select(0, rows), weight, bias,
        None if teacher_hidden is None else teacher_hidden.index_select(0, rows), teacher_weight, teacher_bias,
        None if targets is None else targets.index_select(0, rows), cfg, impl, memory_budget_mb,
        differentiated)
    return TokenStats(*(torch.zeros(n, device=device, dtype=o.dtype).index_copy(0, rows, o) for o in outs))


def _resolve_differentiated(names, cfg: StatsConfig) -> tuple:
    exist = ("logp",) * cfg.has_targets + ("entropy",) + ("divergence",) * (cfg.divergence is not None)
    if names is None:
        return exist
    if isinstance(names, str) or not all(isinstance(x, str) for x in names):
        raise ValueError(f"differentiated must be a sequence of output names among {exist}, got {names!r}")
    unknown = [x for x in names if x not in exist]
    if unknown:
        raise ValueError(f"differentiated names {unknown} but this call's outputs with a gradient are {exist}")
    return tuple(x for x in exist if x in names)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["DIVERGENCES", "IMPLS", "StatsConfig", "TokenStats", "token_stats"]
