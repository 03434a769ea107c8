"""The SFT trainer: fused NLL of the reference solution's tokens after the student prompt, plus (with
``teacher_cache``) the divergence to a cached top-k teacher on the same tokens."""
from __future__ import annotations

from ...losses import LossOutput, distillation_loss, nll_loss
from ...prompts import render, student_messages
from ...teachers import load_teacher_cache, stack_topk
from ...boundary import read_head
from ..contexts import build_context_batch, head_options, response_hidden_states
from ..core import Trainer


class SFTTrainer(Trainer):
    method = "sft"

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.teacher_cache = None
        if config.teacher_cache is not None:
            try:  # every training row checked once, before any step: a mismatched cache fails here
                self.teacher_cache = load_teacher_cache(config.teacher_cache)
                self.cache_rows(self.train_pool)
            except BaseException:
                self.close()
                raise

    def uses_teacher(self) -> bool:
        return False  # a cached teacher holds no weights here

    def answer_ids(self, problems: list) -> list:
        tok = self.tokenizer
        return [tok(p.solution.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for p in problems]

    def cache_rows(self, problems: list) -> list:
        """The cache row of each problem (its dataset row), each checked to score exactly the tokens trained on."""
        cache, where = self.teacher_cache, f"teacher_cache {self.config.teacher_cache!r}"
        rows = []
        for problem, answer in zip(problems, self.answer_ids(problems)):
            row = problem.meta.get("index")
            if row is None:
                raise ValueError(f"{where}: the task's problems carry no dataset row; a teacher cache needs "
                                 "--dataset, the data the cache scored")
            if not row < len(cache):
                raise ValueError(f"{where} holds {len(cache)} examples but the dataset has row {row}: it was built "
                                 "from other data")
            scored = cache[row].response_ids.tolist()
            if scored != answer:
                raise ValueError(f"{where} row {row} scores {len(scored)} response tokens that are not the "
                                 f"{len(answer)} trained on (other data, another tokenizer or response column)")
            rows.append(row)
        return rows

    def prepare(self, problems: list) -> dict:
        tok = self.tokenizer
        prompts = [tok(render(tok, student_messages(p.question)), add_special_tokens=False)["input_ids"]
                   for p in problems]
        batch = build_context_batch(prompts, self.answer_ids(problems), tok.pad_token_id, self.accelerator.device)
        prepared = dict(batch=batch, tokens=int(batch.completion_mask.sum()), generated_tokens=0)
        if self.teacher_cache is not None:  # [B, T, k] in the completion layout of the batch
            teachers = [self.teacher_cache[row] for row in self.cache_rows(problems)]
            prepared["topk"] = stack_topk(teachers, length=batch.targets.shape[1], device=batch.targets.device)
        return prepared

    def loss(self, prepared: dict, num_items_in_batch: float):
        cfg, batch = self.config, prepared["batch"]
        head = read_head(self.model)  # once per step: under FSDP2 each read gathers the head's shards
        hidden = response_hidden_states(self.policy, batch, head)
        common = dict(num_items_in_batch=num_items_in_batch, impl=cfg.impl, memory_budget_mb=cfg.memory_budget_mb,
                      **head_options(head))
        weight = head.weight
        w = cfg.distillation_weight if self.teacher_cache is not None else 0.0
        if w == 0:
            return nll_loss(hidden, weight, batch.targets, batch.completion_mask, **common)
        ids, logprobs = prepared["topk"]
        # the student at the temperature the cache's teacher was scored at (GKD: one temperature for both)
        distill = distillation_loss(hidden, weight, None, batch.completion_mask, teacher_topk_ids=ids,
                                    teacher_topk_logprobs=logprobs, topk_tail=cfg.topk_tail,
                                    divergence=cfg.divergence, beta=cfg.beta,
                                    temperature=float(self.teacher_cache.meta["temperature"]), **common)
        if w == 1:
            return distill
        nll = nll_loss(hidden, weight, batch.targets, batch.completion_mask, **common)
        return LossOutput((1 - w) * nll.loss + w * distill.loss, dict(distill.metrics, nll=nll.metrics["nll"]),
                          dict(distill.per_token, logp=nll.per_token["logp"]))
