"""The ExGRPO trainer: stage 0's data, the SFT warm-up, then GRPO over k-turn dialogues with the DSU bonus and
the auxiliary SFT loss (see the package docstring)."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from typing import Optional, Sequence

import torch

from ...losses import LossOutput, grpo_loss, nll_loss
from ...rewards import dialogue_structure_bonus
from .. import run_folder
from ..checkpoint import clean_stale, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from ...boundary import read_head
from ..contexts import ContextBatch, head_options, response_hidden_states
from ..core import Trainer
from ..groups import reward_function, step_advantages
from ..metrics import MetricsLog
from ..rollout import HFRolloutEngine
from .config import ExGRPOConfig, parse_rules
from .dialogue import DialogueBuilder, Turn, context_rows, dialogue_context_batch, probe_turn, question_turn
from .ei_data import EIQuestion, ModelTextGenerator, TextGenerator, build_ei_dataset, refuse_generation
from .ei_procedural import ProceduralTeacher
from .explanatory_inversion import FilterReport
from .reference import StageReference


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
            kept, report = build_ei_dataset(problems, refuse_generation, refuse_generation, cache, **options)
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
        head = read_head(self.model)
        hidden = response_hidden_states(self.policy, batch, head)
        return nll_loss(hidden, head.weight, batch.targets, batch.completion_mask,
                        num_items_in_batch=num_items_in_batch, memory_budget_mb=self.config.memory_budget_mb,
                        impl=self.config.impl, **head_options(head))

    def sft_training_step(self) -> dict:
        """One optimizer step of the warm-up over ``sft_batch_size`` examples, through the core's
        :meth:`~pydistill.trainers.core.Trainer.optimizer_step` (global token normalization, autocast, the model
        view, the non-finite and empty-step guards) with the warm-up's own optimizer and schedule."""
        cfg, optimizer = self.config, self._sft_optimizer()
        # What an emergency checkpoint of the warm-up records if this step dies before its update.
        self._step_snapshot = dict(sft_position=self.sft_position, rng=rng_state(), updated=False)
        pool = self.sft_examples
        examples = [pool[(self.sft_position + i) % len(pool)] for i in range(cfg.sft_batch_size)]
        self.sft_position += cfg.sft_batch_size
        mine = examples[self.accelerator.process_index::self.world]
        prepared = []
        for i in range(0, len(mine), cfg.micro_batch_size):
            batch = self.sft_batch(mine[i:i + cfg.micro_batch_size])
            prepared.append(dict(batch=batch, tokens=int(batch.completion_mask.sum())))
        out = self.optimizer_step(prepared, lambda p, num_items: self.sft_loss(p["batch"], num_items), optimizer,
                                  self.sft_scheduler, f"SFT step {self.sft_step + 1}")
        return {"sft/loss": out["loss"], "sft/nll": out["nll"], "sft/grad_norm": out["grad_norm"],
                "sft/tokens": out["trained_tokens"], "sft/nonfinite_skipped": out["nonfinite_skipped"]}

    def train_sft(self) -> dict:
        cfg, last = self.config, {}
        while self.sft_step < cfg.sft_steps:
            last = self.sft_training_step()
            self.sft_step += 1
            self._step_snapshot = None
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
                                 config=dataclasses.asdict(self.config)), rng=rng, keep=self.config.save_total_limit)

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
        snapshot = self._step_snapshot
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
            head = read_head(self.model)  # the reference's head
            hidden = response_hidden_states(self.model, batch, head)
            scored = nll_loss(hidden, head.weight, batch.targets, mask, memory_budget_mb=self.config.memory_budget_mb,
                              impl=self.config.impl, **head_options(head))
        return scored.per_token["logp"]

    def loss(self, prepared: dict, num_items_in_batch: float):
        """:func:`~pydistill.losses.grpo_loss` (clipped surrogate, + beta k3 KL, - TRL's entropy bonus) on the
        rollouts' reply tokens + sft_coef * :func:`~pydistill.losses.nll_loss` of the teacher dialogues' reply
        tokens, both from one forward of the policy over every row."""
        cfg, batch, n = self.config, prepared["batch"], prepared["rollout_rows"]
        grpo_mask, sft_mask = self.trained_masks(prepared)
        rollouts, teacher = slice(0, n), slice(n, None)
        ref_logp = self.reference_logp(context_rows(batch, rollouts), grpo_mask[rollouts]) if cfg.beta > 0 else None
        head = read_head(self.model)
        hidden = response_hidden_states(self.policy, batch, head)
        # Both gradient bases live until the backward: the op's budget is shared in proportion to the tokens.
        counts = (int(grpo_mask.sum()), int(sft_mask.sum()))
        budgets = [cfg.memory_budget_mb * max(c, 1) / max(sum(counts), 1) for c in counts]
        out = grpo_loss(hidden[rollouts], head.weight, batch.targets[rollouts], prepared["advantages"],
                        grpo_mask[rollouts],
                        ref_logp=ref_logp, beta=cfg.beta, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                        delta=cfg.delta, importance_sampling_level=cfg.importance_sampling_level,
                        loss_type=cfg.loss_type, max_completion_length=cfg.max_new_tokens * (cfg.num_probes + 1),
                        num_items_in_batch=num_items_in_batch, entropy_coef=cfg.entropy_coef,
                        memory_budget_mb=budgets[0], impl=cfg.impl, **head_options(head))
        policy = out.loss
        if cfg.loss_type in ("grpo", "dr_grpo"):  # sequence means: weigh by this micro-batch's share of rollouts
            policy = policy * n / (cfg.batch_size * 2 * cfg.num_generations)
        metrics = dict(out.metrics, policy_loss=float(policy.detach()))
        loss = policy
        if cfg.sft_coef > 0:
            sft = nll_loss(hidden[teacher], head.weight, batch.targets[teacher], sft_mask[teacher],
                           num_items_in_batch=prepared["sft_items"], memory_budget_mb=budgets[1],
                           impl=self.config.impl, **head_options(head))
            loss = loss + cfg.sft_coef * sft.loss
            metrics.update(sft_loss=float(sft.loss.detach()), sft_nll=sft.metrics["nll"])
        return LossOutput(loss, metrics, out.per_token)

    def trainer_state(self) -> dict:
        return dict(super().trainer_state(), sft_step=self.sft_step)
