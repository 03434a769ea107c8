"""TRL's experimental SDPO and SDFT trainers (OPSD's family) with pydistill's fused op.

Both train the policy to match the same model reading a teacher context (feedback for SDPO, a demonstration for
SDFT) on the policy's own completions. TRL forwards both contexts to full [B, K, V] logits; here the teacher
context runs the decoder body only (no grad, under TRL's teacher context: adapter disabled, EMA adapter or
EMA copy), and the student's forward hands its hidden states, the teacher's and the head(s) to one call of
:func:`pydistill.token_stats`. When the teacher is the student model itself (``teacher_model_kind`` "live", or
"base"/"ema" realised as adapters of the same model) the head is shared: one GEMM per vocabulary tile serves
both contexts. A separate EMA copy passes its own head.

TRL's semantics are kept: logits divided by ``temperature``; ``distillation_mode="full_logits"`` is the
generalized JSD with ``distillation_alpha`` (0 forward KL, 1 reverse KL); ``"topk_logits"`` the same divergence
over the student's ``distillation_topk`` most likely tokens (plus a tail bucket with ``distillation_add_tail``),
the teacher's log-probs taken there, without [B, K, V] logits; ``"sampled_token"`` (alpha 1) is
``stopgrad(logp_s - logp_t) * logp_s`` on the sampled tokens; ``distillation_is_clip`` multiplies by the detached
``min(exp(clamp(logp - old_logp, -20, 20)), clip)`` when old log-probs exist; the loss is the mean over sequences of
each sequence's mean over its loss mask (SDPO: ``self_distillation_mask``; SDFT: the first
``num_loss_tokens_to_skip`` tokens left out); SDPO blends ``(1 - w) * policy + w * distillation`` with
``distillation_weight`` w and its grpo/bnpo/dr_grpo/dapo policy term; the total is divided by the accumulation
steps.

With ``use_teacher_server=True`` (TRL: a live teacher on the vLLM generation server, ``distillation_weight=1``)
TRL's own client asks the server for the teacher context's top-k log-probs after TRL's weight sync; the student
side stays fused: ``"topk_logits"`` is the divergence over the teacher's k ids (plus the tail bucket with
``distillation_add_tail``, else renormalized over them) through the op's top-k teacher inputs, ``"sampled_token"``
takes the served log-prob of each sampled token.

The per-token pieces are pydistill's public loss pieces: :func:`pydistill.losses.distillation.
distillation_per_token` (the importance weight) and :func:`pydistill.losses.policy_gradient.
policy_gradient_per_token` / ``reduce_policy_loss`` (SDPO's policy term).
"""
from __future__ import annotations

import torch

from ...losses.distillation import distillation_per_token
from ...losses.policy_gradient import policy_gradient_per_token, reduce_policy_loss
from . import _head
from ._compat import announce, check_hook, check_not_zero3, check_text_peft, check_trl_version

HOOKS = ("_get_teacher_context_for_self_distillation", "_log_self_distillation_metric")
# TRL's clamp of the importance log-ratio before its exp
IS_LOG_RATIO_BOUND = 20.0


def check_self_distillation(trainer) -> None:
    args = trainer.args
    if args.distillation_mode not in ("full_logits", "sampled_token", "topk_logits"):
        raise ValueError(f"distillation_mode={args.distillation_mode!r}: pydistill's fused op computes "
                         "'full_logits', 'topk_logits' and 'sampled_token'")
    if args.distillation_mode == "sampled_token" and args.distillation_alpha != 1.0:
        raise ValueError(f"distillation_alpha must be 1.0 (reverse KL) with distillation_mode='sampled_token', "
                         f"got {args.distillation_alpha}")
    if getattr(args, "use_teacher_server", False):
        check_hook(type(trainer), "_get_teacher_token_logprobs_from_server", ("inputs", "logits_to_keep"))
        if getattr(trainer, "teacher_client", None) is None or getattr(trainer, "vllm_generation", None) is None:
            raise ValueError("use_teacher_server: this TRL trainer built no teacher_client / vllm_generation; "
                             "pydistill's server path uses TRL's own (use_vllm=True, vllm_mode='server')")
    check_not_zero3(trainer)
    check_text_peft(trainer.model)
    for model in (trainer.model, trainer.teacher_model):
        _head.install(_head.unwrap(model))


def self_distillation_op(args) -> str:
    if args.distillation_mode == "sampled_token":
        what = "sampled-token log-probs of both contexts"
    else:
        from .distillation import jsd_op

        what = jsd_op(args.distillation_alpha)
    return what + (" (teacher top-k from the vLLM server)" if getattr(args, "use_teacher_server", False) else "")


