"""Accuracy and pass@k of a model on a task's problems, by batched generation."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .prompts import render, student_messages


@dataclass
class EvalResult:
    accuracy: float  # mean over problems of the share of correct samples (= pass@1)
    pass_at_k: dict = field(default_factory=dict)  # k -> unbiased pass@k, for k <= n_samples
    mean_completion_tokens: float = 0.0
    records: list = field(default_factory=list)  # per problem: question, answer, completions, correct flags

    def as_metrics(self, prefix: str = "eval/") -> dict:
        out = {f"{prefix}accuracy": self.accuracy, f"{prefix}completion_tokens": self.mean_completion_tokens}
        out.update({f"{prefix}pass@{k}": v for k, v in self.pass_at_k.items()})
        return out

    @classmethod
    def from_records(cls, records: Sequence[dict], n_samples: int, ks: Sequence[int] = (1, 2, 4, 8)) -> "EvalResult":
        """The result over per-problem records (``correct`` flags and ``completion_tokens`` per sample), e.g.
        the records of several processes' shards gathered together."""
        if not records:
            return cls(accuracy=0.0)
        per_problem = [sum(r["correct"]) / n_samples for r in records]
        passes = {k: sum(pass_at_k(n_samples, sum(r["correct"]), k) for r in records) / len(records)
                  for k in ks if k <= n_samples}
        tokens = [t for r in records for t in r["completion_tokens"]]
        return cls(accuracy=sum(per_problem) / len(records), pass_at_k=passes,
                   mean_completion_tokens=sum(tokens) / len(tokens), records=list(records))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n - c, k) / C(n, k) of the chance that one of k samples is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, greedy: bool = True,
                         temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, batch_size: int = 16,
                         progress: bool = False, desc: str = "generate", synced_gpus: bool = False):
    """Completions (text, token ids without padding) for each prompt, left-padded batches. ``synced_gpus``:
    processes that finished keep stepping until all have (needed when parameters are sharded, e.g. FSDP)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    texts, ids = [], []
    was_training = model.training
    model.eval()
    # Counted in prompts, not batches, so the bar reads as the share of the work; gone once done (the result
    # line follows it).
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False)
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p,
                                                             top_k=top_k)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, synced_gpus=synced_gpus, **sampling)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            kept = []
            for token in row:
                kept.append(token)
                if token == tokenizer.eos_token_id:
                    break
            while kept and kept[-1] == tokenizer.pad_token_id and tokenizer.pad_token_id != tokenizer.eos_token_id:
                kept.pop()
            ids.append(kept)
            texts.append(tokenizer.decode(kept, skip_special_tokens=True))
        bar.update(len(out))
    bar.close()
    model.train(was_training)
    return texts, ids


def evaluate(model, tokenizer, task, problems: Sequence, *, batch_size: int = 16, max_new_tokens: int = 128,
             greedy: bool = True, n_samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, progress: bool = True, ks: Sequence[int] = (1, 2, 4, 8),
             prompt_messages=student_messages, synced_gpus: bool = False) -> EvalResult:
    """Greedy accuracy (``n_samples=1``), or sampled accuracy and pass@k with ``n_samples`` per problem."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if greedy and n_samples > 1:
        raise ValueError("greedy decoding gives one distinct sample: set greedy=False for n_samples > 1")
    if not problems:
        return EvalResult(accuracy=0.0)
    prompts = [render(tokenizer, prompt_messages(p.question)) for p in problems for _ in range(n_samples)]
    texts, ids = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, greedy=greedy,
                                      temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size,
                                      progress=progress, desc="evaluate", synced_gpus=synced_gpus)
    records = []
    for i, problem in enumerate(problems):
        chunk = slice(i * n_samples, (i + 1) * n_samples)
        records.append(dict(question=problem.question, answer=problem.answer, completions=texts[chunk],
                            correct=[task.is_correct(problem, t) for t in texts[chunk]],
                            completion_tokens=[len(x) for x in ids[chunk]]))
    return EvalResult.from_records(records, n_samples, ks)
