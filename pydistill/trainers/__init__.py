"""Trainers: one package per method — its ``config``, its ``trainer`` and its own parts (ROSD's reflection, Feedback
Distillation's feedback sources, ExGRPO's Explanatory Inversion, procedural teacher and dialogues) — over the
shared core of this package's modules: the loop (:mod:`.core`), its configuration, checkpoints, accelerate
setup, contexts, rollouts, teachers, groups and run folder."""
from .config import TrainConfig
from .core import Trainer
from .exgrpo import ExGRPOConfig, ExGRPOTrainer
from .fd import FDConfig, FDTrainer
from .grpo import RENAMED, GRPOLoopConfig, GRPOLoopTrainer
from .opsd import OPSDConfig, OPSDTrainer
from .rosd import ROSDConfig, ROSDTrainer
from .sft import SFTConfig, SFTTrainer

TRAINERS = {
    "exgrpo": (ExGRPOConfig, ExGRPOTrainer),
    "fd": (FDConfig, FDTrainer),
    "grpo": (GRPOLoopConfig, GRPOLoopTrainer),
    "opsd": (OPSDConfig, OPSDTrainer),
    "rosd": (ROSDConfig, ROSDTrainer),
    "sft": (SFTConfig, SFTTrainer),
}

__all__ = ["ExGRPOConfig", "ExGRPOTrainer", "FDConfig", "FDTrainer", "GRPOLoopConfig", "GRPOLoopTrainer", "OPSDConfig",
           "OPSDTrainer", "ROSDConfig", "ROSDTrainer", "SFTConfig",
           "SFTTrainer", "TRAINERS", "TrainConfig", "Trainer"]


def __getattr__(name):
    from .._deprecated import renamed

    return renamed(__name__, name, RENAMED, globals())
