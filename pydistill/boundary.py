"""The model <-> op boundary, written once: everything between a causal LM and :func:`pydistill.token_stats`.

- :func:`unwrap`: the transformers causal LM inside DDP / DeepSpeed, ``torch.compile`` and PEFT wrappers (FSDP2
  shards in place, so its parameters are read through :func:`read_head`).
- :func:`read_head`: the output head as the op reads it: weight, bias, logit scale and softcap.
- :func:`hidden_states`: the decoder body's forward, the hidden states that predict the scored tokens, in the
  op's input space (the head's dtype, the logit scale folded in).
- :func:`sequence_token_stats`: the op's [B, T] front door: [B, T, H] hidden states and a [B, T] mask become the
  op's rows (:func:`pack_rows`), and its per-row statistics come back as [B, T] (:func:`unpack_rows`).

Some architectures transform the head's logits before the softmax: a multiplier (Cohere ``logit_scale``, Granite
``logits_scaling``, ``output_multiplier``, ``lm_head_multiplier``) and a final softcap (Gemma-2
``final_logit_softcapping``). The op computes ``cap(h W^T + b) / T``; the multiplier folds into its inputs,
``cap(s (h W^T + b)) == cap((s h) W^T + s b)`` (:meth:`Head.inputs` and :func:`read_head`'s bias), and the softcap
is the op's own option. The bundled trainers, the losses, the TRL integration and the teachers all cross here, so
that none scores a Gemma-2, Cohere or Granite model on logits other than its own.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from .token_stats import TokenStats, token_stats
from .token_stats.loop import DEFAULT_MEMORY_BUDGET_MB


def unwrap(model):
    """The transformers causal LM inside DDP / DeepSpeed (``.module``), ``torch.compile`` (``._orig_mod``) and PEFT
    (``get_base_model()``)."""
    inner = model
    for _ in range(4):  # the wrappers nest in any order, a few deep at most
        inner = getattr(inner, "module", inner)
        inner = getattr(inner, "_orig_mod", inner)
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
    return inner


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_scale(config) -> float:
    """The multiplier on the raw logits before the softcap (1.0 for most architectures), from the config fields
    ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier`` and ``logits_scaling`` (a divisor, except for
    HyperCLOVA X)."""
    text = _text_config(config)
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(text, "model_type", "") == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def softcap(config):
    """The final-logit softcap c (``z -> c tanh(z / c)``), or None."""
    return getattr(_text_config(config), "final_logit_softcapping", None)


def _scaled(x, scale: float):
    """The logit-scale fold: ``x * scale`` for hidden states and bias alike (None and scale 1 pass through)."""
    return x if x is None or scale == 1.0 else x * scale


class Head(NamedTuple):
    """A model's output head as the op reads it."""
    weight: torch.Tensor  # [V, H], the parameter itself (FSDP2 shards gathered, differentiably)
    bias: Optional[torch.Tensor]  # [V] times the logit scale, or None
    softcap: Optional[float]  # pass to every op call on this head
    scale: float  # the logit multiplier, already in ``bias`` and in :meth:`inputs`

    def inputs(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` as the op's input for this head: on its device, in its dtype (under autocast the body may
        return bf16 while the head stays fp32), times the logit scale."""
        return _scaled(hidden.to(device=self.weight.device, dtype=self.weight.dtype), self.scale)

    @property
    def teacher_softcap(self) -> float:
        """The op's ``teacher_softcap`` for a teacher context read through this head: its cap, or 0 when it has
        none (the op's None would give the teacher the student's cap)."""
        return float(self.softcap or 0.0)

    def teacher_options(self, student: Optional["Head"] = None) -> dict:
        """The op's keyword arguments for a teacher context read through this head: its softcap, and its weight
        and bias unless it is ``student``'s weight (one GEMM per vocabulary tile then serves both contexts)."""
        options = dict(teacher_softcap=self.teacher_softcap)
        if student is None or self.weight is not student.weight:
            options.update(teacher_weight=self.weight.detach(), teacher_bias=self.bias)
        return options


def read_head(model) -> Head:
    """The output head of ``model`` (any wrapper :func:`unwrap` sees through), for the op."""
    lm = unwrap(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(lm).__name__} has no output embedding (lm_head) with a weight: pydistill's "
                         "fused op needs the [V, H] head weight")
    weight, bias = head.weight, getattr(head, "bias", None)
    if hasattr(weight, "full_tensor"):  # FSDP2 DTensor shards; full_tensor is differentiable
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None and hasattr(bias, "full_tensor") else bias
    scale = logit_scale(lm.config)
    return Head(weight, _scaled(bias, scale), softcap(lm.config), scale)


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: Union[torch.Tensor, int], head: Optional[Head] = None, **body_kwargs) -> torch.Tensor:
    """The decoder body's last hidden states (after the final norm) that predict the scored tokens, as the op's
    input (:meth:`Head.inputs`). The lm_head, and so any [B, L, V] logits, is never called.

    ``positions``: [B, T] indices into the sequence (row b, token t: the position whose hidden state predicts
    it), or an int K for the last K tokens of every row (positions ``L - K - 1 .. L - 2``). ``head``: the
    model's :func:`read_head`, when the caller holds it (only its dtype and scale are read here; a step that
    passes its one read gathers an FSDP2-sharded head once, not twice); None reads it.
    """
    lm = unwrap(model)
    out = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **body_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if isinstance(positions, torch.Tensor):
        hidden = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    else:  # position i predicts token i + 1
        hidden = hidden[:, hidden.shape[1] - int(positions) - 1:-1]
    return (read_head(lm) if head is None else head).inputs(hidden)


class ResponseHiddenStates(torch.nn.Module):
    """:func:`hidden_states` as a module, for the trainers to hand to accelerate: DDP's gradient synchronisation
    hooks into a wrapped module's forward, and the fused loss needs the body's output, not the model's logits. The
    lm_head weight stays a parameter of the wrapped module (it receives its gradient through the op in the same
    backward)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        # accelerate's FSDP auto-wrap reads the decoder layer classes to shard one by one from here
        self._no_split_modules = getattr(unwrap(model), "_no_split_modules", None)

    def tie_weights(self):
        """accelerate's FSDP preparation re-ties tied embeddings after sharding through this method."""
        unwrap(self.model).tie_weights()

    def forward(self, input_ids, attention_mask, positions, head: Optional[Head] = None):
        return hidden_states(self.model, input_ids, attention_mask, positions, head=head)


class PackedRows(NamedTuple):
    rows: torch.Tensor  # [N, H] active rows, in row-major (b, t) order
    index: torch.Tensor  # [N] flat positions b * T + t of those rows
    shape: tuple  # (B, T)

    def take(self, values: torch.Tensor) -> torch.Tensor:
        """The active rows of another [B, T, ...] tensor aligned with the packed one."""
        b, t = self.shape
        return values.reshape((b * t,) + tuple(values.shape[2:])).index_select(0, self.index.to(values.device))


def pack_rows(hidden: torch.Tensor, mask: torch.Tensor) -> PackedRows:
    """Active rows of ``hidden`` [B, T, H] under ``mask`` [B, T] (differentiable w.r.t. ``hidden``)."""
    if hidden.dim() != 3 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"hidden must be [B, T, H] and mask [B, T] to match, got {tuple(hidden.shape)} and "
                         f"{tuple(mask.shape)}")
    b, t, width = hidden.shape
    index = (mask.reshape(-1) != 0).nonzero().squeeze(1).to(hidden.device)
    return PackedRows(hidden.reshape(b * t, width).index_select(0, index), index, (b, t))


def unpack_rows(values: torch.Tensor, packed: PackedRows, fill: float = 0.0) -> torch.Tensor:
    """Per-row ``values`` [N, ...] back to [B, T, ...], ``fill`` at inactive positions."""
    b, t = packed.shape
    if values.shape[0] != packed.index.shape[0]:
        raise ValueError(f"values must have one entry per packed row ({packed.index.shape[0]}), got {values.shape[0]}")
    out = values.new_full((b * t,) + tuple(values.shape[1:]), fill)
    return out.index_copy(0, packed.index, values).reshape((b, t) + tuple(values.shape[1:]))


def sequence_token_stats(hidden, weight, mask, *, targets=None, teacher_hidden=None, teacher_topk_ids=None,
                         teacher_topk_logprobs=None, **op_options) -> TokenStats:
    """:func:`pydistill.token_stats` over the [B, T, H] layout: (logp, entropy, divergence) as [B, T] float32,
    zeros outside ``mask`` [B, T].

    Only the masked rows are packed into the op's [N, H] input (:func:`pack_rows`), so tokens outside the mask
    cost no FLOPs in forward or backward; the results are scattered back (:func:`unpack_rows`). ``targets``
    [B, T] and a top-k teacher's [B, T, k] ids and log-probs may hold anything outside the mask.
    """
    from .losses.validation import check_per_token, check_vocab_weight  # here: the losses import this module

    b, t, _ = hidden.shape
    check_vocab_weight(weight)
    packed = pack_rows(hidden, mask.to(hidden.device))
    rows = {}
    if targets is not None:
        rows["targets"] = packed.take(check_per_token("targets", targets, b, t).to(hidden.device, torch.long))
    if teacher_hidden is not None:
        if teacher_hidden.dim() != 3 or tuple(teacher_hidden.shape[:2]) != (b, t):
            raise ValueError(f"teacher_hidden must be [B, T, H_t] with B, T = {b}, {t} (aligned with the student's "
                             f"response positions), got {tuple(teacher_hidden.shape)}")
        rows["teacher_hidden"] = packed.take(teacher_hidden)
    if teacher_topk_ids is not None or teacher_topk_logprobs is not None:
        for name, x in (("teacher_topk_ids", teacher_topk_ids), ("teacher_topk_logprobs", teacher_topk_logprobs)):
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != (b, t):
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must be [B, T, k] with B, T = {b}, {t} (aligned with the response "
                                 f"positions), got {shape}")
            rows[name] = packed.take(x)
    stats = token_stats(packed.rows, weight, **rows, **op_options)
    return TokenStats(*(unpack_rows(s, packed) for s in stats))


def head_token_stats(head: Head, hidden, mask, *, targets=None, teacher_head: Optional[Head] = None,
                     **options) -> TokenStats:
    """:func:`sequence_token_stats` through ``head`` (its bias and softcap); ``hidden`` (and ``teacher_hidden``)
    from :func:`hidden_states`. ``teacher_head``: the teacher context's own head (its weights, bias and softcap,
    which may differ from the student's); None when the teacher reads ``head`` too (one GEMM per vocabulary tile
    serves both contexts)."""
    if teacher_head is not None:
        options.update(teacher_softcap=teacher_head.teacher_softcap)
        if teacher_head.weight is not head.weight:
            options.update(teacher_weight=teacher_head.weight.detach(), teacher_bias=teacher_head.bias)
    return sequence_token_stats(hidden, head.weight, mask, targets=targets, bias=head.bias, softcap=head.softcap,
                                **options)


def op_options(*, bias=None, teacher_weight=None, teacher_bias=None, temperature=1.0, softcap=None,
               teacher_temperature=None, teacher_softcap=None, impl="auto",
               divergence: Optional[str] = None, beta: float = 0.5, clip: Optional[float] = None,
               topk_tail: bool = True, support_topk: Optional[int] = None,
               memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, differentiated=None) -> dict:
    """The op's options of a loss; ``differentiated`` names the outputs the loss differentiates (the fast
    mode keeps one gradient basis per name, so naming only those keeps the budget for rows)."""
    return dict(bias=bias, teacher_weight=teacher_weight, teacher_bias=teacher_bias, temperature=temperature,
                softcap=softcap, teacher_temperature=teacher_temperature, teacher_softcap=teacher_softcap, impl=impl,
                divergence=divergence, beta=beta, clip=clip, topk_tail=topk_tail, support_topk=support_topk,
                memory_budget_mb=memory_budget_mb, differentiated=differentiated)
