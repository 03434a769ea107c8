"""Shape checks shared by the losses: clear errors naming the argument."""
from __future__ import annotations

import math
from typing import Optional

import torch


def check_sequence_layout(hidden: torch.Tensor, mask: Optional[torch.Tensor], name: str = "hidden"):
    """``hidden`` must be [B, T, H]; ``mask`` (if given) [B, T]. Returns (B, T) and a bool mask."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"{name} must be [B, T, H] (batch, completion tokens, hidden size), got {shape}")
    b, t = hidden.shape[:2]
    if mask is None:
        return b, t, torch.ones(b, t, dtype=torch.bool, device=hidden.device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, t):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must have shape [B, T]=[{b}, {t}] like {name}, got {shape}")
    return b, t, mask.to(device=hidden.device) != 0


def check_per_token(name: str, value: Optional[torch.Tensor], b: int, t: int, *, allow_sequence: bool = False):
    """A per-token tensor [B, T] (or, with ``allow_sequence``, per-sequence [B]); flat [B*T] is accepted."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    if allow_sequence and tuple(value.shape) == (b,):
        return value.reshape(b, 1).expand(b, t)
    if tuple(value.shape) == (b, t):
        return value
    if value.dim() == 1 and value.shape[0] == b * t:
        return value.reshape(b, t)
    expected = f"[B]=[{b}], [B, T]=[{b}, {t}] or [B*T]=[{b * t}]" if allow_sequence else \
        f"[B, T]=[{b}, {t}] or [B*T]=[{b * t}]"
    raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")


def check_nonnegative(name: str, value: Optional[float]):
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, value: Optional[float]):
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
