"""TRL's DistillationTrainer and GKDTrainer with pydistill's divergence.

Both TRL trainers minimise the generalized JSD_beta between the teacher's and the student's next-token
distributions on the completion tokens (``beta`` 0 is forward KL(teacher || student), 1 reverse KL, else
beta KL(p || M) + (1 - beta) KL(q || M) with M = beta p + (1 - beta) q), summed over the valid tokens and
divided by ``num_items_in_batch`` when the trainer passes it, by their count otherwise. That is
:func:`pydistill.token_stats`'s ``divergence="jsd"`` with the same ``beta`` convention, so the integration keeps
TRL's inputs, masks and normalization and swaps only the divergence computation:

- ``DistillationTrainer``: its protected ``_compute_loss`` (run inside the student wrapper's forward, so DDP and
  FSDP behave as in TRL) runs both decoder bodies (the teacher's through TRL's forward redirection, as TRL does)
  and hands their hidden states, with both heads, to the fused op; at TRL's ``temperature``, with each model's
  logit scale.
- ``GKDTrainer`` (``trl.experimental.gkd``): ``compute_loss`` runs both models' decoder bodies only (through
  their wrappers) instead of their full-logits forward; TRL's GKD divides neither model's logits by the
  temperature in its loss, and neither does this.

When the teacher's head is the student's own (one model, two contexts), the op is given the head once and one
GEMM per vocabulary tile serves both contexts; otherwise the teacher's head is passed separately (its
vocabulary must match; its width, logit scale and final-logit softcap may differ: each context is scored with its
own). Each head is read once per step (under FSDP2 each read gathers its shards). Refused with the field named:
DeepSpeed ZeRO-3, prompt-learning adapters, multimodal inputs.
"""
from __future__ import annotations

import torch

from ...boundary import head_token_stats, hidden_states, read_head
from . import _head
from ._compat import announce, check_hook, check_not_zero3, check_text_peft, check_trl_version

_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
               "token_type_ids", "mm_token_type_ids", "image_position_ids")


def check_distillation(trainer, student, teacher) -> None:
    check_not_zero3(trainer)
    check_text_peft(student)
    if teacher is None:
        raise ValueError("teacher_model: pydistill's distillation integration needs a local teacher model "
                         "(server-side teachers keep TRL's own loss)")


def jsd_op(beta) -> str:
    """What the log line calls TRL's generalized JSD at ``beta`` (its endpoints are the two KLs)."""
    name = {0.0: "forward KL", 1.0: "reverse KL"}.get(float(beta), f"generalized JSD beta={beta:g}")
    return f"{name} teacher-student divergence"


def fused_divergence(student_hidden, student_model, teacher_hidden, teacher_model, mask, *, beta, temperature,
                     num_items_in_batch, memory_budget_mb=_head.DEFAULT_MEMORY_BUDGET_MB, head=None,
                     teacher_head=None):
    """(loss, entropy sum, valid-token count) of TRL's distillation losses from [B, K, H] hidden states
    (:func:`pydistill.boundary.hidden_states` of each model), each context through its own head (weight, bias,
    softcap). ``head`` / ``teacher_head``: the models' :func:`pydistill.boundary.read_head`, when the step
    already read them; None reads them here."""
    head = read_head(student_model) if head is None else head
    if teacher_head is None:
        teacher_head = read_head(teacher_model)
    valid = mask.to(head.weight.device) != 0
    stats = head_token_stats(head, student_hidden, valid, teacher_head=teacher_head,
                             teacher_hidden=teacher_hidden.to(device=head.weight.device,
                                                              dtype=teacher_head.weight.dtype),
                             divergence="jsd", beta=float(beta), temperature=float(temperature),
                             memory_budget_mb=memory_budget_mb, differentiated=("divergence",))
    count = valid.sum()
    total = stats.divergence.sum()
    if num_items_in_batch is None:
        loss = total / count.clamp(min=1)
    else:
        loss = total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch)
                        else num_items_in_batch)
    return loss, stats.entropy.sum().detach(), count


def _distillation_compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
    """Drop-in for ``trl.DistillationTrainer._compute_loss`` (same inputs, same returned triple)."""
    given = [k for k in _MULTIMODAL if inputs.get(k) is not None]
    if given:
        raise ValueError(f"{given[0]}: pydistill.integrations.trl distils text-only batches")
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
    keep = inputs["completion_ids"].size(1)
    head = read_head(unwrapped_student)  # once per step each: under FSDP2 each read gathers the head's shards
    student_hidden = hidden_states(unwrapped_student, input_ids, attention_mask, keep, head)
    self.teacher_model.eval()
    unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
    with torch.no_grad():
        teacher_head = read_head(unwrapped_teacher)
        teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher, hidden_states,
                                                   unwrapped_teacher, input_ids, attention_mask, keep, teacher_head)
    return fused_divergence(student_hidden, _head.unwrap(unwrapped_student), teacher_hidden,
                            _head.unwrap(unwrapped_teacher), mask, beta=self.beta, temperature=self.temperature,
                            num_items_in_batch=num_items_in_batch, memory_budget_mb=_head.memory_budget(self),
                            head=head, teacher_head=teacher_head)


