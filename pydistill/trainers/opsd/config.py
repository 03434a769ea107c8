"""OPSD's options, defaulting to the paper's v3 setting (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import LOSS_TEMPERATURE_HELP, TrainConfig, check_divergence, check_loss_temperature
from ..fields import Literal, option
from ..teacher import TEACHER_SERVED_MODEL_HELP, TEACHER_TOP_K_HELP, TEACHER_URL_HELP, check_served_teacher_options


@dataclass
class OPSDConfig(TrainConfig):
    num_generations: int = 1
    temperature: float = 1.1
    top_p: float = 0.95
    top_k: int = 20
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = option("forward_kl", "the divergence distilled")
    beta: float = option(0.5, "JSD interpolation (0: forward KL, 1: reverse KL)")
    clip: Optional[float] = option(0.05, "pointwise clip tau on each vocabulary entry's term; None disables")
    loss_temperature: Optional[float] = option(None, LOSS_TEMPERATURE_HELP)
    sampled_token: bool = option(False, "the sampled-token variant: advantage = logp_teacher(y) - logp_student(y)")
    # A teacher served elsewhere (vLLM, or any server answering OpenAI-style completions with prompt_logprobs):
    # it scores each rollout under the teacher context (the reference solution) and the divergence runs over its
    # top-k tokens plus a tail bucket. Its weights are whatever the server loaded: only teacher="fixed" applies.
    teacher_url: Optional[str] = option(None, TEACHER_URL_HELP)
    teacher_top_k: int = option(20, TEACHER_TOP_K_HELP)
    teacher_served_model: Optional[str] = option(None, TEACHER_SERVED_MODEL_HELP)
    output_dir: str = "runs/opsd"

    def validate(self):
        super().validate()
        check_divergence(self.divergence, self.beta, self.clip)
        check_loss_temperature(self.loss_temperature)
        check_served_teacher_options(self)
        if self.teacher_url is not None and self.sampled_token:
            raise ValueError("teacher_url gives the teacher's top-k distribution; sampled_token needs its "
                             "log-prob of each sampled token: use one or the other")
        return self
