"""A tiny model, a tiny task and a deterministic rollout engine for trainer tests."""
from __future__ import annotations

from pydistill.tasks import ArithmeticTask
from pydistill.trainers import OPSDConfig
from pydistill.trainers.rollout import Rollouts


class ScriptedEngine:
    """Deterministic rollouts: each prompt's completion is a fixed text chosen by the prompt's length."""

    def __init__(self, tokenizer, texts=("3 + 4 = 7. The answer is 7.", "5 * 2 = 11. The answer is 11.")):
        self.tokenizer = tokenizer
        self.texts = texts

    def sample(self, prompts, settings):
        repeated = [p for p in prompts for _ in range(settings.n)]
        tok = self.tokenizer
        ids = [tok(self.texts[len(p) % len(self.texts)], add_special_tokens=False)["input_ids"][:settings.max_new_tokens]
               + [tok.eos_token_id] for p in repeated]
        return Rollouts(repeated, [tok(p, add_special_tokens=False)["input_ids"] for p in repeated], ids,
                        [tok.decode(i, skip_special_tokens=True) for i in ids])


def tiny_config(tmp_path, **overrides):
    values = dict(model="tiny", lora_r=0, max_steps=2, batch_size=4, micro_batch_size=2, max_new_tokens=10,
                  eval_problems=0, output_dir=str(tmp_path / "run"), learning_rate=5e-3, progress=False,
                  train_problems=16, max_grad_norm=1.0)
    values.update(overrides)
    return OPSDConfig(**values)


TASK = ArithmeticTask()
