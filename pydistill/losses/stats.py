"""The losses' names for the op's [B, T] front door, which :mod:`pydistill.boundary` owns."""
from ..boundary import op_options, sequence_token_stats
from ..token_stats.loop import DEFAULT_MEMORY_BUDGET_MB

__all__ = ["DEFAULT_MEMORY_BUDGET_MB", "op_options", "sequence_token_stats"]
