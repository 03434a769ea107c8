"""TRL's experimental ServerDistillationTrainer (a teacher on a vLLM server) with pydistill's fused op.

TRL asks the teacher server for the top-k log-probs of each completion token (its own client, request and
alignment code run unchanged) and then takes the student's full [B, T, V] log-softmax to gather them. Here the
student's forward returns the divergence from its decoder body's hidden states and the lm_head weight through
:func:`pydistill.token_stats` with a top-k teacher: the student's normalizer over the full vocabulary from the
chunk loop, its logits at the k ids from a gathered product, never [B, T, V] logits.

TRL's semantics are kept: ``beta=0`` is forward KL over the teacher's ``loss_top_k`` tokens, plus one tail bucket
(``loss_add_tail=True``) or renormalized over them; ``beta>0`` (``loss_top_k=1``) is the generalized JSD over the
teacher's top token and the sampled token (one outcome when they coincide, only the sampled one at ``beta=1``),
with the tail bucket as configured; student logits divided by ``temperature``; TRL's ``batchmean`` over the
completion tokens the teacher scored, divided by the accumulation steps.
"""
from __future__ import annotations

import torch

from . import _head
from ._compat import announce, check_hook, check_not_zero3, check_text_peft, check_trl_version
from .distillation import jsd_op


def teacher_support(trainer, teacher, tokens, labels):
    """The op's top-k teacher ([B, T, k] ids with -1 padding, log-probs) from TRL's server result for
    ``trainer.beta``: the teacher's top-k (beta 0), or its top-1 and the sampled token (beta > 0)."""
    scored = labels != -100
    topk_ids, topk_lps = teacher["topk_token_ids"], teacher["topk_logprobs"]
    if trainer.beta == 0:
        ids, lps = topk_ids, topk_lps
    elif trainer.beta == 1:
        ids, lps = tokens.unsqueeze(-1), teacher["actual_logprobs"].unsqueeze(-1)
    else:
        sampled = tokens.masked_fill(tokens == topk_ids[..., 0], -1)  # one outcome when they coincide
        ids = torch.stack([topk_ids[..., 0], sampled], dim=-1)
        lps = torch.stack([topk_lps[..., 0], teacher["actual_logprobs"]], dim=-1)
    keep = torch.isfinite(lps) & (ids >= 0) & scored.unsqueeze(-1)
    return ids.long().masked_fill(~keep, -1), lps.masked_fill(~keep, float("-inf"))


def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """Drop-in for ``ServerDistillationTrainer.compute_loss``: TRL's server request, pydistill's divergence."""
    if return_outputs:
        raise ValueError("return_outputs: pydistill's server-distillation loss builds no logits to return")
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    completion_labels = completion_ids.masked_fill(completion_mask == 0, -100)
    labels = torch.cat([torch.full_like(prompt_ids, -100), completion_labels], dim=1)
    request_inputs = {**inputs, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                      "prompt_attention_mask": prompt_mask}
    prompt_length = self._compute_prompt_length(request_inputs)
    teacher = self._get_teacher_token_logprobs_from_server(request_inputs, prompt_length)
    width = teacher["actual_logprobs"].shape[1]  # the completion window the teacher scored
    keep = input_ids.size(1) - prompt_length
    labels, tokens = labels[:, prompt_length:], input_ids[:, prompt_length:]
    scored = labels.clone()
    scored[:, width:] = -100
    ids, lps = teacher_support(self, teacher, tokens[:, :width], scored[:, :width])
    pad = keep - width
    ids = torch.nn.functional.pad(ids, (0, 0, 0, pad), value=-1)
    lps = torch.nn.functional.pad(lps, (0, 0, 0, pad), value=float("-inf"))
    stats = model(input_ids=input_ids, attention_mask=attention_mask,
                  pydistill=dict(keep=keep, labels=scored, temperature=self.temperature, teacher_topk_ids=ids,
                                 teacher_topk_logprobs=lps, topk_tail=bool(self.loss_add_tail), divergence="jsd",
                                 beta=float(self.beta), memory_budget_mb=_head.memory_budget(self),
                                 differentiated=("divergence",)))
    loss = self._reduce_divergence_loss(stats.divergence[:, :width], completion_mask=scored[:, :width] != -100,
                                        reduction="batchmean")
    if self.model.training:  # TRL's server path normalizes locally and re-applies the accumulation scaling
        loss = loss / self.current_gradient_accumulation_steps
    return loss


def check_server_distillation(trainer) -> None:
    check_not_zero3(trainer)
    check_text_peft(trainer.model)
    _head.install(_head.unwrap(trainer.model))


def make_server_distillation_trainer():
    from trl.experimental.server_distillation import ServerDistillationTrainer as _Base

    check_hook(_Base, "compute_loss", ("model", "inputs", "return_outputs", "num_items_in_batch"))
    check_hook(_Base, "_get_teacher_token_logprobs_from_server", ("inputs", "aligned_prompt_length"))

    class ServerDistillationTrainer(_Base):
        """``trl.experimental.server_distillation.ServerDistillationTrainer`` with the same constructor, whose
        divergence to the served teacher's top-k comes from pydistill's fused op (no [B, T, V] logits)."""

        def __init__(self, *args, allow_untested_trl=None, memory_budget_mb=_head.DEFAULT_MEMORY_BUDGET_MB,
                     **kwargs):
            check_trl_version(allow_untested_trl)
            _head.set_memory_budget(self, memory_budget_mb)
            super().__init__(*args, **kwargs)
            check_server_distillation(self)
            announce(self, "top-k " + jsd_op(self.beta))

        compute_loss = _compute_loss

    ServerDistillationTrainer.__module__ = __name__
    return ServerDistillationTrainer


def patch_server_distillation(trainer, memory_budget_mb=_head.DEFAULT_MEMORY_BUDGET_MB):
    import types

    check_server_distillation(trainer)
    _head.set_memory_budget(trainer, memory_budget_mb)
    trainer.compute_loss = types.MethodType(_compute_loss, trainer)
    announce(trainer, "top-k " + jsd_op(trainer.beta))
    return trainer
