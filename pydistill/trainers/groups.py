"""Group rollouts: G completions per prompt, scored by reward functions (GRPO, ROSD, Feedback Distillation)."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..losses import group_advantages
from ..prompts import render, student_messages
from ..rewards import AccuracyReward, combine_rewards, format_reward
from .contexts import ContextBatch, build_context_batch
from .rollout import Rollouts

REWARD_FUNCTIONS = {"accuracy": AccuracyReward, "format": lambda task: format_reward}


@dataclass
class GroupBatch:
    """One micro-batch of group rollouts. Rollout ``i`` belongs to prompt ``i // group_size``."""

    problems: list  # the problem of each rollout (each problem repeated G times, adjacent)
    rollouts: Rollouts
    student: ContextBatch  # student context: prompt + completion
    rewards: torch.Tensor  # [B*G] float32 combined reward (nan: unscorable)
    reward_columns: dict  # reward function name -> [B*G] list of its values
    correct: torch.Tensor  # [B*G] bool: the task's verifier accepts the completion
    group_size: int


class RewardFunctionError(RuntimeError):
    """A reward function failed more often than ``max_reward_failures`` allows."""


class RewardHealth:
    """Counts over a run's reward calls: ``failures`` (a call raised or returned something that is not one value
    per completion) and ``nonfinite`` (values that are None, nan or inf: unscorable completions, advantage 0)."""

    def __init__(self, max_failures: int):
        self.max_failures, self.failures, self.nonfinite = max_failures, 0, 0

    def as_metrics(self) -> dict:
        return {"rewards/failures_total": self.failures, "rewards/nonfinite_total": self.nonfinite}

    def run(self, name: str, call, completions) -> list:
        """``call()``'s values for ``completions``, made total: a failure (an exception, a wrong count, text
        instead of numbers) gives nan for the whole call (reported with the function's name and a sample,
        counted, and after ``max_failures`` a :class:`RewardFunctionError`); a value that is not a finite
        number gives nan and is counted."""
        try:
            values = list(call())
            if len(values) != len(completions):
                raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
            text = next((v for v in values if isinstance(v, (str, bytes))), None)
            if text is not None:  # float("1.0") would pass text off as a score: a bug in the function
                raise TypeError(f"returned text {text!r:.40} where a number (or None: unscorable) is expected")
        except Exception as exc:  # a reward function is user code: report, count, keep training
            self.failures += 1
            sample = completions[0][:200] if completions else ""
            print(f"pydistill: reward function {name!r} failed ({type(exc).__name__}: {exc}) on a batch of "
                  f"{len(completions)} completions, e.g. {sample!r}; scored as unscorable "
                  f"(failure {self.failures} of at most {self.max_failures})", file=sys.stderr)
            if self.failures >= self.max_failures:
                raise RewardFunctionError(
                    f"reward function {name!r} failed {self.failures} times (max_reward_failures "
                    f"{self.max_failures}); last: {type(exc).__name__}: {exc}; sample: {sample!r}") from exc
            return [math.nan] * len(completions)
        clean = []
        for value in values:
            number = _finite(value)
            self.nonfinite += number is None
            clean.append(math.nan if number is None else number)
        return clean


def _finite(value) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def reward_function(task, names: str, weights: Optional[str] = None, functions: Optional[Sequence] = None,
                    function_weights: Optional[Sequence[float]] = None, max_failures: int = 20):
    """The combined reward function (its ``names`` attribute lists the components, its ``health`` the
    :class:`RewardHealth` counts) from config names ("accuracy,format") and weights ("1,0.1"), or from plain
    callables ``functions`` when given (they win), each with TRL's signature ``(prompts, completions, **kwargs)``
    or ``(problems, completions)`` (:mod:`pydistill.rewards`). Every call is guarded (:meth:`RewardHealth.run`)."""
    if functions is None:
        chosen, parsed = check_reward_names(names, weights)
        functions = [REWARD_FUNCTIONS[n](task) for n in chosen]
    else:
        parsed = _parse_weights(weights)
    if function_weights is None:
        function_weights = parsed
    health = RewardHealth(max_failures)
    combined, names = combine_rewards(functions, function_weights, health=health)
    combined.names, combined.health = names, health
    return combined


def _parse_weights(weights: Optional[str]):
    if not weights:
        return None
    try:
        return [float(w) for w in weights.split(",")]
    except ValueError:
        raise ValueError(f"reward_weights must be comma-separated numbers, got {weights!r}") from None


def check_reward_names(names: str, weights: Optional[str] = None):
    """The config's reward names and weights, checked (a config's ``validate`` calls this to fail fast)."""
    chosen = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else []
    unknown = [n for n in chosen if n not in REWARD_FUNCTIONS]
    if unknown or not chosen:
        raise ValueError(f"reward_functions must name some of {sorted(REWARD_FUNCTIONS)}, got {names!r}")
    parsed = _parse_weights(weights)
    if parsed is not None and len(parsed) != len(chosen):
        raise ValueError(f"reward_weights must have one entry per reward function ({len(chosen)}), "
                         f"got {weights!r}")
    return chosen, parsed


def sample_groups(trainer, problems: list, reward, prompt_messages=student_messages) -> GroupBatch:
    """Sample ``trainer.sampling.n`` completions per problem from the student context and score them."""
    tok, n = trainer.tokenizer, trainer.sampling.n
    prompts = [render(tok, prompt_messages(p.question)) for p in problems]
    rollouts = trainer.engine.sample(prompts, trainer.sampling)
    repeated = [p for p in problems for _ in range(n)]
    combined, columns = reward(repeated, rollouts.texts, completion_ids=rollouts.completion_ids)
    names = getattr(reward, "names", [f"reward_{i}" for i in range(len(columns))])
    student = build_context_batch(rollouts.prompt_ids, rollouts.completion_ids, tok.pad_token_id,
                                  trainer.accelerator.device)
    correct = torch.tensor([bool(trainer.task.is_correct(p, t)) for p, t in zip(repeated, rollouts.texts)])
    return GroupBatch(repeated, rollouts, student, torch.tensor(combined, dtype=torch.float32),
                      dict(zip(names, columns)), correct, n)


def completion_length_metrics(batch: GroupBatch) -> dict:
    lengths = [len(c) for c in batch.rollouts.completion_ids]
    return dict(completion_tokens=sum(lengths) / len(lengths), completion_tokens_min=min(lengths),
                completion_tokens_max=max(lengths))


def step_advantages(trainer, rewards: Sequence[torch.Tensor], group_size: int, scaling: str):
    """Group advantages over one optimizer step: ``rewards`` holds each micro-batch's [b_i * group_size]
    rewards on this process. Returns (one advantage tensor per micro-batch, share of zero-spread groups).
    "batch" scaling sees the whole step, on every process (the rewards are gathered)."""
    flat = torch.cat(list(rewards))
    start = 0
    if scaling == "batch" and trainer.world > 1:
        flat = trainer.accelerator.gather(flat.to(trainer.accelerator.device)).cpu()
        start = trainer.accelerator.process_index * sum(len(r) for r in rewards)
    adv = group_advantages(flat, group_size, scaling=scaling)
    out = []
    for r in rewards:
        out.append(adv.advantages[start:start + len(r)])
        start += len(r)
    return out, adv.zero_spread_fraction
