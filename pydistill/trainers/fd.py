"""Feedback Distillation (arXiv 2605.30861): distill a feedback-conditioned EMA teacher into the student.

The student samples G trajectories per prompt (as GRPO does). A feedback source writes text about each
attempt — the step verifier (which step is wrong, what its value should be, whether the final answer is
right), a critic model (the student itself through the rollout engine at a low temperature, or a second HF
model, told not to give the answer away), or the Lean 4 compiler's errors. The teacher, an EMA copy of the
student by default, reads the prompt plus that feedback (plus, with ``include_sibling``, a correct attempt
from the same group) and scores the same trajectory tokens; the loss is the full-vocabulary per-token
divergence teacher vs student through the fused op (forward KL by default, as in the paper's public config).

With ``distillation_weight`` w < 1 the loss is ``w * FD + (1 - w) * GRPO`` from one pass of the op
(:func:`pydistill.losses.blended_loss`), the GRPO term using this config's GRPO options and group advantages.
GRPO started from a Feedback Distillation checkpoint (the paper's best setting) is
``pydistill train grpo --init-from <fd run folder>``.

Feedback failures and timeouts never stop a run: they are counted (``feedback/failures``,
``feedback/timeouts`` per step) and logged, and an attempt without feedback (a failure, a timeout, or a source
with nothing to say) gets the teacher context without a feedback section — the student prompt itself, or
the prompt plus the sibling when there is one — so it is distilled toward the EMA teacher's plain view.
"""
from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..feedback import (AttemptNumbersWithheld, FeedbackStats, LeanFeedback, ModelFeedback, ReferenceSolutionFeedback,
                        VerifierFeedback, collect_feedback)
from ..losses import blended_loss, distillation_loss
from ..prompts import feedback_teacher_messages, render
from ..token_stats import token_stats
from .config import check_divergence
from .contexts import build_context_batch, lm_head_bias, lm_head_weight, response_hidden_states
from .fields import Literal, option
from .groups import sample_groups
from .grpo import GRPOConfig, GRPOTrainer
from .rollout import HFRolloutEngine, SamplingSettings

FEEDBACK_SOURCES = ("verifier", "critic", "lean")
FEEDBACK_CONTENTS = ("full", "corrections", "no_attempt_numbers", "reference_solution")
logger = logging.getLogger(__name__)


