"""Reward functions for the policy-gradient trainers, as plain callables.

A reward function maps a batch to one float per completion (``nan`` or ``None`` where it cannot score, which
the group advantages turn into advantage 0). Two signatures are accepted, told apart by
:func:`is_trl_signature`:

- TRL's ``reward(prompts, completions, **kwargs) -> list[float]``: ``prompts`` are the problems' prompts
  (the dataset's prompt value, or the question of a built-in task), ``completions`` the completion texts, and
  the keyword arguments are, as TRL passes them, the dataset's other columns (one list entry per completion;
  for the built-in tasks ``answer`` and ``solution``) plus ``completion_ids`` (token ids of each completion);
  a function without ``**kwargs`` receives only the ones it names;
- pydistill's ``reward(problems, completions) -> list[float]`` over :class:`pydistill.tasks.Problem` objects.

:func:`combine_rewards` weights several of them, TRL style. :func:`dialogue_structure_bonus` is ExGRPO's DSU
bonus.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Callable, Optional, Sequence

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


def is_trl_signature(function) -> bool:
    """True when ``function`` takes TRL's ``(prompts, completions, **kwargs)``: it accepts ``**kwargs``, or its
    first parameter is named ``prompts``. Anything else is called as ``(problems, completions)``."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the pydistill form
        return False
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return bool(positional) and positional[0].name == "prompts"


def trl_reward_kwargs(problems: Sequence, completion_ids: Optional[Sequence] = None) -> dict:
    """TRL's reward keyword arguments for a batch: every column of a dataset problem except its prompt (for
    built-in tasks: ``answer`` and ``solution``), one entry per completion, and ``completion_ids`` if given."""
    rows = []
    for p in problems:
        columns = p.meta.get("columns")
        if columns is None:
            rows.append(dict(answer=p.answer, solution=p.solution))
        else:
            rows.append({k: v for k, v in columns.items() if k != p.meta.get("prompt_column")})
    keys = [k for k in rows[0]] if rows else []
    kwargs = {k: [row.get(k) for row in rows] for k in keys}
    if completion_ids is not None:
        kwargs["completion_ids"] = [list(ids) for ids in completion_ids]
    return kwargs


def trl_prompts(problems: Sequence) -> list:
    """Each problem's prompt as its dataset holds it (string or chat messages); a built-in task's question."""
    out = []
    for p in problems:
        columns, column = p.meta.get("columns"), p.meta.get("prompt_column")
        out.append(columns[column] if columns is not None and column in columns else p.question)
    return out


def _accepted_keywords(function):
    """None when ``function`` takes ``**kwargs`` (it gets every column), else the names it declares."""
    params = inspect.signature(function).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _call(function, trl: bool, problems, completions, completion_ids):
    if trl:
        kwargs = trl_reward_kwargs(problems, completion_ids)
        accepted = _accepted_keywords(function)
        if accepted is not None:  # e.g. (prompts, completions, answer): only the columns it names
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        values = function(prompts=trl_prompts(problems), completions=list(completions), **kwargs)
    else:
        values = function(problems, completions)
    # TRL's convention: None where a function does not apply -> nan (advantage 0) here.
    return [math.nan if v is None else float(v) for v in values]


def combine_rewards(functions: Sequence[RewardFunction], weights: Sequence[float] | None = None, health=None):
    """One reward function: the weighted sum of ``functions`` (a nan anywhere makes that completion nan).

    Each function may take TRL's or pydistill's signature (see the module docstring). The combined function
    is called as ``combined(problems, completions, completion_ids=None)`` and returns (values, columns).
    ``health`` (a trainer's :class:`pydistill.trainers.groups.RewardHealth`) makes every call total: failures and
    non-finite values become nan and are counted. Returns (combined function, names) so that trainers can log
    each component.
    """
    if not functions:
        raise ValueError("reward functions must name at least one function")
    weights = list(weights) if weights is not None else [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ValueError(f"reward weights must have one entry per function ({len(functions)}), got {len(weights)}")
    names = [getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(functions)]
    trl = [is_trl_signature(f) for f in functions]

    def combined(problems, completions, completion_ids=None):
        calls = [lambda f=f, t=t: _call(f, t, problems, completions, completion_ids) for f, t in zip(functions, trl)]
        if health is not None:
            columns = [health.run(name, call, completions) for name, call in zip(names, calls)]
        else:
            columns = [call() for call in calls]
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
