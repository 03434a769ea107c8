"""pydistill inside TRL: one line puts the fused op into TRL's trainers.

    from pydistill.integrations.trl import GRPOTrainer      # instead of `from trl import GRPOTrainer`
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

or, for a trainer already built, ``patch(trainer)``. Each subclass keeps TRL's constructor and config; what
changes is where the per-token statistics come from (the decoder body's hidden states and the lm_head weight,
through :func:`pydistill.token_stats`, never [B, T, V] logits). Tested with TRL >=1.16,<1.17 (``pip install
'trl>=1.16,<1.17'``); another TRL version is refused at construction with its version named (set
``PYDISTILL_ALLOW_UNTESTED_TRL=1`` or pass ``allow_untested_trl=True`` to try one anyway, warned once).
"""
from __future__ import annotations

try:
    import trl as _trl  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("pydistill.integrations.trl needs TRL: pip install 'trl>=1.16,<1.17'") \
        from error

from ...token_stats.loop import DEFAULT_MEMORY_BUDGET_MB
from ._compat import TESTED_TRL, check_trl_version
from . import distillation, self_distillation, server_distillation
from .grpo import GRPOTrainer, patch_grpo

__all__ = ["DistillationTrainer", "GKDTrainer", "GRPOTrainer", "SDFTTrainer", "SDPOTrainer",
           "ServerDistillationTrainer", "TESTED_TRL", "patch"]

_LAZY = {"DistillationTrainer": distillation.make_distillation_trainer, "GKDTrainer": distillation.make_gkd_trainer,
         "SDPOTrainer": self_distillation.make_sdpo_trainer, "SDFTTrainer": self_distillation.make_sdft_trainer,
         "ServerDistillationTrainer": server_distillation.make_server_distillation_trainer}
_MADE = {}


def __getattr__(name):
    # Built on first use: GKDTrainer lives in trl.experimental, which is imported only when asked for.
    if name in _LAZY:
        if name not in _MADE:
            _MADE[name] = _LAZY[name]()
        return _MADE[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patch(trainer, allow_untested_trl=None, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB):
    """Switch an already constructed TRL trainer to pydistill's fused op, in place; returns it.

    ``memory_budget_mb`` is the op's speed/memory knob (the subclasses take it as a keyword too): the default,
    4096 MB, is about what TRL's own chunked head takes at N=8192, H=4096, V=151936, and holds the gradient
    formed in the forward there; 256 MB gives the lean mode.

    Accepts ``trl.GRPOTrainer``, ``trl.DistillationTrainer`` and ``trl.experimental``'s ``GKDTrainer``,
    ``SDPOTrainer``, ``SDFTTrainer`` and ``ServerDistillationTrainer`` (and subclasses). Anything else raises a TypeError naming the type.
    An untested TRL is refused unless ``allow_untested_trl=True`` (see :func:`check_trl_version`).
    """
    check_trl_version(allow_untested_trl)
    import trl

    if isinstance(trainer, trl.GRPOTrainer):
        return patch_grpo(trainer, allow_untested_trl, memory_budget_mb)
    names = {c.__name__ for c in type(trainer).__mro__}
    if "ServerDistillationTrainer" in names:  # before its base, DistillationTrainer
        return server_distillation.patch_server_distillation(trainer, memory_budget_mb)
    if isinstance(trainer, trl.DistillationTrainer):
        return distillation.patch_distillation(trainer, memory_budget_mb)
    if "GKDTrainer" in names:
        return distillation.patch_distillation(trainer, memory_budget_mb)
    if names & {"SDPOTrainer", "SDFTTrainer"}:
        return self_distillation.patch_self_distillation(trainer, memory_budget_mb)
    raise TypeError(f"patch() takes a trl.GRPOTrainer, trl.DistillationTrainer, GKDTrainer, SDPOTrainer, "
                    f"SDFTTrainer or ServerDistillationTrainer; got {type(trainer).__name__}")
