"""Command line: `pydistill train <method>`, `pydistill eval`, `pydistill export`, `pydistill demo`,
`pydistill ei generate`, `pydistill teacher-cache`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing

from .models import EMBEDDED_DEFAULT
from .trainers import TRAINERS


def _parse_value(text: str, annotation, name: str = "value"):
    """Flag text as ``annotation``'s type (the same parsing as YAML values); argparse shows the one-line error."""
    from .trainers.fields import coerce

    try:
        return coerce(name, text, annotation)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_config_flags(parser: argparse.ArgumentParser, config_cls):
    """One flag per config field, built by transformers' HfArgumentParser (``--learning-rate`` and
    ``--learning_rate``, choices of Literal fields, help from the field metadata), parsed with the config's own
    typed parsing, and absent from the namespace unless given (so that flags override the YAML file only when
    present)."""
    from transformers import HfArgumentParser

    hints = typing.get_type_hints(config_cls)
    built = HfArgumentParser(config_cls, add_help=False)
    for action in built._actions:
        if action.dest not in hints:
            continue
        default = next(f.default for f in dataclasses.fields(config_cls) if f.name == action.dest)
        kwargs = dict(dest=action.dest, default=argparse.SUPPRESS, help=f"{action.help or ''} (default: {default!r})"
                      if not action.option_strings[0].startswith("--no") else f"set {action.dest} to false")
        if action.nargs == 0:  # --no-<flag>
            parser.add_argument(*action.option_strings, action="store_false", **kwargs)
            continue
        parse = (lambda text, a=hints[action.dest], n=action.dest: _parse_value(text, a, n))
        parser.add_argument(*action.option_strings, type=parse,
                            nargs=action.nargs, const=action.const, metavar=action.metavar or
                            (("{" + ",".join(map(str, action.choices)) + "}") if action.choices else None), **kwargs)


def load_config(config_cls, path: str | None, overrides: dict):
    values = {}
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"--config file {path!r} does not exist")
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"--config file {path!r} is not valid YAML{where}: {problem}") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config file {path!r} must hold a mapping of config fields, got "
                             f"{type(values).__name__}")
    from .trainers.config import resolve_aliases

    values = resolve_aliases(values)  # a flag then overrides a YAML value under either name
    values.update(overrides)
    return config_cls.from_dict(values).validate()


def cmd_train(args, overrides):
    config_cls, trainer_cls = TRAINERS[args.method]
    config = load_config(config_cls, args.config, overrides)
    trainer = trainer_cls(config)
    summary = trainer.train()
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float))}, indent=2))
    return 0


def run_settings(checkpoint: str) -> dict:
    """The model, LoRA and data settings a checkpoint was trained with (from its trainer_state.json), or {}."""
    from .trainers.checkpoint import read_trainer_state

    if not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
        return {}
    config = read_trainer_state(checkpoint).get("config", {})
    return {k: config[k] for k in ("model", "lora_r", "lora_alpha") + DATA_SETTINGS if k in config}


# What names the evaluation data; `pydistill eval` takes each from its flag, else from the checkpoint's run.
DATA_SETTINGS = ("task", "data_path", "dataset", "dataset_config", "prompt_column", "solution_column",
                 "answer_column")


