"""Greedy completions of a base model and checkpoints on the first held-out problems, side by side.

    python -m benchmarks.show_completions base runs/compare/rosd/seed0 --problems 8

What a collapsed run writes says more than its accuracy (RESULTS.md, "ROSD/FD collapse: diagnosis"). Each
argument is ``base`` or a run folder / checkpoint (LoRA settings from the command line, as compare_methods uses).
The model is loaded once: each checkpoint's weights replace the previous ones, and ``base`` is the same model
with the adapter disabled.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from pydistill.models import EMBEDDED_DEFAULT


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.show_completions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="'base' or a run folder / checkpoint folder")
    p.add_argument("--model", default=EMBEDDED_DEFAULT)
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-alpha", type=int, default=128)
    p.add_argument("--split", default="test")
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--seed", type=int, default=1, help="compare_methods evaluates on seed + 1 (1 for seed 0)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    from pydistill.evaluation import generate_completions
    from pydistill.models import LoraSettings, load_model
    from pydistill.prompts import render, student_messages
    from pydistill.tasks import get_task
    from pydistill.trainers.checkpoint import load_weights, resolve_checkpoint

    task = get_task("arithmetic")
    problems = task.problems(args.split, n=args.problems, seed=args.seed)
    model, tokenizer = load_model(args.model, lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha))
    prompts = [render(tokenizer, student_messages(q.question)) for q in problems]
    for name in args.checkpoints:
        if name != "base":
            load_weights(model, resolve_checkpoint(name, "checkpoint"))
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            texts, _ = generate_completions(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens)
        right = [task.is_correct(q, t) for q, t in zip(problems, texts)]
        print(f"===== {name}: {sum(right)}/{len(problems)} correct")
        for problem, text, ok in zip(problems, texts, right):
            print(f"--- answer {problem.answer}, {'right' if ok else 'wrong'}: {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
