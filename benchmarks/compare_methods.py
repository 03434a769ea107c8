"""Train several methods from the same base model on the same data and budget, over several seeds; accuracy,
pass@k and policy entropy before and after, as a mean and a standard error over the seeds.

    python -m benchmarks.compare_methods --methods grpo opsd rosd fd "fd>grpo" --seeds 3 \\
        --generated-token-budget 8000 --eval-samples 8

Every run starts from the same base weights and stops when it has generated ``--generated-token-budget`` rollout
tokens (or ``--minutes`` of training, whichever comes first). Run k of a method trains with seed
``--seed + k`` (its training problems and its sampling); the held-out problems are the same for every run (drawn
with ``--seed``). The base model and every trained model are evaluated greedily on the in-domain split and the
harder out-of-domain split; with ``--eval-samples`` > 1 also sampled pass@k; and every model's policy entropy
per token is measured the same way for all (``entropy``: its own samples at temperature 1 on
``--entropy-problems`` in-domain problems, 4 each).

A run is written ``[LABEL=]SPEC[:FIELD=VALUE,...]``:

- SPEC is a method (``grpo``), or a chain ``fd>grpo``: each stage starts from the previous stage's checkpoint
  (``init_from``) and gets an equal share of the token budget and of the minutes, so a chain is compared at the
  same total budget as a single method;
- FIELD=VALUE sets config fields of this run (of every stage that has the field), e.g.
  ``rosd-solution=rosd:privileged=solution`` or ``sft-25pct=sft:train_problems=64``;
- ``--set METHOD.FIELD=VALUE`` sets a field for every run (and chain stage) of that method.

``--only-seeds`` and ``--base-from`` let a comparison be completed over several invocations: the held-out problems
depend only on ``--seed``, and the base model's figures are taken from an earlier ``comparison.json`` of the same
evaluation settings instead of being measured again. ``--trained-from`` evaluates the trained models of earlier
invocations again instead of training them (e.g. with ``--eval-samples 8`` for pass@k): each run's label and seed
is looked up in those ``comparison.json`` files (the last one listed that holds it), its configs must be the ones
this invocation would train with (output folders aside), and its last checkpoint is loaded.

Writes ``<out>/comparison.json`` (every run of every seed, and the summary), ``<out>/comparison.md``,
``<out>/comparison.png`` (:func:`pydistill.plotting.plot_comparison`, first seed of each run) and the run folders
``<out>/<label>/seed<k>[/<stage>]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass

from pydistill.models import EMBEDDED_DEFAULT

# CPU-sized settings shared by every method (any of them can be overridden with --set).
# Sampling at 0.7 for every method: a 135M model sampled at 1.0-1.1 writes mostly noise (see RESULTS.md).
COMMON = dict(model=EMBEDDED_DEFAULT, task="arithmetic", lora_r=64, lora_alpha=128, batch_size=8,
              micro_batch_size=8, max_new_tokens=48, temperature=0.7, eval_problems=0, max_steps=1000,
              save_every=0, warmup_steps=0, progress=False, max_grad_norm=0.1, lr_scheduler="constant_with_warmup")
# Per method: group size and learning rate that suit a short CPU run; the rest are each method's defaults.
METHOD_DEFAULTS = {
    "grpo": dict(num_generations=4, batch_size=4, micro_batch_size=4, learning_rate=5e-5),
    "opsd": dict(learning_rate=5e-5, divergence="jsd", beta=0.5, clip=None),
    "rosd": dict(num_generations=4, batch_size=4, micro_batch_size=4, learning_rate=5e-5, warmup_steps=0),
    "fd": dict(num_generations=4, batch_size=4, micro_batch_size=4, learning_rate=5e-5),
    # the procedural Explanatory Inversion teacher: stage 0 needs no language model
    # (see pydistill.trainers.exgrpo.ei_procedural)
    "exgrpo": dict(num_generations=4, batch_size=2, micro_batch_size=2, learning_rate=5e-5, ei_teacher="procedural",
                   train_problems=64, num_probes=2, partial_probes=1, sft_steps=8, sft_batch_size=8,
                   sft_learning_rate=5e-5, ei_max_new_tokens=48),
    "sft": dict(learning_rate=5e-5),
}
ENTROPY_SAMPLES = 4


@dataclass
class RunSpec:
    """One row of the comparison: a method or a chain of methods, with its own config fields."""

    label: str
    stages: list
    fields: dict  # field -> text value, for every stage whose config has the field


def parse_run(text: str) -> RunSpec:
    """``[LABEL=]SPEC[:FIELD=VALUE,...]`` (see the module docstring)."""
    from pydistill.trainers import TRAINERS

    head, colon, assignments = text.partition(":")
    label, equals, spec = head.partition("=")
    if not equals:
        label, spec = head, head
    stages = [s.strip() for s in spec.split(">")]
    unknown = [s for s in stages if s not in TRAINERS]
    if unknown or not label:
        raise ValueError(f"run {text!r}: expected [LABEL=]METHOD[>METHOD...][:FIELD=VALUE,...] with methods from "
                         f"{sorted(TRAINERS)}")
    fields = {}
    for item in filter(None, assignments.split(",")):
        field, equals, value = item.partition("=")
        if not equals or not field.strip():
            raise ValueError(f"run {text!r}: {item!r} is not FIELD=VALUE")
        fields[field.strip()] = value.strip()
    for field in fields:
        if not any(field in _field_names(s) for s in stages):
            raise ValueError(f"run {text!r}: no config of {stages} has a field {field!r}")
    return RunSpec(label, stages, fields)


def _field_names(method: str) -> set:
    from pydistill.trainers import TRAINERS

    return {f.name for f in dataclasses.fields(TRAINERS[method][0])}


def _convert(name: str, text: str, annotation):
    """A run override's text as its field's type (the YAML/flag parsing); ValueError names the field."""
    from pydistill.trainers.fields import coerce

    return coerce(name, text, annotation)


def method_config(method: str, output_dir: str, budget: int, minutes: float, seed: int, overrides: dict):
    """The config of one training run: COMMON, then METHOD_DEFAULTS, then ``overrides`` (field -> text)."""
    from pydistill.trainers import TRAINERS

    config_cls = TRAINERS[method][0]
    hints = typing.get_type_hints(config_cls)
    names = _field_names(method)
    values = dict(COMMON, **METHOD_DEFAULTS.get(method, {}))
    values = {k: v for k, v in values.items() if k in names}
    for key, text in overrides.items():
        if key not in names:
            raise ValueError(f"--set {method}.{key}: {config_cls.__name__} has no field {key!r}")
        values[key] = _convert(key, text, hints[key])
    values.update(output_dir=output_dir, generated_token_budget=budget, time_budget_s=60 * minutes, seed=seed)
    return config_cls.from_dict(values).validate()


def evaluate_model(model, tokenizer, task, splits: dict, max_new_tokens: int, samples: int,
                   entropy_problems: typing.Sequence = ()) -> dict:
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
    if entropy_problems:
        out["entropy"] = policy_entropy(model, tokenizer, entropy_problems, max_new_tokens=max_new_tokens)
    return out


def policy_entropy(model, tokenizer, problems, *, samples: int = ENTROPY_SAMPLES, max_new_tokens: int = 64,
                   seed: int = 0) -> float:
    """Mean entropy (nats) of the model's next-token distribution over the tokens of its own completions, sampled
    at temperature 1 from the student prompt: the same measurement for every method, whatever its loss logs."""
    import torch

    from pydistill.evaluation import generate_completions
    from pydistill.prompts import render, student_messages
    from pydistill.token_stats import token_stats
    from pydistill.boundary import read_head
    from pydistill.trainers.contexts import build_context_batch, response_hidden_states

    prompts = [render(tokenizer, student_messages(p.question)) for p in problems for _ in range(samples)]
    torch.manual_seed(seed)
    _, completions = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, greedy=False,
                                          temperature=1.0, batch_size=32)
    rows = [(tokenizer(p, add_special_tokens=False)["input_ids"], c) for p, c in zip(prompts, completions) if c]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            chunk = rows[start:start + 16]
            batch = build_context_batch([p for p, _ in chunk], [c for _, c in chunk], tokenizer.pad_token_id, device)
            head = read_head(model)
            hidden = response_hidden_states(model, batch, head)
            mask = batch.completion_mask
            stats = token_stats(hidden[mask], head.weight, targets=batch.targets[mask], bias=head.bias,
                                softcap=head.softcap)
            total += float(stats.entropy.sum())
            count += int(mask.sum())
    model.train(was_training)
    return total / max(count, 1)


def mean_and_se(values: list) -> tuple:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def summarize(seed_runs: list) -> dict:
    """Per metric over the seeds: mean, se, n; plus the mean steps and generated tokens."""
    keys = sorted({k for r in seed_runs for k in r["after"]})
    out = {}
    for key in keys:
        values = [r["after"][key] for r in seed_runs if key in r["after"]]
        mean, se = mean_and_se(values)
        out[key] = dict(mean=mean, se=se, n=len(values))
    for key in ("steps", "generated_tokens", "train_minutes"):
        out[key] = dict(mean=sum(r[key] for r in seed_runs) / len(seed_runs))
    return out


def _metric_order(key: str):
    split, _, name = key.rpartition("/")
    kind = 0 if name == "accuracy" else 1 if name.startswith("pass@") else 2
    number = int(name.split("@")[1]) if name.startswith("pass@") else 0
    return (kind, split, number, key)


def markdown(result: dict) -> str:
    keys = sorted({k for r in result["runs"].values() for k in r["summary"]} - {"steps", "generated_tokens",
                                                                              "train_minutes"}, key=_metric_order)
    lines = [f"Device: {result['device']}; torch {result['torch']}; date {result['date']}; seeds {result['seeds']}; "
             f"command: `{result['command']}`", "",
             "| run | seeds | steps | generated tokens | train min | " + " | ".join(keys) + " |",
             "|---|---|---|---|---|" + "---|" * len(keys)]
    base = result["base"]

    def cell(key, stats, reference):
        scale, digits = (1, 3) if key == "entropy" else (100, 1)
        text = f"{scale * stats['mean']:.{digits}f}"
        if stats.get("se") is not None:
            text += f" ± {scale * stats['se']:.{digits}f}"
        if reference is not None:
            text += f" ({scale * (stats['mean'] - reference):+.{digits}f})"
        return text

    lines.append("| base model | - | 0 | 0 | 0 | " + " | ".join(
        cell(k, dict(mean=base[k]), None) if k in base else "" for k in keys) + " |")
    for label, run in result["runs"].items():
        s = run["summary"]
        cells = [cell(k, s[k], base.get(k)) if k in s else "" for k in keys]
        lines.append(f"| {label} | {len(run['seeds'])} | {s['steps']['mean']:.1f} | "
                     f"{s['generated_tokens']['mean']:.0f} | {s['train_minutes']['mean']:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nAccuracies and pass@k in %, entropy in nats per token (the model's own samples at "
                               "temperature 1); mean ± standard error over the seeds, change from the base model in "
                               "parentheses.\n")


def write_table(result: dict, out: str) -> None:
    """``<out>/comparison.md`` (:func:`markdown` of ``result``), also printed."""
    table = markdown(result)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(table)
    print(table)


def stage_configs(spec: RunSpec, seed: int, args, overrides: dict) -> list:
    """[(method, stage folder, config)] of every stage of ``spec`` with ``seed``: each stage gets an equal share of
    the token budget and of the minutes. A chain's later stages start from the previous stage's folder, which
    :func:`train_run` sets once that stage has written it (``init_from`` must exist to validate)."""
    folder = os.path.join(args.out, spec.label, f"seed{seed}")
    budget, minutes = args.generated_token_budget // len(spec.stages), args.minutes / len(spec.stages)
    out = []
    for k, method in enumerate(spec.stages):
        fields = dict(overrides.get(method, {}), **{f: v for f, v in spec.fields.items() if f in _field_names(method)})
        if args.model:
            fields.setdefault("model", args.model)
        stage_dir = folder if len(spec.stages) == 1 else os.path.join(folder, f"{k}-{method}")
        try:
            out.append((method, stage_dir, method_config(method, stage_dir, budget, minutes, seed, fields)))
        except ValueError as err:
            raise SystemExit(f"run {spec.label!r}, {method}: {err}") from None
    return out


def train_run(spec: RunSpec, seed: int, args, overrides: dict) -> tuple:
    """Train every stage of ``spec`` with ``seed``; returns (the last trainer, its record)."""
    from pydistill.trainers import TRAINERS

    record = dict(seed=seed, steps=0, generated_tokens=0, train_minutes=0.0, stages=[], configs=[])
    trainer, previous = None, None
    for method, stage_dir, config in stage_configs(spec, seed, args, overrides):
        if previous is not None:
            config = dataclasses.replace(config, init_from=previous).validate()
        del trainer
        trainer = TRAINERS[method][1](config)
        started = time.time()
        trainer.train()
        record["train_minutes"] += (time.time() - started) / 60
        record["steps"] += trainer.step
        record["generated_tokens"] += trainer.generated_tokens
        record["stages"].append(dict(method=method, output_dir=stage_dir, steps=trainer.step,
                                     generated_tokens=trainer.generated_tokens))
        record["configs"].append(dataclasses.asdict(config))
        previous = stage_dir
    return trainer, record


def _training_settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("output_dir", "init_from")}


def trained_from(paths: list, specs: list, seeds: list, args, overrides: dict) -> dict:
    """(label, seed) -> the training record of that run in one of the earlier comparison.json ``paths``, checked
    to have been trained with the configs this invocation would use (output folders aside)."""
    earlier = []
    for path in paths:
        try:
            with open(path) as f:
                earlier.append((path, json.load(f)))
        except (OSError, ValueError) as err:
            raise SystemExit(f"--trained-from {path}: cannot read a comparison.json ({err})") from None
    found = {}
    for spec in specs:
        for seed in seeds:
            records = [(path, r) for path, e in earlier for r in e.get("runs", {}).get(spec.label, {}).get("seeds", [])
                       if r["seed"] == seed]
            if not records:
                raise SystemExit(f"--trained-from: no run {spec.label!r} with seed {seed} in {paths}")
            path, record = records[-1]
            for k, (method, _, config) in enumerate(stage_configs(spec, seed, args, overrides)):
                now = _training_settings(json.loads(json.dumps(dataclasses.asdict(config))))  # as stored
                then = _training_settings(record["configs"][k]) if k < len(record["configs"]) else {}
                # a field added since that run, at its default, is accepted: the earlier code behaved so
                then.update({f.name: now[f.name] for f in dataclasses.fields(config) if f.name in now and f.name not
                             in then and then and f.default is not dataclasses.MISSING
                             and json.loads(json.dumps(f.default)) == now[f.name]})
                differ = sorted(key for key in now.keys() | then.keys() if now.get(key, "?") != then.get(key, "?"))
                if differ:
                    raise SystemExit(f"--trained-from {path}: run {spec.label!r} seed {seed} ({method}) was trained "
                                     f"with other settings than this invocation's: "
                                     + ", ".join(f"{key} {then.get(key, '(absent)')!r} vs {now.get(key, '(absent)')!r}"
                                                 for key in differ[:6]))
            found[spec.label, seed] = dict(record, trained_in=path)
    return found


class TrainedModels:
    """The last checkpoint of an earlier run, loaded into one model per (model, LoRA settings): a checkpoint's
    trainable weights replace the previous run's, which must cover every trainable parameter."""

    def __init__(self):
        self.loaded = {}

    def load(self, record: dict):
        from safetensors import safe_open

        from pydistill.models import LoraSettings, load_model
        from pydistill.trainers.checkpoint import load_weights, resolve_checkpoint

        config = record["configs"][-1]
        key = (config["model"], config["lora_r"], config["lora_alpha"])
        if key not in self.loaded:
            self.loaded.clear()
            lora = LoraSettings(r=config["lora_r"], alpha=config["lora_alpha"]) if config["lora_r"] else None
            self.loaded[key] = load_model(config["model"], lora=lora)
        model, tokenizer = self.loaded[key]
        try:
            checkpoint = resolve_checkpoint(record["stages"][-1]["output_dir"], "--trained-from checkpoint")
        except ValueError as err:
            raise SystemExit(str(err)) from None
        with safe_open(os.path.join(checkpoint, "weights.safetensors"), "pt") as f:
            stored = set(f.keys())
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if stored != trainable:
            raise SystemExit(f"--trained-from checkpoint {checkpoint} does not hold exactly the model's trainable "
                             f"weights ({len(stored)} tensors vs {len(trainable)})")
        load_weights(model, checkpoint)
        return model, tokenizer


