"""The result type every loss returns."""
from __future__ import annotations

from typing import NamedTuple

import torch


class LossOutput(NamedTuple):
    """``loss``: the scalar to backpropagate. ``metrics``: detached floats for logging. ``per_token``: detached
    [B, T] tensors (zeros outside the mask), e.g. for scattering back to sequences in logs."""

    loss: torch.Tensor
    metrics: dict
    per_token: dict


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    count = int(mask.sum())
    return float(torch.where(mask, values, torch.zeros_like(values)).sum() / count) if count else 0.0
