"""The options of the core op, shared by the chunk loop, both spellings of the folds and the eager one.

Kept in a module of its own so that the folds depend on it and not on each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class StatsConfig:
    """Resolved options of one call of :func:`pydistill.token_stats`.

    ``divergence`` is already canonical here: ``"jsd"`` with ``beta == 0`` has been turned into
    ``"forward_kl"`` and ``beta == 1`` into ``"reverse_kl"`` (the TRL/Liger convention: the endpoints
    are the two KLs, not the limits of the JSD formula, which tend to 0).
    """

    temperature: float = 1.0
    softcap: Optional[float] = None
    # the teacher context's T; None (resolved at construction): ``temperature``, one T for both contexts
    teacher_temperature: Optional[float] = None
    divergence: Optional[str] = None  # None: no teacher, no divergence
    beta: float = 0.5  # only read when divergence == "jsd"
    clip: Optional[float] = None  # pointwise clip tau on each vocabulary entry's term
    has_targets: bool = False

    def __post_init__(self):
        if self.teacher_temperature is None:
            object.__setattr__(self, "teacher_temperature", self.temperature)

    @property
    def needs_second_sweep(self) -> bool:
        """JSD and clipping need the final log-sum-exps entry by entry: one more sweep in the forward."""
        return self.divergence == "jsd" or (self.divergence is not None and self.clip is not None)
