"""OPSD — On-Policy Self-Distillation (arXiv 2601.18734).

The student samples a rollout from the problem alone; the same model, given the problem plus a reference
solution (the teacher context), scores the same rollout tokens; the loss is the full-vocabulary per-token
divergence between the two next-token distributions, teacher gradient stopped. Defaults follow the paper's
v3 setting: one rollout per prompt, forward KL with a pointwise clip of 0.05, sampling at temperature 1.1,
top_p 0.95, top_k 20, fixed teacher, LoRA r=64/alpha=128 at lr 2e-4 (full fine-tune: lr 5e-6), grad-norm
clip 0.1, batch 32, 100 steps. Both distributions are matched at the sampling temperature (``loss_temperature``
None), as the authors' code divides both logits by 1.1.
"""
from .config import OPSDConfig
from .trainer import OPSDTrainer

__all__ = ["OPSDConfig", "OPSDTrainer"]
