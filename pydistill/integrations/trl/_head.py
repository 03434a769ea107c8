"""The model side of the TRL integration: a forward that returns fused statistics instead of logits.

:func:`install` wraps a causal LM's ``forward`` (the instance attribute, the way TRL's own ``add_fused_lm_head``
does) so that ``model(input_ids=..., attention_mask=..., pydistill=request)`` runs the decoder body, keeps the
hidden states that predict the last ``request["keep"]`` tokens and hands them with the lm_head to
:func:`pydistill.token_stats`, all through :mod:`pydistill.boundary`. The call goes through whatever wraps the
model (DDP, PEFT, accelerate), so gradient synchronisation and adapters behave exactly as for an ordinary
forward; without ``pydistill=`` the model's previous forward runs unchanged (generation, TRL's own fused head).

A request is a plain dict (DDP walks its tensors like any other input):
- ``keep`` (int): the number of trailing positions scored; row ``t`` of the output is the next-token
  statistics of position ``L - keep - 1 + t``, i.e. of token ``input_ids[:, L - keep + t]``.
- ``hidden_only`` (bool): return those hidden states [B, keep, H] instead (a teacher context), as the op's input
  (:func:`pydistill.boundary.hidden_states`: the logit scale folded in).
- ``labels`` [B, keep]: the scored token ids, ``-100`` on rows to skip (they cost nothing, give 0).
- ``temperature`` and the divergence options of ``token_stats``: ``teacher_hidden`` [B, keep, H_t],
  ``teacher_head`` (the teacher model's :func:`pydistill.boundary.read_head`; None or the same weight: the
  teacher context is read through this model's head), ``divergence``, ``beta``, ``clip``.
- ``head``: the model's :func:`pydistill.boundary.read_head`, when the caller already read it this step (the
  forward then reads it no more: under FSDP2 each read gathers the head's shards).
Returns :class:`pydistill.TokenStats` with [B, keep] fields.
"""
from __future__ import annotations

import types

from ...boundary import head_token_stats, hidden_states, read_head, unwrap  # noqa: F401 (unwrap: the integration's)
from ...token_stats import TokenStats
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
    kwargs.pop("use_cache", None)
    for name, value in zip(("input_ids", "attention_mask"), args):
        kwargs[name] = value
    head = request.get("head")
    if head is None:
        head = read_head(model)  # once per forward: under FSDP2 each read gathers the head's shards
    hidden = hidden_states(model, kwargs.pop("input_ids"), kwargs.pop("attention_mask", None), int(request["keep"]),
                           head=head, **kwargs)
    if request.get("hidden_only"):
        return hidden
    return head_stats(model, hidden, request["labels"], head=head, temperature=float(request.get("temperature", 1.0)),
                      teacher_hidden=request.get("teacher_hidden"), teacher_head=request.get("teacher_head"),
                      divergence=request.get("divergence"),
                      beta=request.get("beta", 0.5), clip=request.get("clip"),
                      support_topk=request.get("support_topk"), topk_tail=request.get("topk_tail", True),
                      teacher_topk_ids=request.get("teacher_topk_ids"),
                      teacher_topk_logprobs=request.get("teacher_topk_logprobs"),
                      memory_budget_mb=request.get("memory_budget_mb", DEFAULT_MEMORY_BUDGET_MB),
                      differentiated=request.get("differentiated"))


def head_stats(model, hidden, labels, *, temperature=1.0, teacher_hidden=None, teacher_head=None, divergence=None,
               beta=0.5, clip=None, support_topk=None, topk_tail=True, teacher_topk_ids=None, teacher_topk_logprobs=None,
               memory_budget_mb=DEFAULT_MEMORY_BUDGET_MB, differentiated=None, head=None) -> TokenStats:
    """:func:`pydistill.token_stats` through ``model``'s head (:func:`pydistill.boundary.read_head`) of [B, K, H]
    hidden states from the fused forward (already the op's input), scoring ``labels`` [B, K] (``-100``: skipped
    row). Returns [B, K] fields.

    A teacher context (``teacher_hidden`` [B, K, H_t], from the fused forward too) is read through the same
    head, or through ``teacher_head`` (its :func:`pydistill.boundary.read_head`: weight, bias and softcap) when it
    is another model. With ``support_topk`` k the divergence is over the student's k most likely tokens (plus a
    tail bucket with ``topk_tail``), the teacher's log-probs taken at those ids (TRL's
    ``distillation_mode="topk_logits"``). A teacher given as top-k log-probs (``teacher_topk_ids`` /
    ``teacher_topk_logprobs`` [B, K, k], from a server) is used as given: no logit scale or temperature applies.
    ``head``: ``model``'s, when the caller already read it."""
    head = read_head(model) if head is None else head
    labels = labels.to(head.weight.device)
    options = {}
    if teacher_hidden is not None:
        teacher_dtype = (head if teacher_head is None else teacher_head).weight.dtype
        options = dict(teacher_hidden=teacher_hidden.to(device=head.weight.device, dtype=teacher_dtype),
                       teacher_head=teacher_head, divergence=divergence, beta=beta, clip=clip)
        if support_topk is not None:
            options.update(support_topk=support_topk, topk_tail=topk_tail)
    if teacher_topk_ids is not None:
        options = dict(teacher_topk_ids=teacher_topk_ids.to(head.weight.device),
                       teacher_topk_logprobs=teacher_topk_logprobs.to(head.weight.device),
                       topk_tail=topk_tail, divergence=divergence, beta=beta, clip=clip)
    return head_token_stats(head, hidden, labels != -100,
                            targets=labels, temperature=float(temperature), memory_budget_mb=memory_budget_mb,
                            differentiated=differentiated, **options)