def _gkd_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """Drop-in for ``GKDTrainer.compute_loss``: TRL's GKD loss from the decoder bodies' hidden states."""
    if return_outputs:
        raise ValueError("return_outputs: pydistill's GKD loss builds no logits to return")
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    keep = ids.size(1) - 1  # every position but the last predicts the next token
    labels = inputs["labels"][:, 1:]
    # each head read once per step, handed to its model's forward (which would read it again) and to the op
    head = read_head(model)
    student_hidden = model(input_ids=ids, attention_mask=attention,
                           pydistill=dict(keep=keep, hidden_only=True, head=head))
    self.teacher_model.eval()
    with torch.no_grad():
        teacher_head = read_head(self.teacher_model)
        teacher_hidden = self.teacher_model(input_ids=ids, attention_mask=attention,
                                            pydistill=dict(keep=keep, hidden_only=True, head=teacher_head))
    loss, _, _ = fused_divergence(student_hidden, _head.unwrap(model), teacher_hidden, _head.unwrap(self.teacher_model),
                                  labels != -100, beta=self.beta, temperature=1.0,
                                  num_items_in_batch=num_items_in_batch, memory_budget_mb=_head.memory_budget(self),
                                  head=head, teacher_head=teacher_head)
    return loss


def _install_models(*models):
    for model in models:
        _head.install(_head.unwrap(model))


def make_distillation_trainer():
    import trl

    check_hook(trl.DistillationTrainer, "_compute_loss", ("unwrapped_student", "inputs", "num_items_in_batch"))

    class DistillationTrainer(trl.DistillationTrainer):
        """``trl.DistillationTrainer`` with the same constructor, whose divergence comes from pydistill's fused
        op (see :mod:`pydistill.integrations.trl.distillation`)."""

        def __init__(self, *args, allow_untested_trl=None, memory_budget_mb=_head.DEFAULT_MEMORY_BUDGET_MB, **kwargs):
            check_trl_version(allow_untested_trl)
            _head.set_memory_budget(self, memory_budget_mb)
            super().__init__(*args, **kwargs)
            check_distillation(self, self.model, self.teacher_model)
            announce(self, jsd_op(self.beta))

        _compute_loss = _distillation_compute_loss

    DistillationTrainer.__module__ = __name__
    return DistillationTrainer


def make_gkd_trainer():
    from trl.experimental.gkd import GKDTrainer as _GKDTrainer

    check_hook(_GKDTrainer, "compute_loss", ("model", "inputs", "return_outputs", "num_items_in_batch"))

    class GKDTrainer(_GKDTrainer):
        """``trl.experimental.gkd.GKDTrainer`` with the same constructor, whose generalized JSD comes from
        pydistill's fused op on the decoder bodies' hidden states (no [B, T, V] logits)."""

        def __init__(self, *args, allow_untested_trl=None, memory_budget_mb=_head.DEFAULT_MEMORY_BUDGET_MB, **kwargs):
            check_trl_version(allow_untested_trl)
            _head.set_memory_budget(self, memory_budget_mb)
            super().__init__(*args, **kwargs)
            check_distillation(self, self.model, self.teacher_model)
            _install_models(self.model, self.teacher_model)
            announce(self, jsd_op(self.beta))

        compute_loss = _gkd_compute_loss

    GKDTrainer.__module__ = __name__
    return GKDTrainer


def patch_distillation(trainer, memory_budget_mb=_head.DEFAULT_MEMORY_BUDGET_MB):
    """Switch a constructed ``trl.DistillationTrainer`` (or GKDTrainer) instance to the fused divergence."""
    import types

    check_distillation(trainer, trainer.model, trainer.teacher_model)
    _head.set_memory_budget(trainer, memory_budget_mb)
    if hasattr(trainer, "_get_last_hidden_state"):
        trainer._compute_loss = types.MethodType(_distillation_compute_loss, trainer)
    else:
        _install_models(trainer.model, trainer.teacher_model)
        trainer.compute_loss = types.MethodType(_gkd_compute_loss, trainer)
    announce(trainer, jsd_op(trainer.beta))
    return trainer
