"""Rollout engines: sample completions for prompts. Transformers' generate now; another engine (vLLM) only
needs to implement :class:`RolloutEngine`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from ..evaluation import generate_completions


@dataclass
class Rollouts:
    prompts: list  # rendered prompt strings, one per completion (each prompt repeated n times, adjacent)
    prompt_ids: list  # token ids of each prompt
    completion_ids: list  # generated ids (up to and including EOS; no padding)
    texts: list  # decoded completions, special tokens removed


@dataclass
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1  # completions per prompt


class RolloutEngine(Protocol):
    def sample(self, prompts: Sequence[str], settings: SamplingSettings) -> Rollouts: ...


class HFRolloutEngine:
    """Batched sampling with ``model.generate`` (left padding, EOS-terminated completions)."""

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def sample(self, prompts: Sequence[str], settings: SamplingSettings) -> Rollouts:
        repeated = [p for p in prompts for _ in range(settings.n)]
        texts, ids = generate_completions(self.model, self.tokenizer, repeated, max_new_tokens=settings.max_new_tokens,
                                          greedy=False, temperature=settings.temperature, top_p=settings.top_p,
                                          top_k=settings.top_k, batch_size=self.batch_size)
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in repeated]
        return Rollouts(repeated, prompt_ids, ids, texts)
