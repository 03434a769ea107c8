"""ExGRPO — Explanatory Inversion + Explanatory GRPO (arXiv 2603.19266, ICLR 2026).

Three stages, each resumable:

0. **Explanatory Inversion data** (:func:`build_ei_dataset`). A teacher (``ei_teacher``: the student model
   itself, any Hugging Face model, or any callable ``prompts -> texts``) writes a rationale for each training
   question, one probe per transformation rule, and a solution to each probe
   (:mod:`pydistill.explanatory_inversion`). The EI-consistency filter keeps a probe only if the teacher,
   shown the probe and its solution, still answers the question; the difficulty filter drops questions whose
   probes the *base* student (greedy, before any training) solves all of, or fewer than
   ``min_solved_fraction`` of. Every call is cached in the ``ei_cache`` jsonl, so the generation runs once and
   a crash loses at most the record in flight; the filter report is saved as ``ei_filter_report.json``.
1. **SFT warm-up**: next-token NLL of the teacher's probe solutions given the probe (only the solution tokens
   are scored), ``sft_steps`` steps at ``sft_learning_rate`` with its own AdamW, through the fused op on
   hidden states. Checkpoints go to ``<output_dir>/sft``.
2. **ExGRPO**. For each question, ``k`` = ``num_probes`` of its probes are drawn (in random order). Scenario A
   dialogues ask the k probes one per turn, then the question; scenario B dialogues ask only the first
   ``k'`` = ``partial_probes`` of them, then the question. The student writes every reply, each one sampled
   from the exact token ids of the dialogue so far (:class:`pydistill.dialogue.DialogueBuilder`). G =
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
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..dialogue import DialogueBuilder, DialogueTokens, Turn
from ..evaluation import generate_completions
from ..ei_procedural import ProceduralTeacher
from ..explanatory_inversion import (EI_RULES, RULES_BY_NAME, EIData, FilterReport, JsonlCache, filter_ei_data,
                                     generate_ei_data)
from ..losses import LossOutput, nll_loss
from ..losses.output import masked_mean
from ..losses.policy_gradient import policy_gradient_per_token, policy_metrics, reduce_policy_loss
from ..losses.reductions import reduce_tokens
from ..losses.stats import op_options, sequence_token_stats
from ..models import load_model
from ..prompts import render, student_messages
from ..rewards import dialogue_structure_bonus
from ..tasks import extract_answer, same_answer
from . import run_folder
from .checkpoint import clean_stale, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from .contexts import ContextBatch, build_context_batch, lm_head_bias, lm_head_weight, response_hidden_states
from .core import Trainer
from .fields import Literal, option
from .grpo import GRPOConfig
from .groups import reward_function, step_advantages
from .metrics import MetricsLog
from .rollout import HFRolloutEngine

STAGES = ("both", "sft", "rl")
TextGenerator = Callable[[list], list]


@dataclass
class ExGRPOConfig(GRPOConfig):
    """GRPO's fields (clipping, loss_type, scale_rewards, beta, ...) plus ExGRPO's. Note the names: GRPO's
    ``delta`` stays the two-sided clipping cap; the DSU bonus is ``dsu_delta``. ``teacher`` (the core's
    teacher kind) must stay "fixed": the KL reference is the policy at the start of stage 2."""

    # stage 2: dialogues and rewards
    num_generations: int = option(4, "G: dialogues per scenario and question (2G rollouts per question, one group)")
    num_probes: int = option(3, "k: probes before the question in scenario A")
    partial_probes: int = option(1, "k' < k: probes before the question in scenario B (0: the question alone)")
    dsu_delta: float = option(0.2, "DSU bonus added to successful scenario-A rollouts (>= 0)")
    dsu_nu: float = option(1.0, "the bonus applies when P_full > dsu_nu * P_partial (>= 0)")
    beta: float = option(0.04, "k3 KL to the reference (the policy at the start of stage 2)")
    sft_coef: float = option(0.1, "weight of the auxiliary SFT loss on the teacher's dialogue (0: off)")
    max_new_tokens: int = option(256, "per turn")
    batch_size: int = option(16, "questions per optimizer step")
    micro_batch_size: int = option(2, "questions per forward/backward (2G dialogues each, plus one teacher dialogue)")
    train_problems: int = option(256, "training questions given to Explanatory Inversion (before the filters)")
    # stage 0: Explanatory Inversion data
    ei_teacher: str = option("student", "'student' (the student model itself), 'procedural' (probes written by rule "
                             "for the embedded arithmetic task, no model: pydistill.ei_procedural) or a Hugging "
                             "Face model name/path")
    ei_cache: Optional[str] = option(None, "jsonl of every teacher/student call; None: <output_dir>/ei_cache.jsonl")
    ei_rules: str = option("all", "'all' or comma-separated rule names (pydistill.explanatory_inversion.EI_RULES)")
    ei_filters: bool = option(True, "apply the EI-consistency and difficulty filters")
    min_solved_fraction: float = option(0.2, "tau_hard: drop questions whose probes the base student solves fewer of")
    ei_max_new_tokens: int = option(256, "teacher / base-student generation length in stage 0")
    ei_batch_size: int = option(16, "prompts per generate call in stage 0")
    # stage 1: SFT warm-up
    stage: Literal["both", "sft", "rl"] = option("both", "stages to run: SFT warm-up, dialogue GRPO, or both")
    sft_steps: int = 50
    sft_learning_rate: float = 1e-4
    sft_batch_size: int = option(16, "(probe, solution) examples per SFT step")
    output_dir: str = "runs/exgrpo"

    def validate(self):
        super().validate()
        if not isinstance(self.num_probes, int) or self.num_probes < 1:
            raise ValueError(f"num_probes (k) must be a positive integer, got {self.num_probes!r}")
        if not isinstance(self.partial_probes, int) or not 0 <= self.partial_probes < self.num_probes:
            raise ValueError(f"partial_probes (k') must be an integer in [0, num_probes={self.num_probes}), "
                             f"got {self.partial_probes!r}")
        for name in ("dsu_delta", "dsu_nu", "sft_coef"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if not isinstance(self.sft_steps, int) or self.sft_steps < 0:
            raise ValueError(f"sft_steps must be an integer >= 0, got {self.sft_steps!r}")
        if self.stage == "sft" and self.sft_steps == 0:
            raise ValueError("stage 'sft' needs sft_steps >= 1")
        if not self.sft_learning_rate > 0:
            raise ValueError(f"sft_learning_rate must be > 0, got {self.sft_learning_rate}")
        for name in ("sft_batch_size", "ei_max_new_tokens", "ei_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0.0 <= self.min_solved_fraction <= 1.0:
            raise ValueError(f"min_solved_fraction must be in [0, 1], got {self.min_solved_fraction}")
        if not self.ei_teacher:
            raise ValueError("ei_teacher must be 'student', 'procedural' or a model name/path")
        if self.ei_teacher == "procedural" and self.task != "arithmetic":
            raise ValueError(f"ei_teacher 'procedural' writes probes for the arithmetic task only, got task "
                             f"{self.task!r}: use 'student' or a model name/path")
        parse_rules(self.ei_rules)
        if self.teacher != "fixed":
            raise ValueError(f"teacher must be 'fixed' for ExGRPO (its KL reference is the policy at the start of "
                             f"stage 2), got {self.teacher!r}")
        return self


def parse_rules(spec: str) -> tuple:
    """EI rules from "all" or comma-separated names."""
    if spec.strip() == "all":
        return EI_RULES
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in RULES_BY_NAME]
    if unknown or not names:
        raise ValueError(f"ei_rules must be 'all' or comma-separated names from {sorted(RULES_BY_NAME)}, "
                         f"got {spec!r}")
    return tuple(RULES_BY_NAME[n] for n in names)


# ----- stage 0 --------------------------------------------------------------------------------------------
class ModelTextGenerator:
    """``prompts -> texts``: greedy completions of a causal LM, each prompt sent as one user message through
    the chat template. Given a name, the model is loaded on the first call only (a complete cache never
    loads it)."""

    def __init__(self, model, tokenizer=None, *, max_new_tokens: int, batch_size: int, device=None):
        self.name = model if isinstance(model, str) else None
        self.model, self.tokenizer = (None, None) if isinstance(model, str) else (model, tokenizer)
        self.max_new_tokens, self.batch_size, self.device = max_new_tokens, batch_size, device

    def __call__(self, prompts: list) -> list:
        if self.model is None:
            self.model, self.tokenizer = load_model(self.name, device=self.device)
        rendered = [render(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        texts, _ = generate_completions(self.model, self.tokenizer, rendered, max_new_tokens=self.max_new_tokens,
                                        greedy=True, batch_size=self.batch_size)
        return texts


def final_answer_matches(completion: str, answer: str) -> bool:
    """The filters' verifier: the completion's final number equals ``answer``."""
    return same_answer(extract_answer(completion), answer)


def check_cache_questions(cache_path: str, problems: Sequence, teacher_name: str, student_name: str):
    """Records are keyed by question position: refuse a cache written for other questions or models."""
    cache = JsonlCache(cache_path)
    for i, p in enumerate(problems):
        identity = dict(question=p.question, answer=str(p.answer), teacher=teacher_name, student=student_name)
        found = cache.get(f"question/{i}")
        if found is None:
            cache.add(dict(key=f"question/{i}", kind="question", **identity))
        elif {k: found.get(k) for k in identity} != identity:
            changed = ", ".join(k for k in identity if found.get(k) != identity[k])
            raise ValueError(f"ei_cache {cache_path!r} does not match this run at question {i} (different "
                             f"{changed}): use another cache path, or the same task, split, train_problems, seed "
                             f"and models")


def build_ei_dataset(problems: Sequence, teacher: TextGenerator, student: TextGenerator, cache_path: str, *,
                     rules: Sequence = EI_RULES, filters: bool = True, min_solved_fraction: float = 0.2,
                     batch_size: int = 16, teacher_name: str = "custom", student_name: str = "custom"):
    """Stage 0: (EIData kept, FilterReport). Without ``filters`` every generated probe is kept (the report
    then only counts them)."""
    check_cache_questions(cache_path, problems, teacher_name, student_name)
    unverified = 0
    if isinstance(teacher, ProceduralTeacher):  # probes written by rule, each verified: no model call
        data, unverified = teacher.ei_data(problems, rules)
    else:
        data = generate_ei_data(problems, teacher, cache_path, rules=rules, batch_size=batch_size,
                                extract_answer=extract_answer)
    if filters:
        # The base student answers each probe as it is asked at inference (its own prompt, as in the dialogues).
        kept, report = filter_ei_data(data, teacher, student, cache_path, is_correct=final_answer_matches,
                                      min_solved_fraction=min_solved_fraction, batch_size=batch_size,
                                      extract_answer=extract_answer, student_prompt=probe_turn)
        report.probes += unverified
        report.removed_unanswerable += unverified
        return kept, report
    probes = sum(len(v) for v in data.probes.values())
    kept = EIData({i: q for i, q in data.questions.items() if data.probes[i]},
                  {i: ps for i, ps in data.probes.items() if ps})
    return kept, FilterReport(questions=len(data.questions), probes=probes + unverified,
                              removed_unanswerable=unverified, kept_questions=len(kept.questions),
                              kept_probes=probes)


@dataclass(frozen=True)
class EIQuestion:
    """One training question of stages 1-2 with what the teacher wrote for it."""

    qid: int  # position in the EI question list (the cache's key)
    problem: object
    rationale: str
    probes: tuple  # dicts: rule, probe, probe_solution, probe_answer


def _refuse_generation(prompts):
    raise RuntimeError("the EI cache is incomplete on this process: stage 0 runs on the main process first")


# ----- the KL reference ---------------------------------------------------------------------------------
class StageReference:
    """pi_ref: the trainable weights at the start of stage 2, swapped in (no copy) for the reference forward.

    Only trainable tensors are kept — the LoRA adapter under LoRA, every weight for a full fine-tune — since
    the frozen ones are shared. Provides the core's teacher interface (update, state_dict, load_state_dict) so
    the snapshot travels with every checkpoint and a resumed run keeps the same reference.
    """

    def __init__(self, model):
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.snapshot = {n: p.detach().clone() for n, p in self.params}

    @contextlib.contextmanager
    def weights(self):
        """Inside: the model computes with the reference weights (use under no_grad)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self):
        # Exchanging the tensors behind the parameters: no copy, and the Parameter objects (which the
        # optimizer and DDP hold) stay the same.
        for name, param in self.params:
            param.data, self.snapshot[name] = self.snapshot[name], param.data

    def update(self):
        """The reference stays fixed."""

    def state_dict(self):
        return self.snapshot

    def load_state_dict(self, state):
        if state is None:
            return
        for name, value in state.items():
            self.snapshot[name].copy_(value)


