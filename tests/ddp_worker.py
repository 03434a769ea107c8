"""One process of the 2-process agreement test: one OPSD step on a tiny model; saves the gradients the
optimizer receives (after DDP's all-reduce and clipping). Gradients, not updated weights: Adam turns a
rounding-level gradient into a full-size step, which would hide agreement behind noise."""
import sys

import torch

from pydistill.models import tiny_model
from pydistill.trainers import OPSDTrainer
from tests.ranks import finish_worker
from tests.trainer_helpers import TASK, ScriptedEngine, tiny_config


def main(out_path, run_dir):
    import pathlib

    model, tok = tiny_model(seed=0)
    cfg = tiny_config(pathlib.Path(run_dir), max_steps=1, batch_size=4, micro_batch_size=2, learning_rate=1e-2,
                      divergence="jsd", clip=None, overwrite=True)  # overwrite: a repeated attempt (tests.ranks)
    with torch.no_grad():  # a student away from its teacher, so the step has a real gradient
        torch.manual_seed(1)
        for p in model.parameters():
            p.mul_(1 + 0.3 * torch.randn_like(p))
    trainer = OPSDTrainer(cfg, model=model, tokenizer=tok, task=TASK, rollout_engine=ScriptedEngine(tok))
    trainer.teacher.copy.load_state_dict(tiny_model(seed=0)[0].state_dict())
    named = list(trainer.model.named_parameters())
    grads = {}
    trainer.optimizer.step = lambda *a, **k: grads.update({n: p.grad.detach().clone() for n, p in named})
    metrics = trainer.training_step()
    if trainer.is_main:
        torch.save(dict(state=grads, loss=metrics["loss"], world=trainer.world), out_path)
    finish_worker()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
