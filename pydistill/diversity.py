"""Trajectory diversity of a group of completions to one prompt (Feedback Distillation's argument vs GRPO).

- :func:`distinct_answers`: how many different final answers the group reaches (a completion without a
  number counts as one more "answer", the missing one).
- :func:`distinct_ngram_ratio`: distinct-n, the number of distinct n-grams over the number of n-grams in
  the whole group (1.0: no n-gram repeats anywhere; near 0: the completions say the same thing).
- :func:`group_diversity`: both, averaged over consecutive groups of ``group_size`` completions.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from .tasks import extract_answer


def words(text: str) -> list:
    """Lower-cased whitespace words: a tokenizer-free unit, so runs with different models compare."""
    return text.lower().split()


def distinct_answers(texts: Sequence[str], extract: Callable[[str], Optional[str]] = extract_answer) -> int:
    """Number of distinct extracted final answers among ``texts`` (None, no answer, is one value)."""
    return len({extract(t) for t in texts})


def distinct_ngram_ratio(sequences: Sequence[Sequence], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over ``sequences`` (lists of tokens or words); 0.0 when none has n items."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def group_diversity(texts: Sequence[str], group_size: int, n: int = 2, prefix: str = "diversity/") -> dict:
    """Mean over groups of the distinct final answers (count and share of the group) and of distinct-n of
    the words; ``texts`` holds consecutive groups of ``group_size`` completions."""
    if group_size < 1 or len(texts) % group_size:
        raise ValueError(f"{len(texts)} completions do not split into groups of {group_size}")
    groups = [texts[i:i + group_size] for i in range(0, len(texts), group_size)]
    if not groups:
        return {}
    answers = [distinct_answers(g) for g in groups]
    ngrams = [distinct_ngram_ratio([words(t) for t in g], n) for g in groups]
    return {f"{prefix}distinct_answers": sum(answers) / len(groups),
            f"{prefix}distinct_answer_share": sum(a / group_size for a in answers) / len(groups),
            f"{prefix}distinct_{n}grams": sum(ngrams) / len(groups)}
