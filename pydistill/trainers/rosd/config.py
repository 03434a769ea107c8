"""ROSD's options: the paper's defaults, and the diagnosis switches (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..._deprecated import warn_once
from ..config import LOSS_TEMPERATURE_HELP, TrainConfig, check_divergence, check_loss_temperature
from ..fields import Literal, option
from ..teacher import TEACHER_SERVED_MODEL_HELP, TEACHER_TOP_K_HELP, TEACHER_URL_HELP, check_served_teacher_options


@dataclass
class ROSDConfig(TrainConfig):
    num_generations: int = 8
    temperature: float = 1.0
    learning_rate: float = 1e-5
    warmup_steps: int = 10
    teacher: str = "fixed"
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = option("jsd", "the divergence distilled")
    beta: float = option(0.5, "JSD interpolation (0: forward KL, 1: reverse KL)")
    clip: Optional[float] = option(None, "optional pointwise clip tau (OPSD's); ROSD uses none")
    loss_temperature: Optional[float] = option(None, LOSS_TEMPERATURE_HELP)
    # cap on the detached per-token importance ratio exp(logp - logp_old); None disables. One update per batch of
    # fresh rollouts makes logp_old = logp (weight 1) here; the cap matters for off-policy or stale rollouts.
    importance_clip: Optional[float] = option(2.0, "cap on the detached per-token importance ratio; None disables")
    drop_zero_spread: bool = option(True, "drop groups whose rollouts are all correct (all-wrong ones are always "
                                          "skipped)")
    reflector: Literal["step_check", "model"] = option(
        "step_check", "first-error locator: the task step checker or the model")
    reflection_temperature: float = option(0.6, "sampling temperature of the model reflector")
    reflection_max_new_tokens: int = 256
    # ``privileged``: what the teacher (and a model reflector) is shown as the correct solution: the paper's
    # correct sibling rollout ("sibling"), a correct sibling that derives the answer in checked arithmetic, else
    # the worked solution ("derived_sibling"), or the task's worked solution ("solution", OPSD's privileged
    # text; "reference" is its former name). The group selection is the same for all three: only the teacher's
    # text differs.
    privileged: Literal["sibling", "derived_sibling", "solution", "reference"] = option(
        "sibling", "the correct solution the teacher is shown: sibling | derived_sibling (a sibling that shows "
                   "its arithmetic, else the worked solution) | solution (the task's worked solution)")
    explanation: bool = option(True, "put the reflection's explanation in the teacher context")
    distill_correct_rollouts: bool = option(True, "distill correct rollouts too (the authors' default)")
    loss_span: Literal["suffix", "whole"] = option(
        "suffix", "distilled tokens: suffix (from the first error on; correct rollouts whole) or the whole rollout")
    support_topk: Optional[int] = option(
        None, "distil over the student's k most likely tokens plus a tail bucket (the original code: 100); "
              "None: the full vocabulary")
    # the teacher context (sibling / reference and reflection) scored by a server instead of the local teacher
    teacher_url: Optional[str] = option(None, TEACHER_URL_HELP)
    teacher_top_k: int = option(20, TEACHER_TOP_K_HELP)
    teacher_served_model: Optional[str] = option(None, TEACHER_SERVED_MODEL_HELP)
    output_dir: str = "runs/rosd"

    def validate(self):
        super().validate()
        if self.privileged == "reference":  # "reference" means the KL's reference model only
            warn_once("privileged='reference'", "privileged='solution'")
            self.privileged = "solution"
        check_divergence(self.divergence, self.beta, self.clip)
        if self.support_topk is not None and (isinstance(self.support_topk, bool) or self.support_topk < 1):
            raise ValueError(f"support_topk must be a positive integer or None, got {self.support_topk!r}")
        check_loss_temperature(self.loss_temperature)
        check_served_teacher_options(self)
        if self.teacher_url is not None and self.support_topk is not None:
            raise ValueError("support_topk (the student's top-k) and teacher_url (the served teacher's top-k) each "
                             "pick the support: use one or the other")
        if self.importance_clip is not None and not self.importance_clip > 0:
            raise ValueError(f"importance_clip must be > 0 or None, got {self.importance_clip}")
        if not self.reflection_temperature > 0:
            raise ValueError(f"reflection_temperature must be > 0, got {self.reflection_temperature}")
        if not isinstance(self.reflection_max_new_tokens, int) or self.reflection_max_new_tokens < 1:
            raise ValueError(f"reflection_max_new_tokens must be a positive integer, "
                             f"got {self.reflection_max_new_tokens!r}")
        return self
