"""OPSD's options, defaulting to the paper's v3 setting (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import LOSS_TEMPERATURE_HELP, TrainConfig, check_divergence, check_loss_temperature
from ..fields import Literal, option


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
    output_dir: str = "runs/opsd"

    def validate(self):
        super().validate()
        check_divergence(self.divergence, self.beta, self.clip)
        check_loss_temperature(self.loss_temperature)
        return self