# ----- dialogues as a batch -----------------------------------------------------------------------------
def dialogue_context_batch(dialogues: Sequence[DialogueTokens], pad_id: int, device=None) -> ContextBatch:
    """Rows of whole dialogues in the trainer's layout: the "completion" of a row runs from its first reply to
    the end of its last one, and its mask marks the reply tokens only (template and user text are context)."""
    prompts, completions, masks = [], [], []
    for d in dialogues:
        if not d.reply_spans:
            raise ValueError("a dialogue needs at least one reply")
        start, stop = d.reply_spans[0][0], d.reply_spans[-1][1]
        prompts.append(d.input_ids[:start])
        completions.append(d.input_ids[start:stop])
        masks.append(d.trained[start:stop])
    batch = build_context_batch(prompts, completions, pad_id, device)
    trained = torch.zeros_like(batch.completion_mask)
    for row, mask in enumerate(masks):
        trained[row, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
    batch.completion_mask = trained
    return batch


def _rows(batch: ContextBatch, rows: slice) -> ContextBatch:
    return ContextBatch(batch.input_ids[rows], batch.attention_mask[rows], batch.positions[rows],
                        batch.completion_mask[rows], batch.targets[rows])


class ExGRPOTrainer(Trainer):
    method = "exgrpo"
    supports_sharded_parameters = False  # dialogue turns end at different times on different processes


    def __init__(self, config: ExGRPOConfig, *args, ei_teacher: Optional[TextGenerator] = None,
                 ei_student: Optional[TextGenerator] = None, reward_functions: Optional[Sequence] = None,
                 reward_weights: Optional[Sequence[float]] = None, **kwargs):
        """``ei_teacher`` / ``ei_student``: callables ``prompts -> texts`` that replace the configured teacher
        and the base student of the difficulty filter in stage 0 (e.g. an API client)."""
        self._resume_requested = False
        super().__init__(config, *args, **kwargs)  # defers resume (see _resume): stage 0 needs the initial weights
        cfg = self.config
        self.reward = reward_function(self.task, cfg.reward_functions, cfg.reward_weights, reward_functions,
                                      reward_weights, max_failures=cfg.max_reward_failures)
        self.builder = DialogueBuilder(self.tokenizer)
        if isinstance(self.engine, HFRolloutEngine):
            self.engine.batch_size = cfg.micro_batch_size * 2 * cfg.num_generations
        if not hasattr(self.engine, "sample_ids"):
            raise ValueError("ExGRPO needs a rollout engine with sample_ids(prompt_ids, settings): dialogue turns "
                             "are sampled from exact token ids")
        self.ei_report = self.prepare_ei_data(ei_teacher, ei_student)
        self.sft_examples = [(p["probe"], p["probe_solution"]) for q in self.train_pool for p in q.probes]
        random.Random(cfg.seed).shuffle(self.sft_examples)
        self.sft_dir = os.path.join(cfg.output_dir, "sft")
        if self.is_main:
            clean_stale(self.sft_dir)
        self.sft_step, self.sft_position, self.sft_optimizer, self.sft_scheduler = 0, 0, None, None
        self.sft_log = MetricsLog(cfg.output_dir, "sft_metrics.jsonl") if self.is_main else None
        if self._resume_requested:
            self._resume_stages()

    def uses_teacher(self) -> bool:
        # The core's fixed teacher would freeze the pre-SFT weights; the KL reference is built when stage 2
        # starts (StageReference), so the core keeps no copy.
        return False

    @property
    def runs_sft(self) -> bool:
        return self.config.stage in ("both", "sft") and self.config.sft_steps > 0

    # ----- stage 0 ------------------------------------------------------------------------------------
    def prepare_ei_data(self, teacher: Optional[TextGenerator], student: Optional[TextGenerator]) -> FilterReport:
        """Generate (or read from the cache) and filter the EI data; the training pool becomes its questions."""
        cfg = self.config
        cache = cfg.ei_cache or os.path.join(cfg.output_dir, "ei_cache.jsonl")
        model_name = cfg.model if not cfg.init_from else f"{cfg.model}+{cfg.init_from}"
        own = ModelTextGenerator(self.model, self.tokenizer, max_new_tokens=cfg.ei_max_new_tokens,
                                 batch_size=cfg.ei_batch_size)
        custom_teacher = teacher is not None
        if teacher is None and cfg.ei_teacher == "procedural":
            teacher = ProceduralTeacher(cfg.seed)
        elif teacher is None:
            teacher = own if cfg.ei_teacher == "student" else ModelTextGenerator(
                cfg.ei_teacher, max_new_tokens=cfg.ei_max_new_tokens, batch_size=cfg.ei_batch_size,
                device=self.accelerator.device)
        # Names tie the cache to its models; passed callables are the caller's responsibility ("custom").
        teacher_name = ("custom" if custom_teacher else model_name if cfg.ei_teacher == "student" else
                        f"procedural:{cfg.seed}" if cfg.ei_teacher == "procedural" else cfg.ei_teacher)
        options = dict(rules=parse_rules(cfg.ei_rules), filters=cfg.ei_filters,
                       min_solved_fraction=cfg.min_solved_fraction, batch_size=cfg.ei_batch_size,
                       teacher_name=teacher_name, student_name="custom" if student is not None else model_name)
        problems = self.train_pool
        if self.is_main:
            kept, report = build_ei_dataset(problems, teacher, student or own, cache, **options)
        self.accelerator.wait_for_everyone()
        if not self.is_main:  # the cache is complete now: read it, never generate
            kept, report = build_ei_dataset(problems, _refuse_generation, _refuse_generation, cache, **options)
        if self.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            with open(os.path.join(cfg.output_dir, "ei_filter_report.json"), "w") as f:
                json.dump(dict(report.as_dict(), filters=cfg.ei_filters, cache=cache), f, indent=2)
            print(f"[exgrpo] EI data: {json.dumps(report.as_dict())}", flush=True)
        if not kept.questions:
            raise ValueError(f"no training question survived the EI filters ({report.as_dict()}): lower "
                             f"min_solved_fraction, add questions or rules, or set ei_filters false")
        self.train_pool = [EIQuestion(i, problems[i], kept.questions[i]["rationale"], tuple(kept.probes[i]))
                           for i in sorted(kept.questions)]
        return report

    # ----- stage 1 ------------------------------------------------------------------------------------
    def reply_ids(self, text: str) -> tuple:
        """A teacher-written reply as the token ids of an assistant turn (EOS-terminated)."""
        return tuple(self.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
                     + [self.tokenizer.eos_token_id])

    def sft_batch(self, examples: Sequence) -> ContextBatch:
        """(probe, solution) pairs as one-turn dialogues; only the solution tokens are trained."""
        dialogues = [self.builder.build([Turn(probe_turn(probe), self.reply_ids(solution))])
                     for probe, solution in examples]
        return dialogue_context_batch(dialogues, self.tokenizer.pad_token_id, self.accelerator.device)

    def _sft_optimizer(self):
        if self.sft_optimizer is None:
            from transformers import get_scheduler

            params = [p for p in self.model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=self.config.sft_learning_rate,
                                          weight_decay=self.config.weight_decay)
            self.sft_optimizer = self.accelerator.prepare(optimizer)
            self.sft_scheduler = get_scheduler("constant", self.sft_optimizer)
        return self.sft_optimizer

    def sft_loss(self, batch: ContextBatch, num_items_in_batch: float):
        hidden = response_hidden_states(self.policy, batch)
        return nll_loss(hidden, lm_head_weight(self.model), batch.targets, batch.completion_mask,
                        num_items_in_batch=num_items_in_batch, bias=lm_head_bias(self.model), impl=self.config.impl)

    def sft_training_step(self) -> dict:
        """One optimizer step of the warm-up over ``sft_batch_size`` examples (global token normalization)."""
        cfg, optimizer = self.config, self._sft_optimizer()
        self._sft_snapshot = dict(sft_position=self.sft_position, rng=rng_state(), updated=False)
        pool = self.sft_examples
        examples = [pool[(self.sft_position + i) % len(pool)] for i in range(cfg.sft_batch_size)]
        self.sft_position += cfg.sft_batch_size
        mine = examples[self.accelerator.process_index::self.world]
        batches = [self.sft_batch(mine[i:i + cfg.micro_batch_size]) for i in range(0, len(mine),
                                                                                   cfg.micro_batch_size)]
        tokens = torch.tensor(float(sum(int(b.completion_mask.sum()) for b in batches)), device=self.accelerator.device)
        num_items = float(self.accelerator.reduce(tokens, reduction="sum")) if self.world > 1 else float(tokens)
        self.model.train()
        total, nll = 0.0, 0.0
        for i, batch in enumerate(batches):
            context = self.accelerator.no_sync(self.policy) if i < len(batches) - 1 else contextlib.nullcontext()
            with context:
                out = self.sft_loss(batch, max(num_items, 1.0))
                self.accelerator.backward(out.loss * self.world)
            total += float(out.loss.detach())
            nll += out.metrics["nll"] / len(batches)
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        skipped = self.nonfinite_update(total, grad_norm)  # the core's guard: no NaN reaches the weights
        if not skipped:
            optimizer.step()
        self._sft_snapshot["updated"] = True
        self.sft_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.check_nonfinite_streak(total, grad_norm, f"SFT step {self.sft_step + 1}")
        return {"sft/loss": total, "sft/nll": nll, "sft/grad_norm": float(grad_norm), "sft/tokens": num_items,
                "sft/nonfinite_skipped": int(skipped)}

    def train_sft(self) -> dict:
        cfg, last = self.config, {}
        while self.sft_step < cfg.sft_steps:
            last = self.sft_training_step()
            self.sft_step += 1
            self._sft_snapshot = None
            if self.is_main:
                self.sft_log.log(self.sft_step, last)
            if self.sft_step == cfg.sft_steps or (cfg.save_every and self.sft_step % cfg.save_every == 0):
                self.save_sft()
        self.sft_optimizer = self.sft_scheduler = None  # stage 2 has its own optimizer: free the moments
        return last

    def save_sft(self, rng=None):
        self.accelerator.wait_for_everyone()
        if self.is_main:
            save_checkpoint(self.sft_dir, self.sft_step, self.model, self.sft_optimizer, self.sft_scheduler,
                            dict(sft_position=self.sft_position, method=self.method, stage="sft",
                                 config=dataclasses.asdict(self.config)), rng=rng)

    # ----- resume ---------------------------------------------------------------------------------------
    def _resume(self):
        # Called by the core's constructor: deferred until stage 0 has read or written the EI data with the
        # initial weights (the base student of the difficulty filter).
        self._resume_requested = True

    def _resume_stages(self):
        """A stage-2 checkpoint wins (it holds the reference snapshot); else a stage-1 one continues the SFT."""
        if latest_checkpoint(self.config.output_dir) is not None:
            self.sft_step = self.config.sft_steps if self.runs_sft else 0
            if self.config.beta > 0:
                self.teacher = StageReference(self.model)  # overwritten by the checkpoint's snapshot
            Trainer._resume(self)
            return
        path = latest_checkpoint(self.sft_dir) if self.runs_sft else None
        if path is not None:
            self._sft_optimizer()
            state, _ = load_checkpoint(path, self.model, self.sft_optimizer, self.sft_scheduler)
            self.sft_step, self.sft_position = state["step"], state["sft_position"]
            if self.is_main:
                run_folder.truncate_metrics(self.sft_log.path, self.sft_step)

    # ----- the run --------------------------------------------------------------------------------------
    def _train(self) -> dict:
        cfg = self.config
        last = {}
        if self.runs_sft and self.sft_step < cfg.sft_steps:
            self._in_sft = True  # an emergency checkpoint of the core would claim a stage-2 step
            last = self.train_sft()
            self._in_sft = False
        if cfg.stage == "sft":
            final = self.evaluate() if cfg.eval_problems else {}
            if self.is_main and final:
                self.sft_log.log(self.sft_step, final)
            return dict(last, **final)
        if cfg.beta > 0 and self.teacher is None:
            self.teacher = StageReference(self.model)
        return super()._train()

    def _emergency_save(self, exc: BaseException):
        if not getattr(self, "_in_sft", False):
            return super()._emergency_save(exc)
        snapshot = getattr(self, "_sft_snapshot", None)
        if self.world > 1 or not self.is_main or snapshot is None or self.sft_optimizer is None:
            return None
        rng = None
        if not snapshot["updated"]:  # the failing SFT step had not changed the weights: record its start
            self.sft_position, rng = snapshot["sft_position"], snapshot["rng"]
        else:
            self.sft_step += 1
        try:
            self.save_sft(rng=rng)
        except Exception as error:  # the original exception is what the user must see
            print(f"pydistill: no emergency SFT checkpoint after {type(exc).__name__}: {error}", file=sys.stderr)
            return None
        print(f"pydistill: {type(exc).__name__} in SFT step {self.sft_step + 1}; saved the SFT stage at step "
              f"{self.sft_step} (resume with --resume true)", file=sys.stderr)

    # ----- stage 2 --------------------------------------------------------------------------------------
    def dialogue_probes(self, item: EIQuestion) -> list:
        """The k probes of this step's dialogues for ``item`` (fewer when fewer survived the filters), in a
        random order drawn from (seed, step, question) alone, so a resumed run draws the same."""
        rng = random.Random(f"{self.config.seed}:{self.step}:{item.qid}")
        return rng.sample(list(item.probes), min(self.config.num_probes, len(item.probes)))

    def rollout_dialogues(self, plans: Sequence[Sequence[str]]) -> list:
        """Sample every turn of every dialogue: ``plans[i]`` are the user turns of dialogue i; at turn j the
        student continues the exact token ids of dialogue i's first j turns and the next user message."""
        settings = dataclasses.replace(self.sampling, n=1)
        dialogues = [[] for _ in plans]
        for j in range(max(len(p) for p in plans)):
            live = [i for i, plan in enumerate(plans) if j < len(plan)]
            prompts = [self.builder.prompt_ids(dialogues[i], plans[i][j]) for i in live]
            out = self.engine.sample_ids(prompts, settings)
            for i, reply in zip(live, out.completion_ids):
                dialogues[i].append(Turn(plans[i][j], tuple(reply)))
        return dialogues

    def prepare(self, items: list) -> dict:
        cfg, g = self.config, self.config.num_generations
        plans, teacher_dialogues = [], []
        for item in items:
            probes = self.dialogue_probes(item)
            users = [probe_turn(p["probe"]) for p in probes] + [question_turn(item.problem.question)]
            partial = users[:min(cfg.partial_probes, len(probes) - 1)] + users[-1:]
            plans += [users] * g + [partial] * g  # scenario A then scenario B: the question's group of 2G
            replies = [p["probe_solution"] for p in probes] + [item.rationale]
            teacher_dialogues.append([Turn(u, self.reply_ids(r)) for u, r in zip(users, replies)])
        dialogues = self.rollout_dialogues(plans)
        problems = [item.problem for item in items for _ in range(2 * g)]
        finals = [self.tokenizer.decode(d[-1].reply_ids, skip_special_tokens=True) for d in dialogues]
        rewards, _ = self.reward(problems, finals, completion_ids=[d[-1].reply_ids for d in dialogues])
        rewards = torch.tensor(rewards, dtype=torch.float32).reshape(len(items), 2 * g)
        success = torch.tensor([float(self.task.is_correct(p, t)) for p, t in zip(problems, finals)])
        success = success.reshape(len(items), 2 * g)
        bonus = dialogue_structure_bonus(success[:, :g], success[:, g:], delta=cfg.dsu_delta, nu=cfg.dsu_nu)
        rewards[:, :g] += bonus
        rows = [self.builder.build(d) for d in dialogues]
        sft_rows = [self.builder.build(d) for d in teacher_dialogues] if cfg.sft_coef > 0 else []
        batch = dialogue_context_batch(rows + sft_rows, self.tokenizer.pad_token_id, self.accelerator.device)
        tokens = int(batch.completion_mask[:len(rows)].sum())
        return dict(batch=batch, rollout_rows=len(rows), rewards=rewards.reshape(-1), success=success, bonus=bonus,
                    dialogues=dialogues, teacher_dialogues=teacher_dialogues, tokens=tokens,
                    sft_tokens=int(batch.completion_mask[len(rows):].sum()), generated_tokens=tokens,
                    final_tokens=sum(len(d[-1].reply_ids) for d in dialogues) / len(dialogues))

    def finalize_batch(self, prepared: list) -> None:
        """Group advantages over each question's 2G rollouts, and the global SFT token count."""
        cfg = self.config
        advantages, zero_spread = step_advantages(self, [p["rewards"] for p in prepared],
                                                  2 * cfg.num_generations, cfg.scale_rewards)
        sft = torch.tensor(float(sum(p["sft_tokens"] for p in prepared)), device=self.accelerator.device)
        sft_items = float(self.accelerator.reduce(sft, reduction="sum")) if self.world > 1 else float(sft)
        for p, adv in zip(prepared, advantages):
            p["advantages"] = adv
            p["sft_items"] = max(sft_items, 1.0)
            g = cfg.num_generations
            p["metrics"] = dict(reward=float(p["rewards"].mean()), accuracy_full=float(p["success"][:, :g].mean()),
                                accuracy_partial=float(p["success"][:, g:].mean()),
                                dsu_bonus_questions=float((p["bonus"] > 0).any(dim=1).float().mean()),
                                zero_spread_fraction=zero_spread,
                                final_reply_tokens=p["final_tokens"],
                                dialogue_reply_tokens=p["tokens"] / p["rollout_rows"])

    def trained_masks(self, prepared: dict):
        """(GRPO mask, SFT mask), each [B, T] over all rows: the student's reply tokens of the rollouts, and the
        teacher's reply tokens of the teacher dialogues. With no KL and no entropy term a zero-advantage
        rollout's loss is exactly 0, so its tokens are left out of the op (they still count in the
        normalization)."""
        cfg, batch, rollouts = self.config, prepared["batch"], prepared["rollout_rows"]
        grpo, sft = batch.completion_mask.clone(), batch.completion_mask.clone()
        grpo[rollouts:] = False
        sft[:rollouts] = False
        if cfg.skip_zero_advantage and cfg.beta == 0 and cfg.entropy_coef == 0:
            grpo[:rollouts] &= (prepared["advantages"] != 0).to(grpo.device).unsqueeze(1)
        return grpo, sft

    def reference_logp(self, batch: ContextBatch, mask: torch.Tensor) -> torch.Tensor:
        """log pi_ref of the masked tokens [B, T], under the stage-2 reference weights."""
        with torch.no_grad(), self.teacher.weights():
            hidden = response_hidden_states(self.model, batch)
            logp, _, _ = sequence_token_stats(hidden, lm_head_weight(self.model), mask, targets=batch.targets,
                                              **op_options(bias=lm_head_bias(self.model), impl=self.config.impl))
        return logp

    def loss(self, prepared: dict, num_items_in_batch: float):
        """GRPO clipped surrogate (+ beta k3 KL) on the rollouts' reply tokens + sft_coef * NLL of the teacher
        dialogues' reply tokens, from one call of the fused op over the union of both masks."""
        cfg, batch, n = self.config, prepared["batch"], prepared["rollout_rows"]
        grpo_mask, sft_mask = self.trained_masks(prepared)
        rollouts = slice(0, n)
        ref_logp = self.reference_logp(_rows(batch, rollouts), grpo_mask[rollouts]) if cfg.beta > 0 else None
        hidden = response_hidden_states(self.policy, batch)
        logp, entropy, _ = sequence_token_stats(hidden, lm_head_weight(self.model), grpo_mask | sft_mask,
                                                targets=batch.targets,
                                                **op_options(bias=lm_head_bias(self.model), impl=cfg.impl))
        mask = grpo_mask[rollouts]
        advantages = prepared["advantages"].to(logp).unsqueeze(1).expand_as(logp[rollouts])
        per_token, stats = policy_gradient_per_token(
            logp[rollouts], entropy[rollouts], advantages, mask, ref_logp=ref_logp, beta=cfg.beta,
            epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
            importance_sampling_level=cfg.importance_sampling_level, entropy_coef=cfg.entropy_coef)
        policy = reduce_policy_loss(per_token, mask, cfg.loss_type,
                                    max_completion_length=cfg.max_new_tokens * (cfg.num_probes + 1),
                                    num_items_in_batch=num_items_in_batch)
        if cfg.loss_type in ("grpo", "dr_grpo"):  # sequence means: weigh by this micro-batch's share of rollouts
            policy = policy * n / (cfg.batch_size * 2 * cfg.num_generations)
        metrics = policy_metrics(stats, logp[rollouts], entropy[rollouts], mask)
        metrics["policy_loss"] = float(policy.detach())
        loss = policy
        if cfg.sft_coef > 0:
            teacher = slice(n, None)
            sft = reduce_tokens(-logp[teacher], sft_mask[teacher], "token_mean", prepared["sft_items"])
            loss = loss + cfg.sft_coef * sft
            metrics.update(sft_loss=float(sft.detach()), sft_nll=masked_mean(-logp[teacher].detach(),
                                                                              sft_mask[teacher]))
        return LossOutput(loss, metrics, dict(logp=logp.detach(), entropy=entropy.detach()))

    def trainer_state(self) -> dict:
        return dict(super().trainer_state(), sft_step=self.sft_step)


def probe_turn(probe: str) -> str:
    """A probe as a user turn, in the student's own prompt format."""
    return student_messages(probe)[0]["content"]


def question_turn(question: str) -> str:
    """The question as the dialogue's last user turn: exactly the single-pass inference prompt's content."""
    return student_messages(question)[0]["content"]


def ei_generate(task: str, *, split: str = "train", n: int = 64, seed: int = 0, data_path: Optional[str] = None,
                teacher: str = "SmolLM2-135M-Instruct", student: Optional[str] = None, cache: str,
                filters: bool = True, min_solved_fraction: float = 0.2, rules: str = "all",
                max_new_tokens: int = 256, batch_size: int = 16) -> FilterReport:
    """`pydistill ei generate`: stage 0 alone, into ``cache`` (the trainer reuses it with the same task, split,
    ``train_problems`` = n, seed and models). ``student`` (the base student of the difficulty filter) defaults
    to the teacher."""
    from ..tasks import get_task

    problems = get_task(task, **({"path": data_path} if task == "gsm8k" else {})).problems(split, n=n, seed=seed)
    procedural = teacher == "procedural"
    if procedural and student is None and filters:
        raise ValueError("the procedural teacher writes probes, it does not answer them as a student: name the "
                         "base student of the difficulty filter (--student) or turn the filters off")
    student = student or teacher
    teacher_gen = ProceduralTeacher(seed) if procedural else text_generator(
        teacher, max_new_tokens=max_new_tokens, batch_size=batch_size)
    student_gen = teacher_gen if student == teacher else text_generator(student, max_new_tokens=max_new_tokens,
                                                                        batch_size=batch_size)
    teacher = f"procedural:{seed}" if procedural else teacher  # the name the trainer gives the cache
    _, report = build_ei_dataset(problems, teacher_gen, student_gen, cache, rules=parse_rules(rules),
                                 filters=filters, min_solved_fraction=min_solved_fraction, batch_size=batch_size,
                                 teacher_name=teacher, student_name=student)
    return report


def text_generator(name: str, *, max_new_tokens: int, batch_size: int) -> TextGenerator:
    """A model by name as a lazy ``prompts -> texts`` generator (greedy, chat template)."""
    return ModelTextGenerator(name, max_new_tokens=max_new_tokens, batch_size=batch_size)
