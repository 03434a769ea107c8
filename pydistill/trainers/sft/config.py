"""The SFT baseline's options: the core's, with its own learning rate and run folder, and the optional top-k
distillation term read from a teacher cache (GKD-style distillation on fixed data)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import TrainConfig, check_divergence
from ..fields import Literal, option


@dataclass
class SFTConfig(TrainConfig):
    learning_rate: float = 1e-4
    # `pydistill teacher-cache --dataset D --response-column solution` scores D's solutions once; training on
    # the same D (`--dataset D`) then adds the divergence to that teacher on the solution tokens, row by row.
    teacher_cache: Optional[str] = option(None, "a `pydistill teacher-cache` folder scored on this run's dataset "
                                                "rows: adds the top-k distillation term on the solution tokens")
    distillation_weight: float = option(1.0, "with teacher_cache: loss = (1 - w) NLL + w divergence")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = option("jsd", "with teacher_cache: the divergence "
                                                                           "distilled (GKD: jsd)")
    beta: float = option(0.5, "JSD interpolation (0: forward KL, 1: reverse KL)")
    topk_tail: bool = option(True, "with teacher_cache: a tail bucket beside the teacher's top-k (false: "
                                   "renormalized over the k)")
    output_dir: str = "runs/sft"

    def validate(self):
        super().validate()
        check_divergence(self.divergence, self.beta, None)
        if isinstance(self.distillation_weight, bool) or not isinstance(self.distillation_weight, (int, float)) \
                or not 0 <= self.distillation_weight <= 1:
            raise ValueError(f"distillation_weight must be in [0, 1], got {self.distillation_weight!r}")
        if self.teacher_cache is not None and not (isinstance(self.teacher_cache, str) and self.teacher_cache):
            raise ValueError(f"teacher_cache must be a folder written by `pydistill teacher-cache`, got "
                             f"{self.teacher_cache!r}")
        return self
