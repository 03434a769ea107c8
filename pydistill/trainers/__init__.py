"""Trainers over a shared rollout / teacher / step core (see :mod:`pydistill.trainers.core`)."""
from .config import TrainConfig
from .core import Trainer
from .opsd import OPSDConfig, OPSDTrainer

TRAINERS = {"opsd": (OPSDConfig, OPSDTrainer)}

__all__ = ["OPSDConfig", "OPSDTrainer", "TRAINERS", "TrainConfig", "Trainer"]
