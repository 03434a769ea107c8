"""Train several methods from the same base model on the same data and budget; accuracy before and after.

    python -m benchmarks.compare_methods --methods grpo opsd rosd --generated-token-budget 20000

Each method starts from the same base weights and draws the same training problems (same seed), and stops
when it has generated ``--generated-token-budget`` rollout tokens (or ``--minutes`` of training, whichever
comes first). The base model and every trained model are evaluated greedily on the in-domain held-out split
and the harder out-of-domain split (and, with ``--eval-samples`` > 1, sampled pass@k). Writes
``<out>/comparison.json``, ``<out>/comparison.md``, ``<out>/comparison.png`` (entropy per token, pass@k and
distinct answers of each run: :func:`pydistill.plotting.plot_comparison`; pass@k needs the runs' own sampled
evaluation, e.g. ``--set fd.eval_problems=32 --set fd.eval_samples=8``) and, per method, the run folder.
Set any config field of one method with ``--set METHOD.FIELD=VALUE`` (e.g. ``--set grpo.learning_rate=1e-4``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing

# CPU-sized settings shared by every method (any of them can be overridden with --set).
# Sampling at 0.7 for every method: a 135M model sampled at 1.0-1.1 writes mostly noise (see RESULTS.md).
COMMON = dict(model="SmolLM2-135M-Instruct", task="arithmetic", lora_r=64, lora_alpha=128, batch_size=8,
              micro_batch_size=8, max_new_tokens=48, temperature=0.7, eval_problems=0, max_steps=1000,
              save_every=0, warmup_steps=0, progress=False)
# Per method: group size and learning rate that suit a short CPU run; the rest are each method's defaults.
METHOD_DEFAULTS = {
    "grpo": dict(num_generations=4, batch_size=4, micro_batch_size=4, learning_rate=5e-5),
    "opsd": dict(learning_rate=5e-5, divergence="jsd", beta=0.5, clip=None),
    "rosd": dict(num_generations=4, batch_size=4, micro_batch_size=4, learning_rate=5e-5, warmup_steps=0),
    "fd": dict(num_generations=4, batch_size=4, micro_batch_size=4, learning_rate=5e-5),
    "exgrpo": dict(num_generations=4, batch_size=2, micro_batch_size=2, learning_rate=5e-5),
}


def _convert(text: str, annotation):
    from pydistill.cli import _parse_value

    return _parse_value(text, annotation)


def method_config(method: str, output_dir: str, budget: int, minutes: float, seed: int, overrides: dict):
    from pydistill.trainers import TRAINERS

    config_cls = TRAINERS[method][0]
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = dict(COMMON, **METHOD_DEFAULTS.get(method, {}))
    values = {k: v for k, v in values.items() if k in names}
    for key, text in overrides.items():
        if key not in names:
            raise ValueError(f"--set {method}.{key}: {config_cls.__name__} has no field {key!r}")
        values[key] = _convert(text, hints[key])
    values.update(output_dir=output_dir, generated_token_budget=budget, time_budget_s=60 * minutes, seed=seed)
    return config_cls.from_dict(values).validate()


def evaluate_model(model, tokenizer, task, splits: dict, max_new_tokens: int, samples: int) -> dict:
    from pydistill.evaluation import evaluate

    out = {}
    for split, problems in splits.items():
        result = evaluate(model, tokenizer, task, problems, max_new_tokens=max_new_tokens, progress=False,
                          batch_size=32)
        out[f"{split}/accuracy"] = result.accuracy
        if samples > 1:
            sampled = evaluate(model, tokenizer, task, problems, max_new_tokens=max_new_tokens, greedy=False,
                               n_samples=samples, progress=False, batch_size=32)
            out.update({f"{split}/pass@{k}": v for k, v in sampled.pass_at_k.items()})
    return out


def markdown(result: dict) -> str:
    keys = sorted({k for r in result["runs"].values() for k in r["after"]})
    lines = [f"Device: {result['device']}; torch {result['torch']}; date {result['date']}; "
             f"command: `{result['command']}`", "",
             "| method | steps | generated tokens | train min | " + " | ".join(keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    base = result["base"]
    lines.append("| base model | 0 | 0 | 0 | " + " | ".join(f"{100 * base.get(k, float('nan')):.1f}" for k in keys)
                 + " |")
    for method, run in result["runs"].items():
        cells = []
        for k in keys:
            after, before = run["after"].get(k), base.get(k)
            cells.append("" if after is None else f"{100 * after:.1f} ({100 * (after - before):+.1f})")
        lines.append(f"| {method} | {run['steps']} | {run['generated_tokens']} | {run['train_minutes']:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nAccuracies in %, change from the base model in parentheses.\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_methods", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["grpo", "opsd", "rosd"])
    p.add_argument("--generated-token-budget", type=int, default=20000)
    p.add_argument("--minutes", type=float, default=10.0, help="training time cap per method")
    p.add_argument("--eval-problems", type=int, default=64)
    p.add_argument("--eval-max-new-tokens", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=1, help="> 1: also sampled pass@k")
    p.add_argument("--splits", nargs="+", default=["test", "ood"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE")
    p.add_argument("--out", default="runs/compare")
    args = p.parse_args(argv)

    import torch

    from pydistill.models import load_model
    from pydistill.tasks import get_task
    from pydistill.trainers import TRAINERS
    from benchmarks.measure import device_name

    overrides: dict = {m: {} for m in args.methods}
    for item in args.set:
        target, _, value = item.partition("=")
        method, _, field = target.partition(".")
        if method not in overrides or not field or not _:
            raise SystemExit(f"--set {item!r}: expected METHOD.FIELD=VALUE with METHOD in {args.methods}")
        overrides[method][field] = value
    unknown = [m for m in args.methods if m not in TRAINERS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; available: {sorted(TRAINERS)}")
    os.makedirs(args.out, exist_ok=True)
    configs = {m: method_config(m, os.path.join(args.out, m), args.generated_token_budget, args.minutes, args.seed,
                                overrides[m]) for m in args.methods}
    first = next(iter(configs.values()))
    task = get_task(first.task, **({"path": first.data_path} if first.task == "gsm8k" else {}))
    splits = {s: task.problems(s, n=args.eval_problems, seed=args.seed + 1) for s in args.splits}

    result = dict(date=time.strftime("%Y-%m-%d"), device=device_name("cuda" if torch.cuda.is_available() else "cpu"),
                  torch=torch.__version__, command="python -m benchmarks.compare_methods " + " ".join(
                      argv if argv is not None else sys.argv[1:]), runs={})
    model, tokenizer = load_model(first.model)
    print(f"[compare] evaluating the base model on {args.splits} ...", flush=True)
    result["base"] = evaluate_model(model, tokenizer, task, splits, args.eval_max_new_tokens, args.eval_samples)
    print(f"[compare] base: {result['base']}", flush=True)
    del model
    for method, config in configs.items():
        print(f"[compare] training {method} ...", flush=True)
        trainer = TRAINERS[method][1](config)
        started = time.time()
        trainer.train()
        minutes = (time.time() - started) / 60
        after = evaluate_model(trainer.model, trainer.tokenizer, task, splits, args.eval_max_new_tokens,
                               args.eval_samples)
        result["runs"][method] = dict(steps=trainer.step, generated_tokens=trainer.generated_tokens,
                                      train_minutes=minutes, after=after, config=dataclasses.asdict(config))
        print(f"[compare] {method}: {after} after {trainer.step} steps", flush=True)
        with open(os.path.join(args.out, "comparison.json"), "w") as f:  # written after each method: partial runs
            json.dump(result, f, indent=2)
        del trainer
    from pydistill.plotting import plot_comparison

    plot_comparison({m: c.output_dir for m, c in configs.items()}, os.path.join(args.out, "comparison.png"))
    table = markdown(result)
    with open(os.path.join(args.out, "comparison.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
