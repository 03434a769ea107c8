"""One process of the 2-process TRL test: trains TRL's GRPOTrainer and pydistill's, 2 steps each, under DDP
(gloo, through accelerate), and saves both runs' losses and pre-step gradients from rank 0."""
import pathlib
import sys

import torch


def main(out_path, run_dir):
    import trl

    from pydistill.integrations.trl import GRPOTrainer
    from tests.ranks import finish_worker
    from tests.trl_helpers import run_grpo

    torch.set_num_threads(1)
    runs = {}
    for name, cls in (("trl", trl.GRPOTrainer), ("ours", GRPOTrainer)):
        losses, grads, trainer = run_grpo(cls, pathlib.Path(run_dir) / name, forbid_logits=name == "ours",
                                          per_device_train_batch_size=4, entropy_coef=0.01)
        runs[name] = dict(losses=losses, grads=grads, world=trainer.accelerator.num_processes,
                          wrapped=type(trainer.model_wrapped).__name__)
    if trainer.accelerator.is_main_process:
        torch.save(runs, out_path)
    finish_worker()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
