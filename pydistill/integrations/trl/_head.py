"""The model side of the TRL integration: a forward that returns fused statistics instead of logits.

:func:`install` wraps a causal LM's ``forward`` (the instance attribute, the way TRL's own ``add_fused_lm_head``
does) so that ``model(input_ids=..., attention_mask=..., pydistill=request)`` runs the decoder body, keeps the
hidden states that predict the last ``request["keep"]`` tokens and hands them with the lm_head weight to
:func:`pydistill.token_stats`. The call goes through whatever wraps the model (DDP, PEFT, accelerate), so
gradient synchronisation and adapters behave exactly as for an ordinary forward; without ``pydistill=`` the
model's previous forward runs unchanged (generation, TRL's own fused head).

A request is a plain dict (DDP walks its tensors like any other input):
- ``keep`` (int): the number of trailing positions scored; row ``t`` of the output is the next-token
  statistics of position ``L - keep - 1 + t``, i.e. of token ``input_ids[:, L - keep + t]``.
- ``hidden_only`` (bool): return those hidden states [B, keep, H] instead (a teacher context).
- ``labels`` [B, keep]: the scored token ids, ``-100`` on rows to skip (they cost nothing, give 0).
- ``temperature`` and the divergence options of ``token_stats``: ``teacher_hidden`` [B, keep, H_t],
  ``teacher_weight``, ``teacher_bias``, ``divergence``, ``beta``, ``clip``.
Returns :class:`pydistill.TokenStats` with [B, keep] fields.
"""
from __future__ import annotations

import types

import torch

from ...model_head import logit_scale, softcap, unwrap  # noqa: F401 (the integration's names for them)
from ...token_stats import TokenStats, token_stats
from ...token_stats.loop import DEFAULT_MEMORY_BUDGET_MB

BUDGET_ATTRIBUTE = "pydistill_memory_budget_mb"

_MARK = "_pydistill_previous_forward"
# Keyword arguments that wrappers (PEFT) pass as None and that the decoder body does not take.
_DROPPED = ("labels", "output_attentions", "output_hidden_states", "return_dict", "num_items_in_batch",
            "shift_labels", "logits_to_keep")


def set_memory_budget(trainer, memory_budget_mb) -> None:
    """The op's speed/memory knob for this trainer (see :func:`pydistill.token_stats`); one line if it is bad."""
    if isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float)) or \
            not 0 < memory_budget_mb < float("inf"):
        raise ValueError(f"memory_budget_mb must be a finite number > 0, got {memory_budget_mb!r}")
    setattr(trainer, BUDGET_ATTRIBUTE, float(memory_budget_mb))


def memory_budget(trainer) -> float:
    return getattr(trainer, BUDGET_ATTRIBUTE, DEFAULT_MEMORY_BUDGET_MB)


