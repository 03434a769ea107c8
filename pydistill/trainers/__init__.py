"""Trainers over a shared rollout / teacher / step core (see :mod:`pydistill.trainers.core`)."""
from .config import TrainConfig
from .core import Trainer
from .exgrpo import ExGRPOConfig, ExGRPOTrainer
from .fd import FDConfig, FDTrainer
from .grpo import GRPOConfig, GRPOTrainer
from .opsd import OPSDConfig, OPSDTrainer
from .rosd import ROSDConfig, ROSDTrainer
from .sft import SFTConfig, SFTTrainer

TRAINERS = {
    "exgrpo": (ExGRPOConfig, ExGRPOTrainer),
    "fd": (FDConfig, FDTrainer),
    "grpo": (GRPOConfig, GRPOTrainer),
    "opsd": (OPSDConfig, OPSDTrainer),
    "rosd": (ROSDConfig, ROSDTrainer),
    "sft": (SFTConfig, SFTTrainer),
}

__all__ = ["ExGRPOConfig", "ExGRPOTrainer", "FDConfig", "FDTrainer", "GRPOConfig", "GRPOTrainer", "OPSDConfig",
           "OPSDTrainer", "ROSDConfig", "ROSDTrainer", "SFTConfig",
           "SFTTrainer", "TRAINERS", "TrainConfig", "Trainer"]
