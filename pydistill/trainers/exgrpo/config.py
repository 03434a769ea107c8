"""ExGRPO's options: GRPO's, the dialogues and the DSU bonus (stage 2), Explanatory Inversion (stage 0) and the
SFT warm-up (stage 1). See the package docstring for the stages."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..fields import Literal, option
from ..grpo.config import GRPOLoopConfig
from .explanatory_inversion import EI_RULES, RULES_BY_NAME


@dataclass
class ExGRPOConfig(GRPOLoopConfig):
    """GRPO's fields (clipping, loss_type, scale_rewards, beta, ...) plus ExGRPO's. Note the names: GRPO's
    ``delta`` stays the two-sided clipping cap; the DSU bonus is ``dsu_delta``. ``teacher`` (the core's
    teacher kind) must stay "fixed": the KL reference is the policy at the start of stage 2."""

    # stage 2: dialogues and rewards
    num_generations: int = option(4, "G: dialogues per scenario and question (2G rollouts per question, one group)")
    num_probes: int = option(3, "k: probes before the question in scenario A")
    partial_probes: int = option(1, "k' < k: probes before the question in scenario B (0: the question alone)")
    dsu_delta: float = option(0.2, "DSU bonus added to successful scenario-A rollouts (>= 0)")
    dsu_nu: float = option(1.0, "the bonus applies when P_full > dsu_nu * P_partial (>= 0)")
    beta: float = option(0.04, "k3 KL to the reference (the policy at the start of stage 2)")
    sft_coef: float = option(0.1, "weight of the auxiliary SFT loss on the teacher's dialogue (0: off)")
    max_new_tokens: int = option(256, "per turn")
    batch_size: int = option(16, "questions per optimizer step")
    micro_batch_size: int = option(2, "questions per forward/backward (2G dialogues each, plus one teacher dialogue)")
    train_problems: int = option(256, "training questions given to Explanatory Inversion (before the filters)")
    # stage 0: Explanatory Inversion data
    ei_teacher: str = option("student", "'student' (the student model itself), 'procedural' (probes written by rule "
                             "for the embedded arithmetic task, no model: pydistill.trainers.exgrpo.ei_procedural) or "
                             "a Hugging Face model name/path")
    ei_cache: Optional[str] = option(None, "jsonl of every teacher/student call; None: <output_dir>/ei_cache.jsonl")
    ei_rules: str = option("all", "'all' or comma-separated rule names "
                           "(pydistill.trainers.exgrpo.explanatory_inversion.EI_RULES)")
    ei_filters: bool = option(True, "apply the EI-consistency and difficulty filters")
    min_solved_fraction: float = option(0.2, "tau_hard: drop questions whose probes the base student solves fewer of")
    ei_max_new_tokens: int = option(256, "teacher / base-student generation length in stage 0")
    ei_batch_size: int = option(16, "prompts per generate call in stage 0")
    # stage 1: SFT warm-up
    stage: Literal["both", "sft", "rl"] = option("both", "stages to run: SFT warm-up, dialogue GRPO, or both")
    sft_steps: int = 50
    sft_learning_rate: float = 1e-4
    sft_batch_size: int = option(16, "(probe, solution) examples per SFT step")
    output_dir: str = "runs/exgrpo"

    def validate(self):
        super().validate()
        if not isinstance(self.num_probes, int) or self.num_probes < 1:
            raise ValueError(f"num_probes (k) must be a positive integer, got {self.num_probes!r}")
        if not isinstance(self.partial_probes, int) or not 0 <= self.partial_probes < self.num_probes:
            raise ValueError(f"partial_probes (k') must be an integer in [0, num_probes={self.num_probes}), "
                             f"got {self.partial_probes!r}")
        for name in ("dsu_delta", "dsu_nu", "sft_coef"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.sft_steps, int) or self.sft_steps < 0:
            raise ValueError(f"sft_steps must be an integer >= 0, got {self.sft_steps!r}")
        if self.stage == "sft" and self.sft_steps == 0:
            raise ValueError("stage 'sft' needs sft_steps >= 1")
        if not self.sft_learning_rate > 0:
            raise ValueError(f"sft_learning_rate must be > 0, got {self.sft_learning_rate}")
        for name in ("sft_batch_size", "ei_max_new_tokens", "ei_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0.0 <= self.min_solved_fraction <= 1.0:
            raise ValueError(f"min_solved_fraction must be in [0, 1], got {self.min_solved_fraction}")
        if not self.ei_teacher:
            raise ValueError("ei_teacher must be 'student', 'procedural' or a model name/path")
        if self.ei_teacher == "procedural" and self.task != "arithmetic":
            raise ValueError(f"ei_teacher 'procedural' writes probes for the arithmetic task only, got task "
                             f"{self.task!r}: use 'student' or a model name/path")
        parse_rules(self.ei_rules)
        if self.teacher != "fixed":
            raise ValueError(f"teacher must be 'fixed' for ExGRPO (its KL reference is the policy at the start of "
                             f"stage 2), got {self.teacher!r}")
        return self


def parse_rules(spec: str) -> tuple:
    """EI rules from "all" or comma-separated names."""
    if spec.strip() == "all":
        return EI_RULES
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in RULES_BY_NAME]
    if unknown or not names:
        raise ValueError(f"ei_rules must be 'all' or comma-separated names from {sorted(RULES_BY_NAME)}, "
                         f"got {spec!r}")
    return tuple(RULES_BY_NAME[n] for n in names)
