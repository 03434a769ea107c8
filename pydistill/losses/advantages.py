"""Group-relative advantages from scalar rewards."""
from __future__ import annotations

from typing import NamedTuple

import torch

SCALINGS = ("group", "batch", "none")


class GroupAdvantages(NamedTuple):
    advantages: torch.Tensor  # [B*G] float32
    zero_spread_fraction: float  # share of groups whose valid rewards are all equal (no learning signal)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scaling: str = "group",
                     eps: float = 1e-4) -> GroupAdvantages:
    """A = r - mean_group(r), divided by (std + eps): the group's std for ``"group"``, the whole batch's for
    ``"batch"``, no division for ``"none"`` (Dr. GRPO). Std is the unbiased sample std, as in TRL.

    ``rewards`` is [B*G] with the G completions of each prompt adjacent. A non-finite reward (NaN, inf) marks an
    unscorable completion: it is left out of the statistics and gets advantage 0 (TRL's NaN convention; an
    inf would otherwise turn every advantage of its group into NaN). A group with fewer than two scorable rewards, or
    with all of them equal, has zero spread: its advantages are 0 and it counts in ``zero_spread_fraction``.
    Broadcast to tokens with ``advantages[:, None]`` or pass the [B*G] tensor to the losses directly.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B*G], got "
                         f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:  # True is an int
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"group_size {group_size} must divide the number of rewards {rewards.shape[0]}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and 0 <= eps < float("inf")):
        raise ValueError(f"eps must be >= 0, got {eps}")
    if rewards.numel() == 0:
        return GroupAdvantages(torch.zeros(0, dtype=torch.float32, device=rewards.device), 0.0)
    r = rewards.to(torch.float64).reshape(-1, group_size)
    valid = torch.isfinite(r)
    r = torch.where(valid, r, torch.zeros_like(r))
    count = valid.sum(dim=1, keepdim=True)
    filled = torch.where(valid, r, torch.zeros_like(r))
    mean = filled.sum(dim=1, keepdim=True) / count.clamp_min(1)
    centered = torch.where(valid, r - mean, torch.zeros_like(r))
    group_std = (centered.pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp_min(1)).sqrt()
    zero_spread = (count < 2) | (centered.abs().amax(dim=1, keepdim=True) == 0)
    if scaling == "group":
        advantages = centered / (group_std + eps)
    elif scaling == "batch":
        flat = r[valid]
        batch_std = flat.std() if flat.numel() > 1 else torch.zeros((), dtype=r.dtype)
        advantages = centered / (batch_std + eps)
    else:
        advantages = centered
    advantages = torch.where(zero_spread, torch.zeros_like(advantages), advantages)
    advantages = torch.where(valid, advantages, torch.zeros_like(advantages))
    return GroupAdvantages(advantages.reshape(-1).to(torch.float32), float(zero_spread.float().mean()))
