"""The SFT baseline's options: the core's, with its own learning rate and run folder."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig


@dataclass
class SFTConfig(TrainConfig):
    learning_rate: float = 1e-4
    output_dir: str = "runs/sft"