def _loss_mask(trainer, inputs):
    completion_mask = inputs["completion_mask"]
    mask = completion_mask
    if inputs.get("self_distillation_mask") is not None:  # SDPO: groups without a usable teacher context
        mask = completion_mask * inputs["self_distillation_mask"].unsqueeze(1)
    skip = getattr(trainer, "num_loss_tokens_to_skip", 0) or 0
    if skip > 0:  # SDFT: the first tokens carry teacher-prompt artifacts
        positions = torch.arange(completion_mask.size(1), device=completion_mask.device).unsqueeze(0)
        mask = completion_mask * (positions >= skip).long()
    return mask


def _policy_loss(trainer, inputs, logp):
    """SDPO's clipped-surrogate term (grpo / bnpo / dr_grpo / dapo) from the fused log-probs."""
    mask = inputs["completion_mask"].bool()
    advantages = inputs["advantages"]
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    per_token, _ = policy_gradient_per_token(logp, advantages, mask, old_logp=inputs.get("old_per_token_logps"),
                                             epsilon_low=trainer.epsilon_low, epsilon_high=trainer.epsilon_high,
                                             importance_sampling_level=trainer.importance_sampling_level)
    if trainer.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
        raise ValueError(f"loss_type={trainer.loss_type!r}: SDPO's policy term takes grpo, bnpo, dr_grpo or dapo")
    # SDPO normalizes bnpo and dapo by the micro-batch's own token count (no num_items_in_batch)
    loss = reduce_policy_loss(per_token, mask, trainer.loss_type, max_completion_length=trainer.max_completion_length)
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode]["self_distillation/policy_loss"].append(
        trainer.accelerator.gather(loss.detach()).mean().item())
    return loss


def _served_teacher(self, inputs, keep, labels, loss_mask):
    """TRL's weight sync and server request, then the served teacher as the op's top-k inputs ([B, K, k] ids
    with -1 padding and log-probs) and the sampled tokens' served log-probs [B, K] (0 outside the loss mask)."""
    if self.state.global_step != self._last_loaded_step:  # buffered batches outlive a step: re-sync first
        self.vllm_generation.sync_weights()
        self.accelerator.wait_for_everyone()  # every rank scores against the fully pushed weights
        self._last_loaded_step = self.state.global_step
    served = self._get_teacher_token_logprobs_from_server(inputs, keep)
    required = loss_mask.bool()
    actual = served["actual_logprobs"]
    if bool((required & ~torch.isfinite(actual)).any()):
        raise ValueError("use_teacher_server: the teacher server returned no log-prob for a completion token inside "
                         "the loss mask")
    lps = served["topk_logprobs"]
    scored = (labels != -100).unsqueeze(-1) & torch.isfinite(lps)
    ids = served["topk_token_ids"].long().masked_fill(~scored, -1)
    return ids, lps.masked_fill(~scored, float("-inf")), torch.where(required, actual, torch.zeros_like(actual))