def evaluation_settings(args, model_name: str) -> dict:
    """Everything the base model's figures depend on (the held-out problems are drawn with ``--seed``)."""
    return dict(model=model_name, splits=list(args.splits), eval_problems=args.eval_problems, seed=args.seed,
                eval_max_new_tokens=args.eval_max_new_tokens, eval_samples=args.eval_samples,
                entropy_problems=args.entropy_problems)


def base_from(path: str, settings: dict) -> dict:
    """The base model's figures of an earlier comparison.json, checked to come from the same ``settings``."""
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError) as err:
        raise SystemExit(f"--base-from {path}: cannot read a comparison.json ({err})") from None
    if earlier.get("evaluation") != settings or "base" not in earlier:
        raise SystemExit(f"--base-from {path}: expected a comparison.json with the base figures for the evaluation "
                         f"settings {settings}, got settings {earlier.get('evaluation')}")
    return earlier["base"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_methods", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["grpo", "opsd", "rosd"],
                   help="runs: [LABEL=]METHOD[>METHOD...][:FIELD=VALUE,...]")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per run: --seed, --seed + 1, ...")
    p.add_argument("--only-seeds", type=int, nargs="+", default=None, metavar="K",
                   help="train only seeds --seed + K of those (the held-out problems stay those of --seed), to "
                        "complete an earlier invocation's seeds")
    p.add_argument("--generated-token-budget", type=int, default=20000)
    p.add_argument("--minutes", type=float, default=10.0, help="training time cap per run (shared by a chain)")
    p.add_argument("--eval-problems", type=int, default=64)
    p.add_argument("--eval-max-new-tokens", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=1, help="> 1: also sampled pass@k")
    p.add_argument("--entropy-problems", type=int, default=16, help="in-domain problems for the entropy (0: off)")
    p.add_argument("--splits", nargs="+", default=["test", "ood"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="base model for every run (default: COMMON's)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--base-from", default=None, metavar="COMPARISON_JSON",
                   help="take the base model's figures from an earlier comparison.json made with the same model and "
                        "evaluation settings instead of evaluating the base again (greedy: the same figures)")
    p.add_argument("--trained-from", nargs="+", default=None, metavar="COMPARISON_JSON",
                   help="evaluate the trained models of earlier comparison.json files (same labels, seeds and "
                        "training settings) instead of training them")
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    if args.only_seeds is not None and not all(0 <= k < args.seeds for k in args.only_seeds):
        raise SystemExit(f"--only-seeds must be in 0..{args.seeds - 1} (--seeds {args.seeds}), got {args.only_seeds}")

    import torch

    from pydistill.models import load_model
    from pydistill.tasks import get_task
    from benchmarks.measure import device_name

    try:
        specs = [parse_run(text) for text in args.methods]
    except ValueError as err:
        raise SystemExit(str(err)) from None
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"run labels must be distinct, got {labels}")
    methods = {m for s in specs for m in s.stages}
    overrides: dict = {m: {} for m in methods}
    for item in args.set:
        target, eq, value = item.partition("=")
        method, _, field = target.partition(".")
        if method not in overrides or not field or not eq:
            raise SystemExit(f"--set {item!r}: expected METHOD.FIELD=VALUE with METHOD in {sorted(methods)}")
        overrides[method][field] = value
    for spec in specs:  # every config is checked before any model is loaded
        stage_configs(spec, args.seed, args, overrides)
    seeds = [args.seed + k for k in range(args.seeds) if args.only_seeds is None or k in args.only_seeds]
    trained = trained_from(args.trained_from, specs, seeds, args, overrides) if args.trained_from else None
    os.makedirs(args.out, exist_ok=True)
    model_name = args.model or COMMON["model"]
    task = get_task(COMMON["task"])
    splits = {s: task.problems(s, n=args.eval_problems, seed=args.seed + 1) for s in args.splits}
    in_domain = task.problems(args.splits[0], n=args.entropy_problems, seed=args.seed + 2) \
        if args.entropy_problems else []

    result = dict(date=time.strftime("%Y-%m-%d"), device=device_name("cuda" if torch.cuda.is_available() else "cpu"),
                  torch=torch.__version__, seeds=seeds,
                  command="python -m benchmarks.compare_methods " + " ".join(
                      argv if argv is not None else sys.argv[1:]), runs={})
    result["evaluation"] = evaluation_settings(args, model_name)
    if args.base_from:
        result["base"] = base_from(args.base_from, result["evaluation"])
    else:
        model, tokenizer = load_model(model_name)
        print(f"[compare] evaluating the base model on {args.splits} ...", flush=True)
        result["base"] = evaluate_model(model, tokenizer, task, splits, args.eval_max_new_tokens, args.eval_samples,
                                        in_domain)
        del model
    print(f"[compare] base: {result['base']}", flush=True)
    first_dirs = {}
    models = TrainedModels()
    for spec in specs:
        seed_runs = []
        for seed in result["seeds"]:
            if trained is not None:
                print(f"[compare] loading {spec.label} (seed {seed}) ...", flush=True)
                record = dict(trained[spec.label, seed])
                model, tokenizer = models.load(record)
            else:
                print(f"[compare] training {spec.label} (seed {seed}) ...", flush=True)
                trainer, record = train_run(spec, seed, args, overrides)
                model, tokenizer = trainer.model, trainer.tokenizer
            record["after"] = evaluate_model(model, tokenizer, task, splits, args.eval_max_new_tokens,
                                             args.eval_samples, in_domain)
            print(f"[compare] {spec.label} seed {seed}: {record['after']} after {record['steps']} steps", flush=True)
            seed_runs.append(record)
            first_dirs.setdefault(spec.label, record["stages"][-1]["output_dir"])
            del model
            if trained is None:
                del trainer
            result["runs"][spec.label] = dict(stages=spec.stages, fields=spec.fields, seeds=seed_runs,
                                              summary=summarize(seed_runs))
            with open(os.path.join(args.out, "comparison.json"), "w") as f:  # after each run: partial results
                json.dump(result, f, indent=2)
    from pydistill.plotting import plot_comparison

    # a run without a stage-2 log (ExGRPO's SFT-only stage) has no curves to plot
    plotted = {k: d for k, d in first_dirs.items() if os.path.exists(os.path.join(d, "metrics.jsonl"))}
    if plotted:
        plot_comparison(plotted, os.path.join(args.out, "comparison.png"))
    write_table(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
