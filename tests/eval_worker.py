"""One process of the sharded-evaluation test: evaluates 7 held-out problems (greedy, then 2 samples each) with a
verifier that depends on the problem only, and saves the gathered metrics and how many problems this process
generated for."""
import sys

import torch

import pydistill.trainers.held_out as held_out
from pydistill.models import tiny_model
from pydistill.tasks import ArithmeticTask
from pydistill.trainers import OPSDTrainer
from tests.ranks import finish_worker
from tests.trainer_helpers import ScriptedEngine, tiny_config


class EvenAnswers(ArithmeticTask):
    """Correct exactly when the reference answer is even: the metrics do not depend on what was generated."""

    def is_correct(self, problem, completion):
        return int(problem.answer) % 2 == 0


def main(out_path, run_dir):
    import pathlib

    seen = []
    original = held_out.evaluate

    def counting(model, tokenizer, task, problems, **kwargs):
        seen.append(len(problems))
        return original(model, tokenizer, task, problems, **kwargs)

    held_out.evaluate = counting
    model, tok = tiny_model(seed=0)
    cfg = tiny_config(pathlib.Path(run_dir), eval_problems=7, eval_samples=2, eval_max_new_tokens=3,
                      batch_size=4, micro_batch_size=2,
                      overwrite=True)  # a repeated attempt (tests.ranks) starts clean
    trainer = OPSDTrainer(cfg, model=model, tokenizer=tok, task=EvenAnswers(), rollout_engine=ScriptedEngine(tok))
    metrics = trainer.evaluate()
    expected = sum(int(p.answer) % 2 == 0 for p in trainer.eval_set) / len(trainer.eval_set)
    torch.save(dict(metrics=metrics, seen=seen, expected=expected, world=trainer.world),
               f"{out_path}.{trainer.accelerator.process_index}")
    finish_worker()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