def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """Drop-in for SDPOTrainer / SDFTTrainer ``compute_loss`` with a local or a served teacher."""
    if return_outputs:
        raise ValueError("return_outputs: pydistill's self-distillation loss builds no logits to return")
    args = self.args
    weight = getattr(args, "distillation_weight", 1.0)
    served = getattr(args, "use_teacher_server", False)
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    keep = completion_ids.size(1)
    ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    labels = completion_ids.masked_fill(completion_mask == 0, -100)
    request = dict(keep=keep, labels=labels, temperature=self.temperature, memory_budget_mb=_head.memory_budget(self),
                   differentiated=("logp",))
    mode = "train" if self.model.training else "eval"
    if weight == 0.0:
        loss = _policy_loss(self, inputs, model(input_ids=ids, attention_mask=attention, pydistill=request).logp)
        return loss / (self.current_gradient_accumulation_steps if self.model.training else 1.0)
    loss_mask = _loss_mask(self, inputs)
    topk = args.distillation_mode == "topk_logits"
    full = args.distillation_mode == "full_logits" or topk
    divergence = dict(divergence="jsd", beta=float(args.distillation_alpha),
                      # the policy part (weight < 1) differentiates logp beside the divergence
                      differentiated=("logp", "divergence") if weight < 1.0 else ("divergence",))
    if served:  # TRL allows it with a live teacher, weight 1 and 'topk_logits' / 'sampled_token' only
        topk_ids, topk_lps, teacher_logp = _served_teacher(self, inputs, keep, labels, loss_mask)
        if topk:
            request.update(divergence, teacher_topk_ids=topk_ids, teacher_topk_logprobs=topk_lps,
                           topk_tail=bool(args.distillation_add_tail))
        stats = model(input_ids=ids, attention_mask=attention, pydistill=request)
        gap = ((stats.logp.detach() - teacher_logp).abs() * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
        self._metrics[mode]["self_distillation/server_logprob_abs_diff"].append(
            self.accelerator.gather(gap).mean().item())
    else:
        # each distinct model's head read once per step (under FSDP2 each read gathers its shards), handed to
        # both forwards and the op; a teacher that is the student model itself reuses the student's read
        student, teacher = _head.unwrap(model), _head.unwrap(self.teacher_model)
        head = _head.read_head(student)
        teacher_head = head if teacher is student else _head.read_head(teacher)
        request["head"] = head
        with torch.no_grad(), self._get_teacher_context_for_self_distillation():
            teacher_hidden = self.teacher_model(input_ids=inputs["teacher_input_ids"],
                                                attention_mask=inputs["teacher_attention_mask"],
                                                pydistill=dict(keep=keep, hidden_only=True, head=teacher_head))
        if full:  # a shared head weight (one model): one GEMM per vocabulary tile serves both contexts
            request.update(divergence, teacher_hidden=teacher_hidden, teacher_head=teacher_head)
            if topk:  # the student's own top-k support, the teacher's log-probs there
                request.update(support_topk=int(args.distillation_topk), topk_tail=bool(args.distillation_add_tail))
        stats = model(input_ids=ids, attention_mask=attention, pydistill=request)
        if not full:
            with torch.no_grad():
                teacher_logp = _head.head_stats(teacher, teacher_hidden, labels, temperature=self.temperature,
                                                head=teacher_head).logp
    if full:
        per_token = stats.divergence
    else:  # sampled_token, reverse KL: stopgrad(logp_s - logp_t) * logp_s
        per_token = (stats.logp - teacher_logp).detach() * stats.logp
    old = inputs.get("old_per_token_logps")
    if args.distillation_is_clip is not None and old is not None:
        # TRL clamps the log-ratio at -20 from below before its exp (the clip bounds it above)
        old = torch.minimum(old, stats.logp.detach() + IS_LOG_RATIO_BOUND)
        per_token, _ = distillation_per_token(per_token, stats.logp, old_logp=old,
                                              importance_clip=float(args.distillation_is_clip))
    distillation = _sequence_mean(self, mode, per_token, loss_mask, stats.logp)
    loss = distillation
    if weight < 1.0:
        loss = (1 - weight) * _policy_loss(self, inputs, stats.logp) + weight * distillation
    return loss / (self.current_gradient_accumulation_steps if self.model.training else 1.0)


def _sequence_mean(self, mode, per_token, loss_mask, logp):
    """TRL's reduction: each sequence's mean over its loss mask, averaged over every sequence (those the mask
    empties count as 0); an empty mask gives 0 on the graph (zero gradients, not a stopped backward)."""
    if loss_mask.sum() == 0:
        self._log_self_distillation_metric(mode, 0.0)
        return logp.sum() * 0.0
    masked = per_token * loss_mask
    token_mean = masked.sum() / loss_mask.sum().clamp(min=1.0)
    self._log_self_distillation_metric(mode, self.accelerator.gather(token_mean.detach()).mean().item())
    return (masked.sum(-1) / loss_mask.sum(-1).clamp(min=1.0)).mean()


def _make(base):
    for hook in HOOKS:
        check_hook(base, hook, ())

    class Trainer(base):
        __doc__ = (f"``trl.experimental.{base.__name__}`` with the same constructor, whose self-distillation loss "
                   "comes from pydistill's fused op (see :mod:`pydistill.integrations.trl.self_distillation`).")

        def __init__(self, *args, allow_untested_trl=None, memory_budget_mb=_head.DEFAULT_MEMORY_BUDGET_MB, **kwargs):
            check_trl_version(allow_untested_trl)
            _head.set_memory_budget(self, memory_budget_mb)
            super().__init__(*args, **kwargs)
            check_self_distillation(self)
            announce(self, self_distillation_op(self.args))

        compute_loss = _compute_loss

    Trainer.__name__ = Trainer.__qualname__ = base.__name__
    Trainer.__module__ = __name__
    return Trainer


def make_sdpo_trainer():
    from trl.experimental.sdpo import SDPOTrainer

    return _make(SDPOTrainer)


def make_sdft_trainer():
    from trl.experimental.sdft import SDFTTrainer

    return _make(SDFTTrainer)


def patch_self_distillation(trainer, memory_budget_mb=_head.DEFAULT_MEMORY_BUDGET_MB):
    import types

    check_self_distillation(trainer)
    _head.set_memory_budget(trainer, memory_budget_mb)
    trainer.compute_loss = types.MethodType(_compute_loss, trainer)
    announce(trainer, self_distillation_op(trainer.args))
    return trainer
