"""The ROSD trainer: the group selection, the reflector's first error, the sibling-conditioned teacher."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ...losses import distillation_loss, first_error_mask
from ...prompts import render, rosd_teacher_messages
from ...tasks import derives_answer
from ...boundary import read_head
from ..contexts import build_context_batch, head_options, response_hidden_states, teacher_head
from ..config import loss_temperature
from ..core import Trainer
from ..groups import completion_length_metrics, reward_function, sample_groups
from ..rollout import SamplingSettings
from ..teacher import served_teacher
from .config import ROSDConfig
from .reflection import ModelReflector, StepCheckReflector, first_error_token_index


class GroupSelection(NamedTuple):
    pairs: list  # (rollout index, sibling index or None) of every kept rollout, in rollout order
    zero_spread: int  # groups whose rollouts are all correct or all incorrect
    dropped: int  # groups left out (no success, or zero spread with drop_zero_spread)
    skipped: int  # prompts without any successful rollout


def select_siblings(correct: torch.Tensor, drop_zero_spread: bool = True) -> GroupSelection:
    """Which rollouts ROSD trains on and the correct sibling of each; ``correct`` is [B, G] bool.

    See the package docstring for the rule (incorrect rollouts take the successes in turn; a correct one the
    next other success, or None when it is the only one: never itself)."""
    if correct.dim() != 2:
        raise ValueError(f"correct must be [B, G], got {tuple(correct.shape)}")
    pairs, zero_spread, dropped, skipped = [], 0, 0, 0
    b, g = correct.shape
    for group in range(b):
        flags = [bool(x) for x in correct[group]]
        successes = [j for j in range(g) if flags[j]]
        spread_zero = len(successes) in (0, g)
        zero_spread += spread_zero
        if not successes:
            skipped += 1
            dropped += 1
            continue
        if spread_zero and drop_zero_spread:
            dropped += 1
            continue
        wrong_seen = 0
        for j in range(g):
            if flags[j]:
                others = [c for c in successes if c > j] + [c for c in successes if c < j]
                sibling = group * g + others[0] if others else None
            else:
                sibling = group * g + successes[wrong_seen % len(successes)]
                wrong_seen += 1
            pairs.append((group * g + j, sibling))
    return GroupSelection(pairs, zero_spread, dropped, skipped)


class ROSDTrainer(Trainer):
    method = "rosd"

    @property
    def supports_sharded_parameters(self) -> bool:
        # the model reflector prompts a data-dependent number of rollouts per process
        return self.config.reflector != "model"

    def __init__(self, config: ROSDConfig, *args, reflector=None, **kwargs):
        """``reflector``: any object with ``reflect_batch(items) -> list[Reflection]`` (see
        :mod:`pydistill.trainers.rosd.reflection`); it replaces the one ``config.reflector`` names."""
        super().__init__(config, *args, **kwargs)
        # ROSD's binary verifier reward
        self.reward = reward_function(self.task, "accuracy", max_failures=self.config.max_reward_failures)
        self.reflector = reflector or self._default_reflector()

    def uses_teacher(self) -> bool:
        return self.config.teacher_url is None  # a served teacher holds no weights here

    def _default_reflector(self):
        cfg = self.config
        if cfg.reflector == "step_check":
            return StepCheckReflector(self.task)
        settings = SamplingSettings(cfg.reflection_max_new_tokens, cfg.reflection_temperature, 1.0, 0, 1)

        def generate(prompts):  # the student itself, through the rollout engine
            return self.engine.sample(prompts, settings).texts

        return ModelReflector(generate, render=lambda text: render(self.tokenizer, [{"role": "user",
                                                                                      "content": text}]))

    def prepare(self, problems: list) -> dict:
        cfg, tok = self.config, self.tokenizer
        batch = sample_groups(self, problems, self.reward)
        rollouts, correct = batch.rollouts, batch.correct
        selection = select_siblings(correct.reshape(-1, cfg.num_generations), cfg.drop_zero_spread)
        shown = [self.privileged_text(batch.problems[i], i, s, rollouts.texts, correct) for i, s in selection.pairs]
        items = [dict(problem=batch.problems[i], question=batch.problems[i].question,
                      correct_solution=text, attempt=rollouts.texts[i],
                      answer=batch.problems[i].answer, attempt_is_correct=bool(correct[i]))
                 for (i, _), text in zip(selection.pairs, shown)]
        reflections = self.reflector.reflect_batch(items) if items else []
        if len(reflections) != len(items):
            raise ValueError(f"the reflector returned {len(reflections)} reflections for {len(items)} rollouts")
        counts = dict(parse_failures=0, quote_missing=0, quote_not_found=0, located=0, incorrect=0, uninformative=0)
        t_stars, teacher_ids, silent = [], [], []
        for (i, _), reflection, solution in zip(selection.pairs, reflections, shown):
            counts["parse_failures"] += not reflection.parsed
            t_star = 0  # correct rollouts, and every fallback, distill the whole rollout
            if not correct[i]:
                counts["incorrect"] += 1
                if reflection.parsed and reflection.quote is None:
                    counts["quote_missing"] += 1
                elif reflection.quote is not None:
                    found = first_error_token_index(tok, rollouts.completion_ids[i], reflection.quote)
                    if found is None:
                        counts["quote_not_found"] += 1
                    else:
                        counts["located"] += 1
                        t_star = found if cfg.loss_span == "suffix" else 0
            t_stars.append(t_star)
            question = batch.problems[i].question
            explanation = reflection.explanation if cfg.explanation else None
            # A teacher context with neither a solution nor a reflection is the problem alone: nothing to distill
            # toward (the authors' self_distillation_mask). Correct rollouts optionally left out too.
            no_signal = not solution and not explanation
            counts["uninformative"] += no_signal
            silent.append(no_signal or (bool(correct[i]) and not cfg.distill_correct_rollouts))
            prompt = render(tok, rosd_teacher_messages(question, solution, explanation,
                                                       task_solution=solution is batch.problems[i].solution))
            teacher_ids.append(tok(prompt, add_special_tokens=False)["input_ids"])

        device = self.accelerator.device
        kept = [i for i, _ in selection.pairs]
        if kept:
            completions = [rollouts.completion_ids[i] for i in kept]
            student = build_context_batch([rollouts.prompt_ids[i] for i in kept], completions, tok.pad_token_id,
                                          device)
            teacher = build_context_batch(teacher_ids, completions, tok.pad_token_id, device)
            mask = first_error_mask(torch.tensor(t_stars, device=device), student.completion_mask)
            mask = mask & ~torch.tensor(silent, device=device).unsqueeze(1)
        else:
            # Every group dropped: one row with an empty mask keeps the step uniform (a forward, a zero loss,
            # zero gradients) so that gradient accumulation and DDP need no special case.
            student = build_context_batch(rollouts.prompt_ids[:1], rollouts.completion_ids[:1], tok.pad_token_id,
                                          device)
            teacher, mask = None, torch.zeros_like(student.completion_mask)
        generated = sum(len(c) for c in rollouts.completion_ids)
        counts.update(groups=len(problems), zero_spread=selection.zero_spread, dropped=selection.dropped,
                      skipped=selection.skipped, kept=len(kept),
                      kept_tokens=int(student.completion_mask.sum()) if kept else 0, distilled=int(mask.sum()))
        metrics = dict(reward=float(batch.rewards.mean()), accuracy=float(correct.float().mean()),
                       **completion_length_metrics(batch))
        return dict(student=student, teacher=teacher, mask=mask, t_star=t_stars, pairs=selection.pairs,
                    reflections=reflections, counts=counts, tokens=int(mask.sum()), generated_tokens=generated,
                    metrics=metrics)

    def privileged_text(self, problem, index: int, sibling, texts: list, correct: torch.Tensor):
        """The correct solution the teacher context of rollout ``index`` shows (``privileged``): its sibling, the
        worked solution, or (``derived_sibling``) the first success of its group, from the sibling on and never the
        rollout itself, that derives the answer in checked arithmetic, else the worked solution when the task has one.
        None (no solution section) for a sole success under "sibling": never the rollout itself."""
        mode = self.config.privileged
        if mode == "solution":
            return problem.solution
        if sibling is None and mode == "sibling":
            return None
        g = self.config.num_generations
        start = index - index % g
        sibling = index if sibling is None else sibling
        if mode == "sibling":
            return texts[sibling]
        order = [j for j in range(sibling, start + g)] + [j for j in range(start, sibling)]
        for j in order:
            if j != index and bool(correct[j]) and derives_answer(texts[j], problem.answer):
                return texts[j]
        return problem.solution or (texts[sibling] if sibling != index else None)

    def finalize_batch(self, prepared: list) -> None:
        """Counts over the optimizer step's micro-batches, written into each one's metrics (the core averages
        metrics over micro-batches, so identical values log the batch total)."""
        total = {k: sum(p["counts"][k] for p in prepared) for k in prepared[0]["counts"]}

        def share(part: str, whole: str) -> float:
            return total[part] / total[whole] if total[whole] else 0.0

        step = dict(reflection_parse_failures=total["parse_failures"], quote_missing=total["quote_missing"],
                    quote_not_found=total["quote_not_found"], first_error_located=total["located"],
                    first_error_fallback_rate=1.0 - share("located", "incorrect") if total["incorrect"] else 0.0,
                    zero_spread_fraction=share("zero_spread", "groups"), groups_dropped=total["dropped"],
                    groups_dropped_fraction=share("dropped", "groups"), prompts_skipped=total["skipped"],
                    prompts_skipped_fraction=share("skipped", "groups"), kept_rollouts=total["kept"],
                    distilled_tokens=total["distilled"],
                    distilled_token_fraction=share("distilled", "kept_tokens"),
                    uninformative_rollouts=total["uninformative"])
        for p in prepared:
            p["metrics"] = dict(p["metrics"], **step)

    def loss(self, prepared: dict, num_items_in_batch: float):
        cfg = self.config
        student, teacher, mask = prepared["student"], prepared["teacher"], prepared["mask"]
        head = read_head(self.model)  # once per step: under FSDP2 each read gathers the head's shards
        hidden = response_hidden_states(self.policy, student, head)
        served, topk = served_teacher(self, loss_temperature(cfg)), {}
        if teacher is None:  # nothing to distill: no row reaches the op, the loss is an exact 0
            teacher_hidden, t_head = hidden.detach(), None
        elif served is not None:  # the same teacher context, scored by the server: its top-k and a tail
            teacher_hidden, t_head = None, None
            topk["teacher_topk_ids"], topk["teacher_topk_logprobs"] = served.topk(teacher)
        else:
            t_head = teacher_head(self.teacher)
            teacher_hidden = self.teacher.hidden_states(teacher, t_head or head)
        return distillation_loss(hidden, head.weight, teacher_hidden, mask, divergence=cfg.divergence, beta=cfg.beta,
                                 clip=cfg.clip, temperature=loss_temperature(cfg), targets=student.targets,
                                 importance_clip=cfg.importance_clip, **topk,
                                 support_topk=cfg.support_topk if teacher is not None else None,
                                 num_items_in_batch=num_items_in_batch, impl=cfg.impl,
                                 memory_budget_mb=cfg.memory_budget_mb, **head_options(head, t_head))