def cmd_eval(args, _):
    """Accuracy of a model or a checkpoint; a checkpoint's model, LoRA and data settings (task or dataset and
    its columns) come from its run unless given as flags."""
    import types

    from .evaluation import evaluate
    from .models import LoraSettings, load_model
    from .tasks import task_from_config
    from .trainers.checkpoint import load_weights, resolve_checkpoint

    if args.n < 1:
        raise ValueError(f"--n must be >= 1 (problems to evaluate), got {args.n}")
    path = resolve_checkpoint(args.checkpoint, "--checkpoint") if args.checkpoint else None
    run = run_settings(path) if path else {}
    model_name = args.model or run.get("model", EMBEDDED_DEFAULT)
    lora_r = args.lora_r if args.lora_r is not None else run.get("lora_r", 0)
    lora_alpha = args.lora_alpha if args.lora_alpha is not None else run.get("lora_alpha", 128)
    lora = LoraSettings(r=lora_r, alpha=lora_alpha) if lora_r else None
    try:
        model, tokenizer = load_model(model_name, lora=lora)
    except OSError as exc:
        raise ValueError(f"model {model_name!r} cannot be loaded: {str(exc).splitlines()[0]}") from None
    if path:
        load_weights(model, path)
    defaults = dict(task="arithmetic", data_path=None, dataset=None, dataset_config=None, prompt_column="prompt",
                    solution_column=None, answer_column="answer")
    data = {k: getattr(args, k) if getattr(args, k) is not None else run.get(k, defaults[k]) for k in DATA_SETTINGS}
    # Scoring reads the question and the answer only: a solution column is required only when the flag names it
    # (not the run's, which another --dataset may lack).
    data["solution_column"] = args.solution_column
    if args.task is not None and args.dataset is None:  # a task flag replaces the run's dataset
        data["dataset"] = None
    task = task_from_config(types.SimpleNamespace(**data))
    problems = task.problems(args.split, n=args.n, seed=args.seed)
    if not problems:  # else accuracy 0.0 over no problems, printed as a result
        raise ValueError(f"the {args.split!r} split of task {task.name!r} has no problems (--split, --dataset, "
                         "--data-path)")
    result = evaluate(model, tokenizer, task, problems, max_new_tokens=args.max_new_tokens,
                      greedy=args.samples == 1, n_samples=args.samples, temperature=args.temperature)
    print(json.dumps(result.as_metrics(prefix=""), indent=2))
    return 0


def cmd_export(args, _):
    """A run's latest checkpoint (or a checkpoint folder) as one from_pretrained folder, LoRA merged."""
    from .export import export_merged
    from .trainers.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(args.run, "run")
    run = run_settings(path)
    out = export_merged(path, args.output, model=args.model or run.get("model", EMBEDDED_DEFAULT),
                        lora_r=run.get("lora_r", 0), lora_alpha=run.get("lora_alpha", 128), dtype=args.dtype,
                        overwrite=args.overwrite)
    print(f"pydistill: wrote {out} (from {path}); load it with AutoModelForCausalLM.from_pretrained({out!r})")
    return 0


def demo_config(output_dir: str, minutes: float):
    from .trainers import OPSDConfig

    # CPU-sized OPSD: JSD(0.5) (OPSD's earlier default, bounded) rather than the clipped forward KL, whose
    # negative entries let a few-step CPU run drift; a smaller LoRA learning rate for the same reason. A 135M
    # model sampled at the paper's temperature 1.1 writes mostly noise, so its rollouts are sampled at 0.7.
    # The loss stays at temperature 1 (OPSD's default is now the sampling temperature): the README's recorded
    # demo gain was measured so, and the sampling-temperature loss has not been re-measured on this demo yet.
    return OPSDConfig(model=EMBEDDED_DEFAULT, task="arithmetic", output_dir=output_dir, lora_r=64,
                      lora_alpha=128, learning_rate=5e-5, divergence="jsd", beta=0.5, clip=None, loss_temperature=1.0,
                      temperature=0.7, batch_size=8, micro_batch_size=8, max_new_tokens=48,
                      max_steps=1000, time_budget_s=60 * minutes, eval_problems=64, eval_max_new_tokens=64,
                      save_every=10, warmup_steps=0)


