"""Rollout engines: sample completions for prompts. Transformers' generate now; another engine (vLLM) only
needs to implement :class:`RolloutEngine`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

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

    # Multi-turn methods (ExGRPO) also need ``sample_ids(prompt_ids, settings) -> Rollouts``: prompts given as
    # exact token ids, which a string round trip could change.


class HFRolloutEngine:
    """Batched sampling with ``model.generate`` (left padding, EOS-terminated completions)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, synced_gpus: bool = False):
        """``synced_gpus``: keep every process stepping until all finished (sharded parameters, e.g. FSDP)."""
        self.model, self.tokenizer, self.batch_size, self.synced_gpus = model, tokenizer, batch_size, synced_gpus

    def sample(self, prompts: Sequence[str], settings: SamplingSettings) -> Rollouts:
        repeated = [p for p in prompts for _ in range(settings.n)]
        texts, ids = generate_completions(self.model, self.tokenizer, repeated, max_new_tokens=settings.max_new_tokens,
                                          greedy=False, temperature=settings.temperature, top_p=settings.top_p,
                                          top_k=settings.top_k, batch_size=self.batch_size,
                                          synced_gpus=self.synced_gpus)
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in repeated]
        return Rollouts(repeated, prompt_ids, ids, texts)

    @torch.no_grad()
    def sample_ids(self, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings) -> Rollouts:
        """Like :meth:`sample`, from prompts given as token ids, used exactly as given (left-padded, never
        re-tokenized): a multi-turn prompt is the exact prefix of the dialogue it continues."""
        tok, model = self.tokenizer, self.model
        repeated = [list(p) for p in prompt_ids for _ in range(settings.n)]
        if any(not p for p in repeated):
            raise ValueError("every prompt needs at least one token")
        device = next(model.parameters()).device
        pad, eos = tok.pad_token_id, tok.eos_token_id
        was_training = model.training
        model.eval()
        completions = []
        for start in range(0, len(repeated), self.batch_size):
            batch = repeated[start:start + self.batch_size]
            width = max(len(p) for p in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, p in enumerate(batch):
                input_ids[row, width - len(p):] = torch.tensor(p)
                attention[row, width - len(p):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=settings.max_new_tokens, do_sample=True,
                                 temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                                 pad_token_id=pad, eos_token_id=eos, synced_gpus=self.synced_gpus)
            completions += [_until_eos(row, eos, pad) for row in out[:, width:].tolist()]
        model.train(was_training)
        return Rollouts([tok.decode(p) for p in repeated], repeated, completions,
                        [tok.decode(c, skip_special_tokens=True) for c in completions])


def _until_eos(row: list, eos: int, pad: int) -> list:
    """Generated ids up to and including the first EOS, trailing padding removed."""
    kept = []
    for token in row:
        kept.append(token)
        if token == eos:
            break
    while kept and kept[-1] == pad and pad != eos:
        kept.pop()
    return kept
