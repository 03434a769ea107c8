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
    # A teacher served elsewhere (vLLM, or any server answering OpenAI-style completions with prompt_logprobs):
    # it scores each rollout under the teacher context (the reference solution) and the divergence runs over its
    # top-k tokens plus a tail bucket. Its model is whatever the server holds, so `teacher` (fixed/ema/live) and
    # the teacher head do not apply.
    teacher_url: Optional[str] = option(None, "a teacher on a vLLM-compatible server (http://host:port): its "
                                              "top-k log-probs replace the local teacher")
    teacher_top_k: int = option(20, "with teacher_url: the teacher's top-k tokens per position (plus a tail)")
    teacher_served_model: Optional[str] = option(None, "with teacher_url: the served model's name (default: the "
                                                       "server's first)")
    output_dir: str = "runs/opsd"

    def validate(self):
        super().validate()
        check_divergence(self.divergence, self.beta, self.clip)
        check_loss_temperature(self.loss_temperature)
        if self.teacher_url is not None:
            if not (isinstance(self.teacher_url, str) and self.teacher_url.startswith(("http://", "https://"))):
                raise ValueError(f"teacher_url must be an http:// or https:// address, got {self.teacher_url!r}")
            if self.sampled_token:
                raise ValueError("teacher_url gives the teacher's top-k distribution; sampled_token needs its "
                                 "log-prob of each sampled token: use one or the other")
        if isinstance(self.teacher_top_k, bool) or not isinstance(self.teacher_top_k, int) or self.teacher_top_k < 1:
            raise ValueError(f"teacher_top_k must be an integer >= 1, got {self.teacher_top_k!r}")
        return self
