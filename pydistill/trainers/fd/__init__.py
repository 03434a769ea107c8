"""Feedback Distillation (arXiv 2605.30861): distill a feedback-conditioned EMA teacher into the student.

The student samples G trajectories per prompt (as GRPO does). A feedback source writes text about each
attempt — the step verifier (which step is wrong, what its value should be, whether the final answer is
right), a critic model (the student itself through the rollout engine at a low temperature, or a second HF
model, told not to give the answer away), or the Lean 4 compiler's errors. The teacher, an EMA copy of the
student by default, reads the prompt plus that feedback (plus, with ``include_sibling``, a correct attempt
from the same group) — as notes on the problem by default (``teacher_frame="notes"``; "previous_attempt"
presents it as what an earlier attempt received, which on SmolLM2-135M taught the student that frame's language)
— and scores the same trajectory tokens; the loss is the full-vocabulary per-token
divergence teacher vs student through the fused op: reverse KL by default (the paper's public config uses forward
KL, ``divergence="forward_kl"``; on SmolLM2-135M, whose feedback-conditioned teacher is flatter than the student,
forward KL raised the policy's entropy and cost accuracy: 18.2% vs reverse KL's 25.0% over 3 seeds, base 23.4%;
benchmarks/RESULTS.md, "ROSD/FD collapse: diagnosis"). ``teacher_temperature`` < 1 divides the teacher's logits
(after the model's final softcap, if any) before the divergence, a sharper teacher (as DINO-style
self-distillation does; on SmolLM2-135M it lowered the entropy without any gain in accuracy, so the default is 1).

With ``distillation_weight`` w < 1 the loss is ``w * FD + (1 - w) * GRPO`` from one pass of the op
(:func:`pydistill.losses.blended_loss`), the GRPO term using this config's GRPO options and group advantages.
GRPO started from a Feedback Distillation checkpoint (the paper's best setting) is
``pydistill train grpo --init-from <fd run folder>``.

Feedback failures and timeouts never stop a run: they are counted (``feedback/failures``,
``feedback/timeouts`` per step) and logged, and an attempt without feedback (a failure, a timeout, or a source
with nothing to say) gets the teacher context without a feedback section — the student prompt itself, or
the prompt plus the sibling when there is one. As in the author's TRL fork (``self_distillation_mask``), pure
Feedback Distillation distils only rollouts whose teacher context carries feedback or a sibling; the others get
no loss (``distilled_rollouts_share`` per step). The verifier writes nothing about a right attempt whose steps
check out ("The final answer is correct." told the teacher nothing about it). In the blend, whose fused op takes
one mask for both terms, the distillation term still covers every rollout.
"""
from .config import FDConfig
from .trainer import FDTrainer

__all__ = ["FDConfig", "FDTrainer"]
