"""Supervised fine-tuning on the task's reference solutions: the plain-SFT baseline of the comparisons.

Each training problem becomes the student context (the problem, as at evaluation) followed by its reference
worked solution and EOS; the loss is the fused NLL of the solution tokens only, on hidden states. No rollouts:
``generated_token_budget`` does not apply (use ``max_steps`` or ``time_budget_s``).

Distillation on fixed data (GKD on the dataset's responses): with ``teacher_cache`` (a folder written by
``pydistill teacher-cache --dataset D --response-column solution``, training on the same ``--dataset D``) the
loss is ``(1 - w) NLL + w D`` with D the divergence to the cached teacher's top-k (plus a tail bucket) on the
solution tokens, the student at the cache's temperature. Each training row must be a row of the scored data
with exactly the response tokens trained on: a cache of other data, tokenizer or length is refused at start.
"""
from .config import SFTConfig
from .trainer import SFTTrainer

__all__ = ["SFTConfig", "SFTTrainer"]
