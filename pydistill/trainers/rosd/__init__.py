"""ROSD — Reflective On-Policy Self-Distillation (arXiv 2605.28014).

For each prompt the student samples G rollouts, scored by the task's verifier. Groups whose rewards have zero
spread are dropped (``drop_zero_spread``), and a prompt with no successful rollout is always skipped: it has no
correct solution to show the teacher. Each remaining rollout is paired with a correct sibling from its own group
(never the dataset solution) and handed to a reflector, which returns the exact quote where the rollout's
reasoning first goes wrong and an explanation (for a correct rollout, why it is right):

- ``reflector="step_check"``: the task's programmatic step checker (the first wrong "a op b = c");
- ``reflector="model"``: the student model itself, prompted to answer in a tagged format, sampled at
  ``reflection_temperature`` (see :mod:`pydistill.trainers.rosd.reflection`).

The quote becomes t*, the number of rollout tokens before it (through the tokenizer's character offsets); an
unparsable reflection, a reflection without a quote or a quote that cannot be found falls back to t* = 0, and
each case is counted. Tokens t >= t* of an incorrect rollout are distilled; correct rollouts are distilled
whole. The teacher is the model at its initial weights (``teacher="fixed"``: the LoRA adapter disabled, or a
frozen copy), reading the problem, the correct sibling, the reflection's explanation (not the quote) and an
instruction to solve the original question, then the same rollout tokens. The loss is the full-vocabulary JSD
(beta 0.5) between teacher and student through the fused op, each token weighted by the detached importance
ratio exp(logp - logp_old) clipped at 2, token-mean over the distilled tokens of the whole batch; rows of the
prefix before t* are gathered out before the op and cost nothing. No policy-gradient term.

Sibling rule: an incorrect rollout takes the group's correct rollouts in turn (the k-th incorrect rollout the
(k mod C)-th of the C correct ones), so the teacher contexts spread over the successes. A correct rollout takes
the next other correct rollout of its group (cyclically); when it is the group's only success it has none and
its teacher context has no solution section, only the reflection (the authors' ``dont_reprompt_on_self_success``:
shown itself, it was distilled toward a confident copy of itself). A rollout whose teacher context then holds
neither a solution nor a reflection (the step checker has nothing to say about a correct rollout) gets no loss
and is counted (``uninformative_rollouts``). The step checker writes no canned text where it finds no error.
``distill_correct_rollouts=False`` leaves every correct rollout out.

Paper defaults: G = 8, JSD beta 0.5, importance clip 2, fixed teacher, lr 1e-5 with 10 warm-up steps, batch 32.

What the teacher is shown as the correct solution (``privileged``): the paper's sibling; ``"derived_sibling"``,
a correct sibling that derives the answer in checked arithmetic (never the rollout itself), else the task's
worked solution; or ``"solution"``, always the worked solution. Which rollouts are kept does not change.
(A bare "The answer is 12." is correct for the verifier but derives nothing: ``derived_sibling`` never shows one.)
The step-check reflector's explanations, like the model reflector's instruction, do not state the final answer.
Measured on SmolLM2-135M (benchmarks/RESULTS.md, "ROSD/FD collapse: diagnosis"): at the paper's setting, with
either privileged text, the student collapses to answering first and guessing; without the explanation, with
the reference solution and OPSD's truncated sampling it gained on one seed of three (32.8, 25.0, 9.4% from 23.4%).

Diagnosis switches: ``privileged`` above, ``explanation=False`` leaves the reflection's explanation out of the
teacher context, and ``loss_span="whole"`` distills every token of every kept rollout (t* = 0; the reflector
still runs and its hit counts are still logged).
"""
from .config import ROSDConfig
from .trainer import GroupSelection, ROSDTrainer, select_siblings

__all__ = ["GroupSelection", "ROSDConfig", "ROSDTrainer", "select_siblings"]