def head_parameters(model):
    """(weight, bias) of the output head, gathered into full tensors when FSDP2 shards them as DTensors
    (``full_tensor`` is differentiable, so the shards still receive their gradient)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) with a weight: pydistill's "
                         "fused op needs the [V, H] head weight")
    weight, bias = head.weight, getattr(head, "bias", None)
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None and hasattr(bias, "full_tensor") else bias
    return weight, bias


def install(model) -> None:
    """Wrap ``model.forward`` once (idempotent). ``model`` is the bare transformers causal LM."""
    if getattr(model, _MARK, None) is not None:
        return
    if not hasattr(model, "base_model") or not hasattr(model, "get_output_embeddings"):
        raise ValueError(f"{type(model).__name__} is not a transformers causal LM (no base_model / "
                         "get_output_embeddings): pydistill's TRL integration reads its decoder body and lm_head")
    previous = model.forward
    setattr(model, _MARK, previous)

    def forward(self, *args, pydistill=None, **kwargs):
        if pydistill is None:
            return previous(*args, **kwargs)
        return _fused_forward(self, args, kwargs, pydistill)

    model.forward = types.MethodType(forward, model)


def _fused_forward(model, args, kwargs, request):
    for name in _DROPPED:
        value = kwargs.pop(name, None)
        if value is not None and name != "return_dict":
            raise ValueError(f"pydistill's fused forward scores request['labels'] itself; got {name}={value!r}")
    kwargs["use_cache"] = False
    out = model.base_model(*args, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    keep = int(request["keep"])
    hidden = hidden[:, hidden.shape[1] - keep - 1:-1]  # position i predicts token i + 1
    if request.get("hidden_only"):
        return hidden
    return head_stats(model, hidden, request["labels"], temperature=float(request.get("temperature", 1.0)),
                      teacher_hidden=request.get("teacher_hidden"), teacher_weight=request.get("teacher_weight"),
                      teacher_bias=request.get("teacher_bias"), divergence=request.get("divergence"),
                      beta=request.get("beta", 0.5), clip=request.get("clip"),
                      support_topk=request.get("support_topk"), topk_tail=request.get("topk_tail", True),
                      teacher_topk_ids=request.get("teacher_topk_ids"),
                      teacher_topk_logprobs=request.get("teacher_topk_logprobs"),
                      memory_budget_mb=request.get("memory_budget_mb", DEFAULT_MEMORY_BUDGET_MB),
                      differentiated=request.get("differentiated"))


def head_stats(model, hidden, labels, *, temperature=1.0, teacher_hidden=None, teacher_weight=None,
               teacher_bias=None, divergence=None, beta=0.5, clip=None, support_topk=None,
               topk_tail=True, teacher_topk_ids=None, teacher_topk_logprobs=None,
               memory_budget_mb=DEFAULT_MEMORY_BUDGET_MB, differentiated=None) -> TokenStats:
    """:func:`pydistill.token_stats` of [B, K, H] hidden states through ``model``'s head (its logit scale and
    softcap applied), scoring ``labels`` [B, K] (``-100``: skipped row). Returns [B, K] fields.

    A teacher context (``teacher_hidden`` [B, K, H_t]) is read through the same logit scale and softcap: it is
    the same model in another context, or a model of the same architecture (``teacher_weight``). With
    ``support_topk`` k the divergence is over the student's k most likely tokens (plus a tail bucket with
    ``topk_tail``), the teacher's log-probs taken at those ids (TRL's ``distillation_mode="topk_logits"``).
    A teacher given as top-k log-probs (``teacher_topk_ids`` / ``teacher_topk_logprobs`` [B, K, k], from a
    server) is used as given: no logit scale or temperature applies to it."""
    weight, bias = head_parameters(model)
    b, t, width = hidden.shape
    scale = logit_scale(model.config)
    hidden = hidden.to(device=weight.device, dtype=weight.dtype)
    if scale != 1.0:  # cap(s * (h W + b)) == cap((s h) W + s b): fold the scale into the inputs
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    labels = labels.to(weight.device).reshape(-1)
    options = {}
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.to(device=weight.device,
                                           dtype=weight.dtype if teacher_weight is None else teacher_weight.dtype)
        if scale != 1.0:
            teacher_hidden = teacher_hidden * scale
            teacher_bias = None if teacher_bias is None else teacher_bias * scale
        options = dict(teacher_hidden=teacher_hidden.reshape(b * t, -1), teacher_weight=teacher_weight,
                       teacher_bias=teacher_bias, divergence=divergence, beta=beta, clip=clip)
        if support_topk is not None:
            options.update(support_topk=support_topk, topk_tail=topk_tail)
    if teacher_topk_ids is not None:
        options = dict(teacher_topk_ids=teacher_topk_ids.to(weight.device).reshape(b * t, -1),
                       teacher_topk_logprobs=teacher_topk_logprobs.to(weight.device).reshape(b * t, -1),
                       topk_tail=topk_tail, divergence=divergence, beta=beta, clip=clip)
    # The op computes in float32 itself; autocast must not re-cast its GEMMs.
    with torch.autocast(weight.device.type, enabled=False):
        stats = token_stats(hidden.reshape(b * t, width), weight, targets=labels, bias=bias,
                            temperature=float(temperature), softcap=softcap(model.config),
                            memory_budget_mb=memory_budget_mb, differentiated=differentiated, **options)
    return TokenStats(*(s.reshape(b, t) for s in stats))