def cmd_demo(args, _):
    """Evaluate SmolLM2-135M-Instruct, train it with OPSD for a bounded time, evaluate again, plot."""
    from .plotting import plot_run
    from .trainers import OPSDTrainer
    from .trainers.core import write_summary

    output_dir = args.output_dir or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    config = demo_config(output_dir, args.minutes)
    if args.steps:
        config.max_steps = args.steps
    print(f"[demo] loading {config.model} from the embedded GGUF file ...", flush=True)
    trainer = OPSDTrainer(config)
    print(f"[demo] evaluating on {config.eval_problems} held-out {config.task} problems ...", flush=True)
    before = trainer.evaluate()["eval/accuracy"]
    print(f"[demo] accuracy before: {before:.1%}; training with OPSD for up to {args.minutes:g} minutes ...",
          flush=True)
    started = time.time()
    summary = trainer.train()
    after = summary.get("eval/accuracy", float("nan"))
    plot = plot_run(output_dir, baseline_accuracy=before)
    result = dict(model=config.model, task=config.task, eval_problems=config.eval_problems, steps=trainer.step,
                  train_minutes=round(trainer.train_seconds / 60, 2),
                  train_and_eval_minutes=round((time.time() - started) / 60, 2), accuracy_before=before,
                  accuracy_after=after, gain_points=round(100 * (after - before), 2), plot=plot,
                  config=dataclasses.asdict(config))
    write_summary(output_dir, result)
    print(f"[demo] accuracy before: {before:.1%}  after: {after:.1%}  ({trainer.step} steps)")
    print(f"[demo] run folder: {output_dir} (metrics.jsonl, training_curves.png, summary.json, checkpoints)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block) and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    parser = _Parser(prog="pydistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train with a method")
    methods = train.add_subparsers(dest="method", required=True)
    for name, (config_cls, _) in TRAINERS.items():
        p = methods.add_parser(name, help=f"train with {name}")
        p.add_argument("--config", help="YAML file of config fields (flags override it)")
        add_config_flags(p, config_cls)
    ev = sub.add_parser("eval", help="accuracy of a model or checkpoint on a task")
    ev.add_argument("--model", help="model name or folder (default: the checkpoint's run's, else "
                    f"{EMBEDDED_DEFAULT})")
    ev.add_argument("--checkpoint", help="a run folder (its latest checkpoint) or a checkpoint folder")
    ev.add_argument("--lora-r", type=int, help="LoRA rank (default: the checkpoint's run's; 0: full fine-tune)")
    ev.add_argument("--lora-alpha", type=int, help="LoRA alpha (default: the checkpoint's run's)")
    ev.add_argument("--task", help="built-in task: arithmetic or gsm8k (default: the checkpoint's run's, else "
                    "arithmetic)")
    ev.add_argument("--data-path", help="GSM8K folder or file (task gsm8k)")
    ev.add_argument("--dataset", help="evaluate on a dataset instead of a task: a jsonl/json/csv/parquet file, a "
                    "dataset folder or a hub name (default: the checkpoint's run's)")
    ev.add_argument("--dataset-config", help="the hub dataset's configuration name")
    ev.add_argument("--prompt-column", help="the dataset's prompt column (default: the run's, else prompt)")
    ev.add_argument("--solution-column", help="the dataset's solution column (evaluation does not read it; when "
                    "given it must exist; default: none)")
    ev.add_argument("--answer-column", help="the dataset's answer column (default: the run's, else answer)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--n", type=int, default=64)
    ev.add_argument("--seed", type=int, default=1)
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--samples", type=int, default=1, help="samples per problem (> 1: sampled, with pass@k)")
    ev.add_argument("--temperature", type=float, default=1.0)
    ex = sub.add_parser("export", help="a run's checkpoint as one from_pretrained model folder (LoRA merged)")
    ex.add_argument("run", help="a run folder (its latest checkpoint) or a checkpoint folder")
    ex.add_argument("--output", required=True, help="the folder to write (config, weights, tokenizer)")
    ex.add_argument("--model", help="the base model (default: the run's)")
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the written weights")
    ex.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    demo = sub.add_parser("demo", help="evaluate, train with OPSD, evaluate again, on the embedded default")
    demo.add_argument("--minutes", type=float, default=9.0, help="training time budget")
    demo.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: time budget only)")
    demo.add_argument("--output-dir")
    ei = sub.add_parser("ei", help="Explanatory Inversion data (ExGRPO stage 0)")
    ei_commands = ei.add_subparsers(dest="ei_command", required=True)
    gen = ei_commands.add_parser("generate", help="generate and filter EI probes into a jsonl cache")
    gen.add_argument("--task", default="arithmetic")
    gen.add_argument("--data-path")
    gen.add_argument("--split", default="train")
    gen.add_argument("--n", type=int, default=64, help="questions (the trainer's train_problems)")
    gen.add_argument("--seed", type=int, default=0, help="question sampling seed (the trainer's seed)")
    gen.add_argument("--teacher", default=EMBEDDED_DEFAULT, help="teacher model name or path, or 'procedural' "
                     "(probes written by rule, arithmetic task)")
    gen.add_argument("--student", help="base student of the difficulty filter (default: the teacher)")
    gen.add_argument("--cache", required=True, help="jsonl cache (the trainer's ei_cache)")
    gen.add_argument("--filters", type=lambda text: _parse_value(text, bool, "filters"), default=True,
                     help="apply the EI-consistency and difficulty filters (default: true)")
    gen.add_argument("--min-solved-fraction", type=float, default=0.2)
    gen.add_argument("--rules", default="all", help="'all' or comma-separated rule names")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--batch-size", type=int, default=16)
    tc = sub.add_parser("teacher-cache", help="score a fixed dataset's responses with a teacher once: per-token "
                        "top-k ids and log-probs for the top-k teacher inputs")
    tc.add_argument("--dataset", required=True, help="a .jsonl/.json/.csv/.parquet file or a save_to_disk folder "
                    "with text columns (--prompt-column, --response-column) or context_ids/response_ids columns")
    tc.add_argument("--output", required=True, help="the cache folder to write (read it with "
                    "pydistill.teachers.load_teacher_cache)")
    tc.add_argument("--top-k", type=int, required=True, help="log-probs kept per response token")
    tc.add_argument("--model", help=f"the teacher (a folder, a .gguf file, a hub name or {EMBEDDED_DEFAULT}); "
                    "with --teacher-url only its tokenizer is used")
    tc.add_argument("--teacher-url", help="score through a vLLM-compatible server at this URL instead of locally")
    tc.add_argument("--served-model", help="the server's model name (default: the first it lists)")
    tc.add_argument("--prompt-column", default="prompt")
    tc.add_argument("--response-column", default="response")
    tc.add_argument("--temperature", type=float, default=1.0)
    tc.add_argument("--batch-size", type=int, default=8, help="sequences per forward (or per server request)")
    tc.add_argument("--timeout", type=float, default=120.0, help="seconds per server request")
    tc.add_argument("--retries", type=int, default=3, help="retries of a failed server request")
    tc.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    return parser


