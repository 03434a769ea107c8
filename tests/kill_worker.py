"""One life of the kill-and-resume test: an OPSD run on a tiny model (real sampling, EMA teacher, a checkpoint
every step) that resumes from whatever its run folder holds. Saves are slowed down so that the test's random
SIGKILLs land inside them often; it prints ``save <step>`` as each save starts.

Usage: python -m tests.kill_worker RUN_DIR MAX_STEPS"""
import sys
import time

import torch


def main(run_dir: str, max_steps: int):
    torch.set_num_threads(1)  # bit-for-bit equality needs one deterministic thread
    import pydistill.trainers.checkpoint as checkpoint
    from pydistill.models import tiny_model
    from pydistill.trainers import OPSDConfig, OPSDTrainer
    from tests.trainer_helpers import TASK

    for name in ("save_file", "_atomic_write_text", "_remove_folder"):
        original = getattr(checkpoint, name)

        def slowed(*args, _original=original, **kwargs):
            time.sleep(0.02)
            out = _original(*args, **kwargs)
            time.sleep(0.02)
            return out

        setattr(checkpoint, name, slowed)

    class Announcing(OPSDTrainer):
        def save(self, *args, **kwargs):
            print(f"save {self.step}", flush=True)
            return super().save(*args, **kwargs)

    model, tok = tiny_model(hidden_size=16, layers=1, heads=2, seed=0)
    config = OPSDConfig(model="tiny", lora_r=0, max_steps=max_steps, batch_size=2, micro_batch_size=1,
                        max_new_tokens=6, eval_problems=0, output_dir=run_dir, learning_rate=1e-2, progress=False,
                        train_problems=8, max_grad_norm=1.0, teacher="ema", ema_rate=0.5, save_every=1,
                        resume=True, divergence="jsd", clip=None)
    Announcing(config, model=model, tokenizer=tok, task=TASK).train()
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
