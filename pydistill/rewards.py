"""Reward functions for the policy-gradient trainers, as plain callables.

A reward function maps a batch to one float per completion (``nan`` where it cannot score, which the group
advantages turn into advantage 0): ``reward(problems, completions) -> list[float]``. :func:`combine_rewards`
weights several of them, TRL style. :func:`dialogue_structure_bonus` is ExGRPO's DSU bonus.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch

RewardFunction = Callable[[Sequence, Sequence[str]], list]


class AccuracyReward:
    """1.0 when the task's verifier accepts the completion's final answer, else 0.0."""

    __name__ = "accuracy"

    def __init__(self, task):
        self.task = task

    def __call__(self, problems, completions) -> list:
        return [float(self.task.is_correct(p, c)) for p, c in zip(problems, completions)]


_BOXED = re.compile(r"\\boxed\{[^{}]+\}")


def format_reward(problems, completions) -> list:
    """1.0 when the completion states exactly one final answer in \\boxed{...}, else 0.0."""
    return [float(len(_BOXED.findall(c)) == 1) for c in completions]


format_reward.__name__ = "format"


def combine_rewards(functions: Sequence[RewardFunction], weights: Sequence[float] | None = None):
    """One reward function: the weighted sum of ``functions`` (a nan anywhere makes that completion nan).

    Returns (combined function, names) so that trainers can log each component.
    """
    if not functions:
        raise ValueError("reward functions must name at least one function")
    weights = list(weights) if weights is not None else [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ValueError(f"reward weights must have one entry per function ({len(functions)}), got {len(weights)}")
    names = [getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(functions)]

    def combined(problems, completions):
        columns = [f(problems, completions) for f in functions]
        for name, column in zip(names, columns):
            if len(column) != len(completions):
                raise ValueError(f"reward function {name} returned {len(column)} values for {len(completions)} "
                                 "completions")
        return [sum(w * c[i] for w, c in zip(weights, columns)) for i in range(len(completions))], columns

    return combined, names


def dialogue_structure_bonus(full_rewards: torch.Tensor, partial_rewards: torch.Tensor, *, delta: float,
                             nu: float) -> torch.Tensor:
    """ExGRPO's Dialogue Structure Utility bonus, per scenario-A rollout.

    Args:
        full_rewards: [Q, G] outcome rewards (0/1) of scenario A rollouts (all k probes, then the question).
        partial_rewards: [Q, G'] outcome rewards of scenario B rollouts (the first k' < k probes).
        delta: the bonus (>= 0) added to each successful scenario-A rollout of a question whose full-dialogue
            success rate P_full exceeds ``nu`` times the partial one P_partial.
        nu: the margin factor (>= 0).

    Returns:
        [Q, G] bonus: delta where (P_full > nu * P_partial) and the rollout succeeded, else 0.
    """
    if full_rewards.dim() != 2 or partial_rewards.dim() != 2 or full_rewards.shape[0] != partial_rewards.shape[0]:
        raise ValueError(f"full_rewards [Q, G] and partial_rewards [Q, G'] must share Q, got "
                         f"{tuple(full_rewards.shape)} and {tuple(partial_rewards.shape)}")
    if not (delta >= 0 and math.isfinite(delta)):
        raise ValueError(f"delta must be a finite number >= 0, got {delta}")
    if not (nu >= 0 and math.isfinite(nu)):
        raise ValueError(f"nu must be a finite number >= 0, got {nu}")
    p_full = full_rewards.float().mean(dim=1, keepdim=True)
    p_partial = partial_rewards.float().mean(dim=1, keepdim=True)
    earns = (p_full > nu * p_partial) & (full_rewards > 0)
    return earns.to(full_rewards.dtype if full_rewards.is_floating_point() else torch.float32) * delta