def cmd_teacher_cache(args, _):
    """`pydistill teacher-cache`: writes the cache folder and prints its index."""
    from .teachers.cache import build_teacher_cache

    server = dict(model=args.served_model, timeout_s=args.timeout, retries=args.retries)
    meta = build_teacher_cache(args.dataset, args.output, top_k=args.top_k, model=args.model,
                               teacher_url=args.teacher_url, prompt_column=args.prompt_column,
                               response_column=args.response_column, temperature=args.temperature,
                               batch_size=args.batch_size, overwrite=args.overwrite, server_options=server)
    print(json.dumps(meta, indent=2))
    return 0


def cmd_ei(args, _):
    """`pydistill ei generate`: ExGRPO's stage 0 alone; prints the filter report."""
    from .trainers.exgrpo import ei_generate

    report = ei_generate(args.task, split=args.split, n=args.n, seed=args.seed, data_path=args.data_path,
                         teacher=args.teacher, student=args.student, cache=args.cache, filters=args.filters,
                         min_solved_fraction=args.min_solved_fraction, rules=args.rules,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument, already reported in one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    handler = dict(train=cmd_train, eval=cmd_eval, export=cmd_export, demo=cmd_demo, ei=cmd_ei,
                   **{"teacher-cache": cmd_teacher_cache})[args.command]
    overrides = {}
    if args.command == "train":
        config_cls = TRAINERS[args.method][0]
        overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}
    try:
        return handler(args, overrides)
    except ValueError as exc:  # user errors: one line, no traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"pydistill: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
