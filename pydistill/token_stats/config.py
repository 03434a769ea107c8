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
    # the teacher context's cap, resolved at construction to a float: None -> ``softcap`` (0.0 when that is None
    # too); 0.0 stands for "no cap" so that a resolved config resolves to itself (None would mean the student's)
    teacher_softcap: Optional[float] = None
    divergence: Optional[str] = None  # None: no teacher, no divergence
    beta: float = 0.5  # only read when divergence == "jsd"
    clip: Optional[float] = None  # pointwise clip tau on each vocabulary entry's term
    has_targets: bool = False

    def __post_init__(self):
        if self.teacher_temperature is None:
            object.__setattr__(self, "teacher_temperature", self.temperature)
        if self.teacher_softcap is None:
            object.__setattr__(self, "teacher_softcap", float(self.softcap or 0.0))

    @property
    def teacher_cap(self) -> Optional[float]:
        """The teacher context's softcap c_t, or None when its logits are not capped."""
        return self.teacher_softcap or None

    @property
    def needs_second_sweep(self) -> bool:
        """JSD and clipping need the final log-sum-exps entry by entry: one more sweep in the forward."""
        return self.divergence == "jsd" or (self.divergence is not None and self.clip is not None)
