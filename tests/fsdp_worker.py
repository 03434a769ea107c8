"""One process of the FSDP test: the trainer's policy sharded with torch's FSDP2 the way accelerate's FSDP2
preparation shards it (each decoder layer, then the root), on the CPU where accelerate itself runs only DDP.
Saves the gradients of one OPSD step (gathered from the shards) and a held-out evaluation's metrics; with a
third argument ``train``/``resume``, trains one real step and checkpoints it, or resumes that run for one more."""
import os
import sys

import torch

import pydistill.trainers.core as core
from pydistill.models import tiny_model
from pydistill.trainers import OPSDTrainer
from tests.eval_worker import EvenAnswers
from tests.ranks import finish_worker
from tests.trainer_helpers import ScriptedEngine, tiny_config


def shard_like_accelerate(accelerator):
    """Replace ``accelerator.prepare`` by FSDP2's fully_shard over the decoder layers and the root module."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def prepare(policy, optimizer):
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        before = {id(p): name for name, p in policy.named_parameters()}
        for layer in policy.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(policy, mesh=mesh)
        # fully_shard replaces each parameter by a sharded one: point the optimizer at those, as accelerate does
        after = dict(policy.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [after[before[id(p)]] for p in group["params"]]
        return policy, optimizer

    accelerator.prepare = prepare
    return accelerator


def main(out_path, run_dir, mode="gradients"):
    import pathlib

    sharded = "WORLD_SIZE" in os.environ
    if sharded:
        make = core.make_accelerator

        def sharding_accelerator(config, full_finetune):
            accelerator, precision = make(config, full_finetune)
            return shard_like_accelerate(accelerator), precision

        core.make_accelerator = sharding_accelerator
        core.uses_sharded_parameters = lambda accelerator: True
    model, tok = tiny_model(seed=0)
    with torch.no_grad():  # a student away from its teacher (the initial weights), so the step has a gradient
        torch.manual_seed(1)
        for p in model.parameters():
            p.mul_(1 + 0.3 * torch.randn_like(p))
    if mode != "gradients":
        return checkpoint_run(model, tok, pathlib.Path(run_dir), sharded, resume=mode == "resume")
    cfg = tiny_config(pathlib.Path(run_dir), max_steps=1, batch_size=4, micro_batch_size=2, learning_rate=1e-2,
                      divergence="jsd", clip=None, eval_problems=3, eval_max_new_tokens=4,
                      overwrite=True)  # a repeated attempt (tests.ranks) starts clean
    trainer = OPSDTrainer(cfg, model=model, tokenizer=tok, task=EvenAnswers(), rollout_engine=ScriptedEngine(tok))
    trainer.teacher.copy.load_state_dict(tiny_model(seed=0)[0].state_dict())
    assert trainer.sharded == sharded
    grads = {}

    def capture(*args, **kwargs):
        for name, p in trainer.model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = g.detach().clone()

    trainer.optimizer.step = capture
    metrics = trainer.training_step()
    evaluation = trainer.evaluate()
    if trainer.is_main:
        torch.save(dict(state=grads, loss=metrics["loss"], world=trainer.world, eval=evaluation), out_path)
    finish_worker()


def checkpoint_run(model, tok, run_dir, sharded, resume):
    """One step and a checkpoint (with its save_pretrained folder), or the resumed run's second step."""
    cfg = tiny_config(run_dir, max_steps=2 if resume else 1, batch_size=4, micro_batch_size=2, learning_rate=1e-2,
                      divergence="jsd", clip=None, resume=resume, save_pretrained=True,
                      overwrite=not resume)  # a repeated attempt (tests.ranks) starts clean
    trainer = OPSDTrainer(cfg, model=model, tokenizer=tok, task=EvenAnswers(), rollout_engine=ScriptedEngine(tok))
    trainer.teacher.copy.load_state_dict(tiny_model(seed=0)[0].state_dict())
    assert trainer.sharded == sharded
    trainer.train()
    finish_worker()


if __name__ == "__main__":
    main(*sys.argv[1:])
