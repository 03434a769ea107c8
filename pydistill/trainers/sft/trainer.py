"""The SFT trainer: fused NLL of the reference solution's tokens after the student prompt."""
from __future__ import annotations

from ...losses import nll_loss
from ...prompts import render, student_messages
from ..contexts import build_context_batch, lm_head_bias, lm_head_softcap, lm_head_weight, response_hidden_states
from ..core import Trainer


class SFTTrainer(Trainer):
    method = "sft"

    def uses_teacher(self) -> bool:
        return False

    def prepare(self, problems: list) -> dict:
        tok = self.tokenizer
        prompts = [tok(render(tok, student_messages(p.question)), add_special_tokens=False)["input_ids"]
                   for p in problems]
        answers = [tok(p.solution.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                   for p in problems]
        batch = build_context_batch(prompts, answers, tok.pad_token_id, self.accelerator.device)
        return dict(batch=batch, tokens=int(batch.completion_mask.sum()), generated_tokens=0)

    def loss(self, prepared: dict, num_items_in_batch: float):
        batch = prepared["batch"]
        hidden = response_hidden_states(self.policy, batch)
        return nll_loss(hidden, lm_head_weight(self.model), batch.targets, batch.completion_mask,
                        num_items_in_batch=num_items_in_batch, bias=lm_head_bias(self.model), impl=self.config.impl,
                        memory_budget_mb=self.config.memory_budget_mb, softcap=lm_head_softcap(self.model))
