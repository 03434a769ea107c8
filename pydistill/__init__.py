"""pydistill: on-policy distillation and GRPO losses computed from hidden states, never from full logits."""
from .token_stats import DIVERGENCES, StatsConfig, TokenStats, token_stats

__all__ = ["DIVERGENCES", "StatsConfig", "TokenStats", "token_stats"]
__version__ = "0.2.0"