@dataclass
class FDConfig(GRPOConfig):
    """GRPO's options (they drive the GRPO half of a blend) plus Feedback Distillation's own.

    ``num_generations`` = 8 trajectories per prompt, as GRPO: diversity is measured within a group, a sibling
    is looked for in it, and the blend's GRPO term needs group advantages; it also keeps FD and GRPO runs at
    the same rollout cost per step. ``ema_rate`` = 0.01: teacher <- 0.99 teacher + 0.01 student after every
    optimizer step, a half-life of ~69 steps, so within a 100-step run the teacher trails the student
    smoothly instead of staying at the initial weights (0.001) or chasing every step (1.0 = live).
    ``jsd_beta`` is the JSD interpolation (``beta`` stays GRPO's KL coefficient, which must be 0 here: the
    teacher is the EMA, not a reference model).
    """

    num_generations: int = 8
    feedback: Literal["verifier", "critic", "lean"] = option(
        "verifier", "feedback source: the step verifier, a critic model or the Lean compiler")
    # What of the feedback the teacher reads: "full" as the source wrote it; "corrections" (verifier only) the
    # right value of every error and none of the attempt's numbers (the wrong step corrected, the right final
    # answer); "no_attempt_numbers" without any number the attempt introduced (the verifier then states only
    # the corrected step, other sources are redacted); "reference_solution": the task's reference solution
    # replaces the source's feedback (OPSD's privileged text in FD's teacher context).
    feedback_content: Literal["full", "corrections", "no_attempt_numbers", "reference_solution"] = option(
        "full", "what of the feedback the teacher reads: full, corrections (verifier: right values only), "
        "no_attempt_numbers or reference_solution")
    critic_model: Optional[str] = option(None, "a second HF model (name/path) as critic; None: the student itself")
    critic_temperature: float = option(0.3, "the critic samples at a low temperature")
    critic_max_new_tokens: int = 128
    lean_command: Optional[str] = option(None, "e.g. 'lake env lean' or a path; None: `lean` on PATH, else `lake env "
                                               "lean`")
    lean_header: str = option("", "prepended to every attempt, e.g. 'import Mathlib'")
    lean_timeout: float = option(60.0, "seconds per compile (wall clock and CPU time; the process group is killed)")
    lean_memory_mb: int = option(32768, "address-space limit of the Lean process (Mathlib maps its .olean files)")
    teacher: Literal["ema", "fixed", "live"] = option("ema", "ema | fixed (initial weights) | live (the current "
                                                             "student)")
    ema_rate: float = 0.01
    include_sibling: bool = option(False, "add a correct attempt from the same group to the teacher context")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = option("forward_kl", "the divergence distilled")
    jsd_beta: float = option(0.5, "JSD interpolation (0: forward KL, 1: reverse KL)")
    clip: Optional[float] = option(None, "pointwise clip tau on each vocabulary entry's divergence term; None "
                                         "disables")
    importance_clip: Optional[float] = option(None, "weight tokens by min(pi(y) / q_T(y), c), q_T: the sampling "
                                                    "policy")
    distillation_weight: float = option(1.0, "1: pure FD; < 1: w * FD + (1 - w) * GRPO in one pass")
    eval_samples: int = option(8, "sampled completions per held-out problem: eval/pass@{1,2,4,8}")
    output_dir: str = "runs/fd"

    def validate(self):
        super().validate()
        if self.feedback not in FEEDBACK_SOURCES:
            raise ValueError(f"feedback must be one of {FEEDBACK_SOURCES}, got {self.feedback!r}")
        if self.feedback_content not in FEEDBACK_CONTENTS:
            raise ValueError(f"feedback_content must be one of {FEEDBACK_CONTENTS}, got {self.feedback_content!r}")
        if self.feedback_content == "corrections" and self.feedback != "verifier":
            raise ValueError(f"feedback_content 'corrections' needs feedback='verifier' (only the verifier knows the "
                             f"right values), got feedback={self.feedback!r}")
        if self.critic_model is not None and self.feedback != "critic":
            raise ValueError(f"critic_model is only used with feedback='critic', got feedback={self.feedback!r}")
        if not self.critic_temperature > 0:
            raise ValueError(f"critic_temperature must be > 0, got {self.critic_temperature}")
        if not isinstance(self.critic_max_new_tokens, int) or self.critic_max_new_tokens < 1:
            raise ValueError(f"critic_max_new_tokens must be a positive integer, got {self.critic_max_new_tokens!r}")
        if not self.lean_timeout > 0:
            raise ValueError(f"lean_timeout must be > 0 seconds, got {self.lean_timeout}")
        check_divergence(self.divergence, self.jsd_beta, self.clip)
        if not (isinstance(self.distillation_weight, (int, float)) and 0 <= self.distillation_weight <= 1):
            raise ValueError(f"distillation_weight must be in [0, 1], got {self.distillation_weight!r}")
        if self.beta != 0:
            raise ValueError(f"beta (GRPO's KL to a reference model) must be 0 in Feedback Distillation, got "
                             f"{self.beta}: the teacher is the EMA of the student, not a reference model")
        if self.importance_clip is not None:
            if not self.importance_clip > 0:
                raise ValueError(f"importance_clip must be > 0 or None, got {self.importance_clip}")
            if self.distillation_weight != 1:
                raise ValueError("importance_clip applies to pure Feedback Distillation (distillation_weight = 1)")
            if self.top_p != 1 or self.top_k != 0:
                raise ValueError("importance_clip needs untruncated sampling (top_p = 1, top_k = 0): the sampling "
                                 "probability q_T(y) is only computed for a plain temperature")
        if self.distillation_weight < 1:
            if self.loss_type not in ("dapo", "bnpo"):
                raise ValueError(f"loss_type must be 'dapo' or 'bnpo' when distillation_weight < 1 (both terms "
                                 f"are normalized by the global token count in one pass), got {self.loss_type!r}")
            if self.entropy_coef != 0:
                raise ValueError(f"entropy_coef must be 0 when distillation_weight < 1, got {self.entropy_coef}")
        if (self.distillation_weight < 1 or self.include_sibling) and self.num_generations < 2:
            raise ValueError(f"group size (num_generations) must be >= 2 for the GRPO blend or include_sibling, "
                             f"got {self.num_generations}")
        return self


