"""ExGRPO — Explanatory Inversion + Explanatory GRPO (arXiv 2603.19266, ICLR 2026).

Three stages, each resumable:

0. **Explanatory Inversion data** (:func:`build_ei_dataset`). A teacher (``ei_teacher``: the student model
   itself, any Hugging Face model, or any callable ``prompts -> texts``) writes a rationale for each training
   question, one probe per transformation rule, and a solution to each probe (:mod:`.explanatory_inversion`).
   The EI-consistency filter keeps a probe only if the teacher, shown the probe and its solution, still answers
   the question; the difficulty filter drops questions whose probes the *base* student (greedy, before any
   training) solves all of, or fewer than ``min_solved_fraction`` of. Every call is cached in the ``ei_cache``
   jsonl, so the generation runs once and a crash loses at most the record in flight; the filter report is
   saved as ``ei_filter_report.json``.
1. **SFT warm-up**: next-token NLL of the teacher's probe solutions given the probe (only the solution tokens
   are scored), ``sft_steps`` steps at ``sft_learning_rate`` with its own AdamW, through the fused op on
   hidden states. Checkpoints go to ``<output_dir>/sft``.
2. **ExGRPO**. For each question, ``k`` = ``num_probes`` of its probes are drawn (in random order). Scenario A
   dialogues ask the k probes one per turn, then the question; scenario B dialogues ask only the first
   ``k'`` = ``partial_probes`` of them, then the question. The student writes every reply, each one sampled
   from the exact token ids of the dialogue so far (:class:`.dialogue.DialogueBuilder`). G =
   ``num_generations`` dialogues of each scenario per question. The reward is the outcome of the final answer
   (``reward_functions``, default ``accuracy``: 1 if it equals the reference answer). Dialogue Structure
   Utility bonus: ``dsu_delta`` is added to every successful scenario-A rollout of a question whose A success
   rate P_full exceeds ``dsu_nu`` times its B success rate P_partial. Advantages are group-relative over
   **all 2G rollouts of a question** (A and B together): both scenarios end with the same question under the
   same outcome reward, and only a shared group lets the bonus act: a bonus paid to every success of a
   binary-reward group on its own would vanish under the group's std normalization. The loss is GRPO's
   clipped surrogate on the student's tokens of every turn (template text and user turns are not trained),
   plus ``beta`` times the k3 KL to the reference policy, plus ``sft_coef`` times an auxiliary SFT loss: the
   NLL of the teacher's dialogue for the same scenario-A probes (each probe's teacher solution as the reply to
   that turn, the teacher's rationale as the reply to the question). Both terms come from ONE call of the fused
   op over the union of their token masks; no logits tensor is ever built.

The reference policy of the KL term is the policy at the start of stage 2 — the SFT warm-up's result (the
initial weights when stage 1 is skipped) — as GRPO after SFT usually does; a KL to the pre-SFT weights would
pull the warm-up back out. It is kept as a snapshot of the trainable weights only (under LoRA, the adapter).

Inference is a single pass on the question, without probes (the core's evaluation). ``max_steps``,
``time_budget_s``, ``learning_rate`` and the schedule are stage 2's; stage 1 has its own ``sft_*`` fields.
Hyperparameters the method description leaves open (k, k', delta, nu, the aux SFT weight) have our defaults,
documented on :class:`ExGRPOConfig`.
"""
from .config import ExGRPOConfig, parse_rules
from .dialogue import probe_turn, question_turn
from .ei_data import ModelTextGenerator, build_ei_dataset, ei_generate, text_generator
from .reference import StageReference
from .trainer import ExGRPOTrainer

__all__ = ["ExGRPOConfig", "ExGRPOTrainer", "ModelTextGenerator", "StageReference", "build_ei_dataset",
           "ei_generate", "parse_rules", "probe_turn", "question_turn", "text_generator"]
