"""TRL's GRPOTrainer step: TRL's default path vs the same trainer with pydistill (`pydistill.integrations.trl`).

    python -m benchmarks.trl_step                                  # CPU: random SmolLM2-shaped model, 4 layers
    python -m benchmarks.trl_step --device cuda --layers 30 --completion-length 1024 --generations 16   # a GPU
    python -m benchmarks.trl_step --device cuda --model qwen2.5-0.5b --layers 24 --completion-length 1024

Each variant runs in a fresh process: TRL 1.16's GRPOTrainer as shipped (its fused LM head, `add_fused_lm_head`)
and `pydistill.integrations.trl.GRPOTrainer` (one line changed), on the same model, data and scripted rollouts
(fixed random completions of ``--completion-length`` tokens: no generation, so the step is the policy forward,
the loss, the backward and the optimizer update). The model is SmolLM2-135M's shapes (hidden 576, vocabulary
49152, tied head) with ``--layers`` decoder layers, randomly initialised in code. Recorded per variant: the median
step time over the timed steps (after ``--warmup`` steps) and the peak memory: on the CPU the peak RSS (VmHWM,
reset after the warm-up) and its excess over the RSS before the timed steps; on CUDA ``max_memory_allocated``.
The losses of both variants are printed side by side (they must agree).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("trl", "pydistill")


def _child(args) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from benchmarks.measure import device_name, peak_rss_mb, reset_peak_rss, rss_mb
    from benchmarks.trainer_step import build_model
    from pydistill.models import tiny_tokenizer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model, _ = build_model(f"random-{args.model}", args.layers, "cpu", torch.float32)  # TRL moves it
    tokenizer = tiny_tokenizer()  # token ids of the scripted rollouts stay inside its small vocabulary
    tokenizer.padding_side = "left"
    cuda = args.device == "cuda"

    def rollouts(prompts, trainer):
        g = torch.Generator().manual_seed(len(prompts))
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        completions = [torch.randint(3, len(tokenizer) - 1, (args.completion_length,), generator=g).tolist()
                       for _ in prompts]
        return dict(prompt_ids=ids, completion_ids=completions, logprobs=None)

    def reward(completions, **kwargs):
        return [float(len(c) % 7) for c in completions]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start, self.base_rss, self.step = [], None, None, 0

        def on_step_begin(self, *a, **k):
            if self.step == args.warmup:  # the timed steps start: peak memory from here
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    self.base_rss = torch.cuda.memory_allocated() / 2 ** 20
                else:
                    reset_peak_rss()
                    self.base_rss = rss_mb()
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            if self.step >= args.warmup:
                self.times.append(time.perf_counter() - self.start)
            self.step += 1

    if args.variant == "pydistill":
        from pydistill.integrations.trl import GRPOTrainer
    else:
        GRPOTrainer = trl.GRPOTrainer
    timer = Timer()
    config = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps, per_device_train_batch_size=args.generations,
        num_generations=args.generations, max_completion_length=args.completion_length, learning_rate=1e-6,
        report_to="none", use_cpu=not cuda, bf16=cuda, logging_steps=1, save_strategy="no", seed=0,
        disable_dropout=True, dataloader_num_workers=0)
    data = Dataset.from_dict({"prompt": ["Tom has 12 apples. He buys 5 more. How many?"] * 64})
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=tokenizer, rollout_func=rollouts, callbacks=[timer])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else peak_rss_mb()
    return dict(variant=args.variant, step_s=statistics.median(timer.times), step_times=timer.times,
                peak_mb=peak, extra_mb=peak - timer.base_rss, losses=losses, device=device_name(args.device),
                torch=torch.__version__, trl=trl.__version__, transformers=transformers.__version__,
                tokens=args.generations * args.completion_length)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "qwen2.5-0.5b"),
                        help="random model of that shape (Qwen2.5-0.5B: hidden 896, vocabulary 151936, 24 layers)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8, help="rollouts per step (one prompt's group)")
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2,
                        help="processes per variant, alternated (trl, pydistill, trl, ...) so that a CPU shared with "
                             "other jobs biases neither; the table takes each variant's median step and largest peak")
    parser.add_argument("--out", default=None, help="write results.json and results.md here")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(_child(args)))
        return
    command = "python -m benchmarks.trl_step " + " ".join(argv if argv is not None else sys.argv[1:])
    runs = []
    for variant in [v for _ in range(args.rounds) for v in VARIANTS]:
        # MALLOC_MMAP_THRESHOLD_: large buffers go back to the OS when freed, so RSS follows the live tensors
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        proc = subprocess.run([sys.executable, "-m", "benchmarks.trl_step", "--variant", variant,
                               *(argv if argv is not None else sys.argv[1:])], capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            runs.append(dict(variant=variant, status=f"failed: {proc.stderr.strip().splitlines()[-1:]}"))
            continue
        runs.append(dict(json.loads(line[0][7:]), status="ok"))
    records = []
    for variant in VARIANTS:
        done = [r for r in runs if r["variant"] == variant and r["status"] == "ok"]
        if not done:
            records.append(next(r for r in runs if r["variant"] == variant))
            continue
        steps = [t for r in done for t in r["step_times"]]
        records.append(dict(done[0], step_s=statistics.median(steps), step_times=steps,
                            peak_mb=max(r["peak_mb"] for r in done), extra_mb=max(r["extra_mb"] for r in done)))
    date = datetime.date.today().isoformat()
    rows = ["| variant | tokens / step | median step (s) | peak memory (MB) | peak above pre-step (MB) | losses "
            "| status |",
            "|---|---|---|---|---|---|---|"]
    for r in records:
        if r["status"] != "ok":
            rows.append(f"| {r['variant']} | | | | | | {r['status']} |")
            continue
        rows.append(f"| {r['variant']} | {r['tokens']} | {r['step_s']:.2f} | {r['peak_mb']:.0f} | {r['extra_mb']:.0f} "
                    f"| {', '.join(f'{x:.6g}' for x in r['losses'])} | ok |")
    ok = [r for r in records if r["status"] == "ok"]
    header = (f"Device: {ok[0]['device'] if ok else args.device}; torch {ok[0]['torch'] if ok else '?'}, "
              f"TRL {ok[0]['trl'] if ok else '?'}, transformers {ok[0]['transformers'] if ok else '?'}; {date}\n"
              f"Command: `{command.strip()}`\n")
    text = header + "\n" + "\n".join(rows) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(dict(command=command, date=date, records=records, runs=runs), f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