class FDTrainer(GRPOTrainer):
    method = "fd"

    @property
    def supports_sharded_parameters(self) -> bool:
        # a critic retries failed items one by one: a data-dependent number of generate calls per process
        return self.config.feedback != "critic"

    def __init__(self, config: FDConfig, *args, feedback_source: Optional[Callable] = None, **kwargs):
        """``feedback_source``: any callable ``(prompt, attempt, reference) -> str | None`` (optionally with a
        ``batch(items)`` method) that replaces the configured one."""
        config.validate()
        self.feedback_source = feedback_source
        lean = config.feedback == "lean" and config.feedback_content != "reference_solution"
        if feedback_source is None and lean:
            # Before any model is loaded: no Lean binary fails at start-up with a message that says so.
            command = shlex.split(config.lean_command) if config.lean_command else None
            self.feedback_source = LeanFeedback(command=command, timeout=config.lean_timeout,
                                                header=config.lean_header, memory_mb=config.lean_memory_mb)
        super().__init__(config, *args, **kwargs)
        content = config.feedback_content
        if content == "reference_solution":  # replaces any source: the teacher reads the reference instead
            self.feedback_source = ReferenceSolutionFeedback({p.question: p.solution for p in self.train_pool})
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
            from ..models import load_model

            critic, tokenizer = load_model(cfg.critic_model, device=self.accelerator.device)
            critic.eval()
            engine = HFRolloutEngine(critic, tokenizer, batch_size=cfg.micro_batch_size * cfg.num_generations)
        settings = SamplingSettings(cfg.critic_max_new_tokens, cfg.critic_temperature, n=1)
        return ModelFeedback(lambda prompts: engine.sample(prompts, settings).texts,
                             render=lambda text: render(tokenizer, [{"role": "user", "content": text}]))

    def uses_teacher(self) -> bool:
        return True

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
        teacher_ids = [tok(render(tok, feedback_teacher_messages(p.question, f, s)), add_special_tokens=False)
                       ["input_ids"] for p, f, s in zip(batch.problems, feedback, siblings)]
        teacher = build_context_batch(teacher_ids, batch.rollouts.completion_ids, tok.pad_token_id,
                                      self.accelerator.device)
        tokens = int(batch.student.completion_mask.sum())
        return dict(groups=batch, teacher=teacher, feedback=feedback, feedback_stats=stats, tokens=tokens,
                    generated_tokens=tokens, teacher_prompt_tokens=sum(map(len, teacher_ids)) / len(teacher_ids),
                    sibling_share=sum(s is not None for s in siblings) / len(siblings))

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
            p["metrics"].update(teacher_prompt_tokens=p["teacher_prompt_tokens"], sibling_share=p["sibling_share"])

    # ----- the loss ----------------------------------------------------------------------------------------
    def trained_mask(self, prepared: dict) -> torch.Tensor:
        """Every completion token: the distillation term has a loss on zero-advantage rollouts too."""
        if self.config.distillation_weight > 0:
            return prepared["groups"].student.completion_mask
        return super().trained_mask(prepared)

    def sampling_logp(self, hidden: torch.Tensor, student) -> torch.Tensor:
        """log q_T(y_t) [B, T]: the sampled tokens under the student at the sampling temperature (the policy
        the rollouts came from), for the importance weight min(pi(y_t) / q_T(y_t), importance_clip)."""
        with torch.no_grad():
            b, t, width = hidden.shape
            mask = student.completion_mask
            targets = torch.where(mask, student.targets, torch.full_like(student.targets, -100)).reshape(-1)
            return token_stats(hidden.detach().reshape(b * t, width), lm_head_weight(self.model), targets=targets,
                               bias=lm_head_bias(self.model), temperature=self.config.temperature,
                               mask=mask.reshape(-1), impl=self.config.impl).logp.reshape(b, t)

    def loss(self, prepared: dict, num_items_in_batch: float):
        cfg = self.config
        student, teacher = prepared["groups"].student, prepared["teacher"]
        hidden = response_hidden_states(self.policy, student)
        teacher_hidden = self.teacher.hidden_states(teacher)
        teacher_weight = self.teacher.lm_head_weight()
        teacher_bias = lm_head_bias(self.teacher.copy) if teacher_weight is not None else None
        distill = dict(teacher_weight=teacher_weight, teacher_bias=teacher_bias, divergence=cfg.divergence,
                       beta=cfg.jsd_beta, clip=cfg.clip)
        if cfg.distillation_weight == 1:
            old_logp = self.sampling_logp(hidden, student) if cfg.importance_clip else None
            return distillation_loss(hidden, lm_head_weight(self.model), teacher_hidden, student.completion_mask,
                                     targets=student.targets if cfg.importance_clip else None, old_logp=old_logp,
                                     importance_clip=cfg.importance_clip, entropy_coef=cfg.entropy_coef,
                                     bias=lm_head_bias(self.model), num_items_in_batch=num_items_in_batch,
                                     impl=cfg.impl, **distill)
        options = self.policy_loss_options(prepared, num_items_in_batch)
        return blended_loss(hidden, lm_head_weight(self.model), teacher_hidden, options.pop("targets"),
                            options.pop("advantages"), options.pop("mask"),
                            distillation_weight=cfg.distillation_weight, **distill, **options)
