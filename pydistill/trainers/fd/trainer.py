"""The Feedback Distillation trainer: feedback on each attempt, the feedback-conditioned teacher, the blend."""
from __future__ import annotations

import logging
import shlex
from typing import Callable, Optional

import torch

from ...losses import blended_loss, distillation_loss
from ...prompts import feedback_teacher_messages, render
from ...boundary import Head, head_token_stats, read_head
from ..config import loss_temperature
from ..contexts import build_context_batch, head_options, response_hidden_states, teacher_head
from ..groups import sample_groups
from ..grpo.trainer import GRPOLoopTrainer
from ..rollout import HFRolloutEngine, SamplingSettings
from ..teacher import served_teacher
from .config import FDConfig
from .feedback import (AttemptNumbersWithheld, FeedbackStats, LeanFeedback, ModelFeedback, SolutionFeedback,
                       VerifierFeedback, collect_feedback)

logger = logging.getLogger(__name__)


class FDTrainer(GRPOLoopTrainer):
    method = "fd"

    @property
    def supports_sharded_parameters(self) -> bool:
        # a critic retries failed items one by one: a data-dependent number of generate calls per process
        return self.config.feedback != "critic"

    def __init__(self, config: FDConfig, *args, feedback_source: Optional[Callable] = None, **kwargs):
        """``feedback_source``: any callable ``(prompt, attempt, answer) -> str | None`` (optionally with a
        ``batch(items)`` method) that replaces the configured one."""
        config.validate()
        self.feedback_source = feedback_source
        lean = config.feedback == "lean" and config.feedback_content != "solution"
        if feedback_source is None and lean:
            # Before any model is loaded: no Lean binary fails at start-up with a message that says so.
            command = shlex.split(config.lean_command) if config.lean_command else None
            self.feedback_source = LeanFeedback(command=command, timeout=config.lean_timeout,
                                                header=config.lean_header, memory_mb=config.lean_memory_mb)
        super().__init__(config, *args, **kwargs)
        content = config.feedback_content
        if content == "solution":  # replaces any source: the teacher reads the worked solution instead
            self.feedback_source = SolutionFeedback({p.question: p.solution for p in self.train_pool})
        elif self.feedback_source is None and config.feedback == "verifier":
            self.feedback_source = VerifierFeedback(quote_attempt=content == "full",
                                                    state_answer=content == "corrections")
        elif self.feedback_source is None:
            self.feedback_source = self._critic()
        quotes_nothing = isinstance(self.feedback_source, VerifierFeedback) and not self.feedback_source.quote_attempt
        if content == "no_attempt_numbers" and not quotes_nothing:
            self.feedback_source = AttemptNumbersWithheld(self.feedback_source)

    def _critic(self) -> ModelFeedback:
        """The student itself (through the rollout engine) or a second HF model, sampling at a low temperature."""
        cfg = self.config
        engine, tokenizer = self.engine, self.tokenizer
        if cfg.critic_model:
            from ...models import load_model

            critic, tokenizer = load_model(cfg.critic_model, device=self.accelerator.device)
            critic.eval()
            engine = HFRolloutEngine(critic, tokenizer, batch_size=cfg.micro_batch_size * cfg.num_generations)
        settings = SamplingSettings(cfg.critic_max_new_tokens, cfg.critic_temperature, n=1)
        return ModelFeedback(lambda prompts: engine.sample(prompts, settings).texts,
                             render=lambda text: render(tokenizer, [{"role": "user", "content": text}]))

    def uses_teacher(self) -> bool:
        return self.config.teacher_url is None  # a served teacher holds no weights here

    # ----- rollouts, feedback, teacher contexts ----------------------------------------------------------
    def prepare(self, problems: list) -> dict:
        tok = self.tokenizer
        batch = sample_groups(self, problems, self.reward)
        texts = batch.rollouts.texts
        feedback, stats = collect_feedback(self.feedback_source,
                                           [(p.question, t, p.answer) for p, t in zip(batch.problems, texts)])
        if stats.failures or stats.timeouts:
            logger.warning("feedback source %s: %d failures and %d timeouts over %d attempts (trained without "
                           "feedback); first errors: %s", type(self.feedback_source).__name__, stats.failures,
                           stats.timeouts, len(texts), "; ".join(stats.errors) or "-")
        siblings = self.siblings(batch) if self.config.include_sibling else [None] * len(texts)
        frame = self.config.teacher_frame
        teacher_ids = [tok(render(tok, feedback_teacher_messages(p.question, f, s, frame)), add_special_tokens=False)
                       ["input_ids"] for p, f, s in zip(batch.problems, feedback, siblings)]
        teacher = build_context_batch(teacher_ids, batch.rollouts.completion_ids, tok.pad_token_id,
                                      self.accelerator.device)
        # The author's self_distillation_mask: a rollout with neither feedback nor a sibling has the bare prompt as
        # its teacher context, and pure FD leaves it out (the blend's GRPO term still trains on every rollout).
        informative = torch.tensor([bool(f) or s is not None for f, s in zip(feedback, siblings)],
                                   device=self.accelerator.device)
        generated = int(batch.student.completion_mask.sum())
        prepared = dict(groups=batch, teacher=teacher, feedback=feedback, feedback_stats=stats,
                        informative=informative, generated_tokens=generated,
                        teacher_prompt_tokens=sum(map(len, teacher_ids)) / len(teacher_ids),
                        sibling_share=sum(s is not None for s in siblings) / len(siblings))
        # the global normalizer: pure FD's distilled tokens, else every completion token (as GRPO)
        pure = self.config.distillation_weight == 1
        prepared["tokens"] = int(self.trained_mask(prepared).sum()) if pure else generated
        return prepared

    @staticmethod
    def siblings(batch) -> list:
        """For each rollout, the first other rollout of its group that the verifier accepts (None: none)."""
        g, out = batch.group_size, []
        for i in range(len(batch.rollouts.texts)):
            start = i - i % g
            found = [j for j in range(start, start + g) if j != i and bool(batch.correct[j])]
            out.append(batch.rollouts.texts[found[0]] if found else None)
        return out

    def finalize_batch(self, prepared: list) -> None:
        """GRPO's advantages and group metrics (trajectory diversity included), plus feedback counts."""
        super().finalize_batch(prepared)
        total = FeedbackStats()
        for p in prepared:
            for key in ("given", "empty", "failures", "timeouts"):
                setattr(total, key, getattr(total, key) + getattr(p["feedback_stats"], key))
        attempts = max(sum(len(p["feedback"]) for p in prepared), 1)
        # The step's totals go into every micro-batch: the loop averages micro-batch metrics, giving the total.
        step_metrics = dict(total.as_metrics(), **{"feedback/given_share": total.given / attempts})
        for p in prepared:
            p["metrics"].update(step_metrics)
            p["metrics"].update(teacher_prompt_tokens=p["teacher_prompt_tokens"], sibling_share=p["sibling_share"],
                                # the rows the loss trains on (the blend: all of them)
                                distilled_rollouts_share=float(self.trained_mask(p).any(1).float().mean()))

    # ----- the loss ----------------------------------------------------------------------------------------
    def trained_mask(self, prepared: dict) -> torch.Tensor:
        """Pure FD: the tokens of rollouts whose teacher context carries feedback or a sibling. The blend: every
        completion token (the fused blend takes one mask for both terms, and the GRPO term needs every rollout;
        its distillation term so still covers rollouts without feedback)."""
        mask = prepared["groups"].student.completion_mask
        if self.config.distillation_weight == 1:
            return mask & prepared["informative"].to(mask.device).unsqueeze(1)
        if self.config.distillation_weight > 0:
            return mask
        return super().trained_mask(prepared)

    def sampling_logp(self, hidden: torch.Tensor, student, head: Optional[Head] = None) -> torch.Tensor:
        """log q_T(y_t) [B, T]: the sampled tokens under the student at the sampling temperature (the policy
        the rollouts came from), for the importance weight min(pi(y_t) / q_T(y_t), importance_clip). ``head``:
        the student's, when the step already read it."""
        with torch.no_grad():
            return head_token_stats(read_head(self.model) if head is None else head, hidden.detach(),
                                    student.completion_mask,
                                    targets=student.targets, temperature=self.config.temperature,
                                    impl=self.config.impl, memory_budget_mb=self.config.memory_budget_mb).logp

    def loss(self, prepared: dict, num_items_in_batch: float):
        cfg = self.config
        student, teacher = prepared["groups"].student, prepared["teacher"]
        head = read_head(self.model)  # once per step: under FSDP2 each read gathers the head's shards
        hidden = response_hidden_states(self.policy, student, head)
        # The teacher's capped logits over T * tau, the sharpened teacher, on every head: the server divides its
        # (already capped) logits by that temperature, the op takes it as the teacher context's own.
        teacher_t = loss_temperature(cfg) * cfg.teacher_temperature
        served = served_teacher(self, teacher_t)
        teacher_hidden, t_head, teacher_side = None, None, {}
        if served is not None:  # the same feedback-conditioned context, scored by the server
            teacher_side["teacher_topk_ids"], teacher_side["teacher_topk_logprobs"] = served.topk(teacher)
        else:
            t_head = teacher_head(self.teacher)
            teacher_hidden = self.teacher.hidden_states(teacher, t_head or head)
            teacher_side["teacher_temperature"] = teacher_t
            if t_head is not None:  # a copy's head: its own weight, bias and cap
                teacher_side.update(t_head.teacher_options())
        distill = dict(divergence=cfg.divergence, beta=cfg.jsd_beta, clip=cfg.clip, temperature=loss_temperature(cfg),
                       **teacher_side)
        if cfg.distillation_weight == 1:
            old_logp = self.sampling_logp(hidden, student, head) if cfg.importance_clip else None
            return distillation_loss(hidden, head.weight, teacher_hidden, self.trained_mask(prepared),
                                     targets=student.targets if cfg.importance_clip else None, old_logp=old_logp,
                                     importance_clip=cfg.importance_clip, entropy_coef=cfg.entropy_coef,
                                     num_items_in_batch=num_items_in_batch, impl=cfg.impl,
                                     memory_budget_mb=cfg.memory_budget_mb, **head_options(head), **distill)
        options = self.policy_loss_options(prepared, num_items_in_batch, head)
        return blended_loss(hidden, head.weight, teacher_hidden, options.pop("targets"),
                            options.pop("advantages"), options.pop("mask"),
                            distillation_weight=cfg.distillation_weight, **distill, **options)
