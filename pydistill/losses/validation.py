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
    if hidden.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a shape without data): materialize the model's weights "
                         "(e.g. load them, or call to_empty() and initialize) before computing a loss")
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
        return check_finite(name, value).reshape(b, 1).expand(b, t)
    if tuple(value.shape) == (b, t):
        return check_finite(name, value)
    if value.dim() == 1 and value.shape[0] == b * t:
        return check_finite(name, value).reshape(b, t)
    expected = f"[B]=[{b}], [B, T]=[{b}, {t}] or [B*T]=[{b * t}]" if allow_sequence else \
        f"[B, T]=[{b}, {t}] or [B*T]=[{b * t}]"
    raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")


def check_finite(name: str, value: torch.Tensor) -> torch.Tensor:
    """A floating tensor input must hold no NaN or inf: it would make the loss NaN without an error. (One
    device sync per call; integer tensors such as token ids are not checked.)"""
    if value.is_floating_point() and value.device.type != "meta" and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or inf); mask or replace them (e.g. "
                         "advantage 0 for an unscorable completion)")
    return value


def _number(value) -> bool:
    # bool is an int subclass: beta=True must not pass as 1
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_nonnegative(name: str, value: Optional[float], *, optional: bool = True):
    """``optional=False``: None is refused too (e.g. epsilon_low=None failed later as a TypeError)."""
    if (value is not None or not optional) and not (_number(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, value: Optional[float]):
    if value is not None and not (_number(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_vocab_weight(weight, name: str = "weight"):
    """V >= 1 rows: the core op checks the rest of [V, H] but divides by V when planning its chunks."""
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == 0:
        raise ValueError(f"{name} must have shape [V, H] with V >= 1 (the vocabulary), got {tuple(weight.shape)}")


def check_unit(name: str, value: float):
    """A number in [0, 1] (not a bool)."""
    if not (_number(value) and 0 <= value <= 1):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
