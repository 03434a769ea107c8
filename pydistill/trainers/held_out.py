"""Held-out evaluation during training, shared out over the processes (a part of :class:`~.core.Trainer`)."""
from __future__ import annotations

from ..diversity import group_diversity
from ..evaluation import EvalResult, evaluate


class HeldOutEvaluation:
    """The trainer's :meth:`evaluate`; uses the trainer's config, model, tokenizer, task, accelerator, eval set,
    process count (``world``), ``is_main`` (the one process that draws progress bars), ``sharded`` flag and
    ``root_view``."""

    def evaluate(self, problems=None) -> dict:
        """Greedy accuracy (eval/accuracy); with ``eval_samples`` > 1 also a sampled evaluation of that many
        completions per problem: eval/pass@k for k in {1, 2, 4, 8} up to ``eval_samples``, and the diversity
        of each problem's samples (eval/distinct_answers, eval/distinct_2grams).

        Under several processes each evaluates a contiguous share of the problems and the per-problem records
        are gathered (``gather_for_metrics``), so every process returns the metrics of the whole set."""
        cfg, problems = self.config, problems or self.eval_set
        result = self._sharded_evaluate(problems)
        metrics = result.as_metrics()
        if cfg.eval_samples > 1:
            sampled = self._sharded_evaluate(problems, greedy=False, n_samples=cfg.eval_samples,
                                             temperature=cfg.eval_temperature)
            metrics.update({f"eval/pass@{k}": v for k, v in sampled.pass_at_k.items()})
            metrics["eval/sampled_accuracy"] = sampled.accuracy
            texts = [c for record in sampled.records for c in record["completions"]]
            metrics.update(group_diversity(texts, cfg.eval_samples, prefix="eval/"))
        return metrics

    def _sharded_evaluate(self, problems, **options) -> EvalResult:
        cfg = self.config
        with self.accelerator.split_between_processes(list(problems)) as mine:
            mine = list(mine)
        count = len(mine)
        if self.sharded:  # equal shares (padded with a repeat, dropped below): generation runs in lock step
            longest = -(-len(problems) // self.world)
            mine += [problems[-1]] * (longest - count)
        with self.accelerator.autocast(), self.root_view():
            local = evaluate(self.model, self.tokenizer, self.task, mine, batch_size=max(cfg.micro_batch_size, 8),
                             max_new_tokens=cfg.eval_max_new_tokens, progress=cfg.progress and self.is_main,
                             synced_gpus=self.sharded, **options)
        if self.world == 1:
            return local
        records = self.accelerator.gather_for_metrics(local.records[:count], use_gather_object=True)
        return EvalResult.from_records(records, options.get("n_samples", 1))
