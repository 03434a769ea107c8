"""Feedback Distillation's options: GRPO's (for the blend) plus the feedback source, the EMA teacher and the
divergence (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..._deprecated import warn_once
from ..config import LOSS_TEMPERATURE_HELP, check_divergence, check_loss_temperature
from ..fields import Literal, option
from ..grpo.config import GRPOLoopConfig
from ..teacher import TEACHER_SERVED_MODEL_HELP, TEACHER_TOP_K_HELP, TEACHER_URL_HELP, check_served_teacher_options


@dataclass
class FDConfig(GRPOLoopConfig):
    """GRPO's options (they drive the GRPO half of a blend) plus Feedback Distillation's own.

    ``num_generations`` = 8 trajectories per prompt, as GRPO: diversity is measured within a group, a sibling
    is looked for in it, and the blend's GRPO term needs group advantages; it also keeps FD and GRPO runs at
    the same rollout cost per step. ``ema_rate`` = 0.01: teacher <- 0.99 teacher + 0.01 student after every
    optimizer step, a half-life of ~69 steps, so within a 100-step run the teacher trails the student
    smoothly instead of staying at the initial weights (0.001) or chasing every step (1.0 = live).
    ``jsd_beta`` is the JSD interpolation (``beta`` stays GRPO's KL coefficient, which must be 0 here: the
    teacher is the EMA, not a reference model). ``feedback_content`` = "corrections": the verifier's feedback
    states the right value of each error it finds (the corrected step, the right final answer) and never a
    number the attempt got wrong — measured on SmolLM2-135M, a teacher told "The final answer N is not
    correct" raises the probability of N (benchmarks/RESULTS.md, "ROSD/FD collapse: diagnosis").
    """

    num_generations: int = 8
    feedback: Literal["verifier", "critic", "lean"] = option(
        "verifier", "feedback source: the step verifier, a critic model or the Lean compiler")
    # What of the feedback the teacher reads: "full" as the source wrote it; "corrections" (the default; with a
    # critic or Lean, whose feedback has no known right values, it means "full") the
    # right value of every error and none of the attempt's numbers (the wrong step corrected, the right final
    # answer); "no_attempt_numbers" without any number the attempt introduced (the verifier then states only
    # the corrected step, other sources are redacted); "solution": the task's worked solution replaces the
    # source's feedback (OPSD's privileged text in FD's teacher context; "reference_solution" is its former name).
    feedback_content: Literal["full", "corrections", "no_attempt_numbers", "solution", "reference_solution"] = option(
        "corrections", "what of the feedback the teacher reads: full, corrections (verifier: right values only; "
        "other sources: as written), no_attempt_numbers or solution (the task's worked solution)")
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
    # "notes" (the default): measured on SmolLM2-135M, a teacher told about "a previous attempt" teaches the
    # student that frame's language and to state an answer first (RESULTS.md, "ROSD/FD collapse: diagnosis").
    teacher_frame: Literal["notes", "previous_attempt"] = option(
        "notes", "how the teacher reads the feedback: as notes on the problem (no earlier attempt mentioned), or "
                 "as what a previous attempt received")
    include_sibling: bool = option(False, "add a correct attempt from the same group to the teacher context")
    # "reverse_kl" (the default; the paper's public config uses forward KL): measured on SmolLM2-135M over 3 seeds,
    # forward KL to the flatter feedback-conditioned teacher flattened the student and cost accuracy (18.2% vs
    # 25.0%, base 23.4%; RESULTS.md, "ROSD/FD collapse: diagnosis").
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = option("reverse_kl", "the divergence distilled")
    jsd_beta: float = option(0.5, "JSD interpolation (0: forward KL, 1: reverse KL)")
    # < 1 sharpens the teacher, as self-distillation methods (DINO) do so that a student does not flatten toward a
    # teacher less certain than itself (FD's feedback-conditioned teacher is, on SmolLM2-135M). Measured there:
    # tau 0.7 / 0.5 lowered the policy's entropy to 1.09 / 0.68 and gained no accuracy (20.3% / 7.8%, base 23.4%),
    # so the default stays 1 (RESULTS.md, "Feedback Distillation: more updates, and a sharper teacher").
    loss_temperature: Optional[float] = option(None, LOSS_TEMPERATURE_HELP)
    teacher_temperature: float = option(1.0, "the teacher's logits (softcapped, if the model caps them) are divided "
                                             "by this before the divergence (< 1: a sharper teacher)")
    clip: Optional[float] = option(None, "pointwise clip tau on each vocabulary entry's divergence term; None "
                                         "disables")
    importance_clip: Optional[float] = option(None, "weight tokens by min(pi(y) / q_T(y), c), q_T: the sampling "
                                                    "policy")
    distillation_weight: float = option(1.0, "1: pure FD; < 1: w * FD + (1 - w) * GRPO in one pass")
    # the feedback-conditioned context scored by a server (a fixed teacher: not FD's default EMA)
    teacher_url: Optional[str] = option(None, TEACHER_URL_HELP)
    teacher_top_k: int = option(20, TEACHER_TOP_K_HELP)
    teacher_served_model: Optional[str] = option(None, TEACHER_SERVED_MODEL_HELP)
    eval_samples: int = option(8, "sampled completions per held-out problem: eval/pass@{1,2,4,8}")
    output_dir: str = "runs/fd"

    def validate(self):
        super().validate()
        if self.feedback_content == "reference_solution":  # "reference" means the KL's reference model only
            warn_once("feedback_content='reference_solution'", "feedback_content='solution'")
            self.feedback_content = "solution"
        if self.critic_model is not None and self.feedback != "critic":
            raise ValueError(f"critic_model is only used with feedback='critic', got feedback={self.feedback!r}")
        if not self.critic_temperature > 0:
            raise ValueError(f"critic_temperature must be > 0, got {self.critic_temperature}")
        if not isinstance(self.critic_max_new_tokens, int) or self.critic_max_new_tokens < 1:
            raise ValueError(f"critic_max_new_tokens must be a positive integer, got {self.critic_max_new_tokens!r}")
        if not self.lean_timeout > 0:
            raise ValueError(f"lean_timeout must be > 0 seconds, got {self.lean_timeout}")
        check_divergence(self.divergence, self.jsd_beta, self.clip)
        check_loss_temperature(self.loss_temperature)
        check_served_teacher_options(self)
        if not self.teacher_temperature > 0:
            raise ValueError(f"teacher_temperature must be > 0, got {self.teacher_temperature}")
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
