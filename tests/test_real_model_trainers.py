"""Every group-rollout trainer on the real embedded SmolLM2-135M-Instruct for a couple of steps (slow)."""
import pytest
import torch

from pydistill.trainers import TRAINERS

SMALL = dict(model="SmolLM2-135M-Instruct", task="arithmetic", lora_r=8, lora_alpha=16, max_steps=2, batch_size=2,
             micro_batch_size=2, num_generations=4, max_new_tokens=24, eval_problems=4, eval_max_new_tokens=24,
             learning_rate=5e-5, progress=False, train_problems=8)


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("grpo", dict(beta=0.04)),
    ("rosd", dict(warmup_steps=0)),
    ("rosd", dict(warmup_steps=0, reflector="model", reflection_max_new_tokens=48)),
    ("fd", dict(eval_samples=2)),
    ("fd", dict(feedback="critic", critic_max_new_tokens=32, distillation_weight=0.5, eval_samples=0)),
    ("sft", dict(num_generations=1)),
])
def test_two_steps_on_smollm2(tmp_path, method, extra):
    config_cls, trainer_cls = TRAINERS[method]
    config = config_cls(**dict(SMALL, output_dir=str(tmp_path / method), **extra))
    trainer = trainer_cls(config)
    summary = trainer.train()
    assert trainer.step == 2
    assert torch.isfinite(torch.tensor(summary["loss"])) and "eval/accuracy" in summary
