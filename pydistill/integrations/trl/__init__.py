"""pydistill inside TRL: one line puts the fused op into TRL's trainers.

    from pydistill.integrations.trl import GRPOTrainer      # instead of `from trl import GRPOTrainer`
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

or, for a trainer already built, ``patch(trainer)``. Each subclass keeps TRL's constructor and config; what
changes is where the per-token statistics come from (the decoder body's hidden states and the lm_head weight,
through :func:`pydistill.token_stats`, never [B, T, V] logits). Tested with TRL >=1.16,<1.17 (``pip install
pydistill[trl]``); another TRL version is refused at construction with its version named.
"""
from __future__ import annotations

from ._compat import TESTED_TRL, check_trl_version
from .grpo import GRPOTrainer, patch_grpo

__all__ = ["GRPOTrainer", "TESTED_TRL", "patch"]


def patch(trainer):
    """Switch an already constructed TRL trainer to pydistill's fused op, in place; returns it.

    Accepts ``trl.GRPOTrainer`` (and subclasses). Anything else raises a TypeError naming the type.
    """
    check_trl_version()
    import trl

    if isinstance(trainer, trl.GRPOTrainer):
        return patch_grpo(trainer)
    raise TypeError(f"patch() takes a trl.GRPOTrainer; got {type(trainer).__name__}")
