"""TRL's GRPOTrainer with log-probabilities and entropies from pydistill's fused op.

TRL computes every GRPO-family loss (grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, vespo), the k3 KL, the
entropy bonus and mask, the off-policy mask and the vLLM importance-sampling correction from two [B, T]
tensors: the policy's per-token log-probabilities and entropies, produced by its protected hook
``_get_per_token_logps_and_entropies`` (also used for the old-policy and reference log-probabilities). This
integration replaces that hook only: it runs the decoder body, gathers the completion rows whose label is not
padding, and computes their log-probability and entropy (at TRL's temperature, with the model's logit scale and
softcap) straight from the hidden states and the lm_head weight. Every loss type, normalization and config field
is then TRL's own code, so the loss is TRL's to float32 rounding, and no [B, T, V] logits exist. The head
always runs in float32 with autocast off: under ``bf16=True`` autocast, TRL's CPU path rounds the logits to
bfloat16, so there the two differ by bf16 rounding (this path being the closer one to float32 logits).
``entropy_coef`` is TRL's own, applied by TRL to these entropies: ``loss = L_policy - entropy_coef * H``, H the
mean entropy over the completion tokens after the loss type's normalization (a positive value rewards entropy),
the meaning it has in every pydistill loss and trainer config.

Refused at construction, with the field named: MoE load-balancing losses (``router_aux_loss_coef``), DeepSpeed
ZeRO-3, prompt-learning PEFT adapters; at the first step: multimodal inputs (``pixel_values`` and co.).
"""
from __future__ import annotations

import types

import torch
import trl

from . import _head
from ._compat import announce, check_hook, check_not_zero3, check_text_peft, check_trl_version, trl_version

HOOK = "_get_per_token_logps_and_entropies"
GRPO_OP = "log-prob and entropy of the sampled tokens"
HOOK_PARAMETERS = ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
                   "compute_aux_loss")


def check_grpo(trainer) -> None:
    """Everything a GRPOTrainer must satisfy for the fused hook to compute what TRL's own hook computes."""
    check_hook(trl.GRPOTrainer, HOOK, HOOK_PARAMETERS)
    for attribute in ("temperature", "accelerator", "model"):
        if not hasattr(trainer, attribute):
            raise RuntimeError(f"TRL {trl_version()}: GRPOTrainer has no `{attribute}` attribute; pydistill's "
                               "integration reads it")
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError("router_aux_loss_coef: the MoE load-balancing loss is not computed by pydistill's fused "
                         "hook; set router_aux_loss_coef=0 in the model config to use pydistill.integrations.trl")
    check_not_zero3(trainer)
    check_text_peft(trainer.model)
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            _head.install(_head.unwrap(model))


def fused_logps_and_entropies(trainer, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                              compute_entropy=False, compute_aux_loss=False, **multimodal):
    """Drop-in for TRL's hook: ([B, K] log-probs, [B, K] entropies or None, None) of the last K tokens.

    Tokens whose attention mask is 0 (padding after EOS) get 0 in both outputs and cost no FLOPs; ``batch_size``
    chunks the rows as TRL does.
    """
    given = [name for name, value in multimodal.items() if value is not None]
    if given:
        raise ValueError(f"{given[0]}: pydistill.integrations.trl scores text-only batches; multimodal inputs go "
                         "through TRL's own GRPOTrainer")
    if compute_aux_loss:
        raise ValueError("router_aux_loss_coef: the MoE load-balancing loss is not computed by pydistill's hook")
    _head.install(_head.unwrap(model))  # idempotent; covers a reference model created after construction
    keep = int(logits_to_keep)
    batch_size = batch_size or input_ids.size(0)
    logps, entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, attention = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
        labels = ids[:, -keep:].masked_fill(attention[:, -keep:] == 0, -100)
        # TRL's GRPO loss differentiates the log-probabilities only (its entropies mask and log, detached)
        request = dict(keep=keep, labels=labels, temperature=trainer.temperature,
                       memory_budget_mb=_head.memory_budget(trainer), differentiated=("logp",))
        with trainer.accelerator.autocast():
            stats = model(input_ids=ids, attention_mask=attention, pydistill=request)
        logps.append(stats.logp)
        entropies.append(stats.entropy)
    return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with the same constructor, whose log-probabilities and entropies come from pydistill's
    fused op (see this module's docstring). Raises at construction when the installed TRL is outside the tested
    range (unless ``allow_untested_trl=True``: see :func:`check_trl_version`) or a config field asks for something
    the fused hook cannot compute."""

    def __init__(self, *args, allow_untested_trl=None, memory_budget_mb=_head.DEFAULT_MEMORY_BUDGET_MB, **kwargs):
        check_trl_version(allow_untested_trl)
        _head.set_memory_budget(self, memory_budget_mb)
        super().__init__(*args, **kwargs)
        check_grpo(self)
        announce(self, GRPO_OP)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **multimodal):
        return fused_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size,
                                         compute_entropy, compute_aux_loss, **multimodal)


def patch_grpo(trainer, allow_untested_trl=None, memory_budget_mb=_head.DEFAULT_MEMORY_BUDGET_MB):
    """Switch an existing ``trl.GRPOTrainer`` instance to the fused hook (before ``train()``)."""
    check_trl_version(allow_untested_trl)
    check_grpo(trainer)
    _head.set_memory_budget(trainer, memory_budget_mb)
    setattr(trainer, HOOK, types.MethodType(fused_logps_and_entropies, trainer))
    announce(trainer, GRPO_OP)
    return trainer
