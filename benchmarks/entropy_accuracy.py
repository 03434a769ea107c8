"""Greedy accuracy against policy entropy, over every trained run of some ``comparison.json`` files.

    python -m benchmarks.entropy_accuracy benchmarks/records/issue17/*.json --out entropy-accuracy.png

Prints one row per trained run (label, method, seed, entropy, accuracy; a run recorded in several files counts once),
Pearson's r between the two over the runs, and writes a scatter plot with the base model marked. Both figures
are compare_methods' own: ``entropy`` is the model's per-token entropy on its own samples at temperature 1,
measured the same way for every method, so runs of different methods and invocations are comparable when they
share the evaluation settings (checked).
"""
from __future__ import annotations

import argparse
import json
import math
import sys


def collect(paths: list, split: str = "test") -> tuple:
    """(base point, [(label, method, seed, entropy, accuracy)]) over the files' trained runs. Every file must
    hold the same base figures (the same model evaluated on the same problems the same way), and the same
    evaluation settings where it records them."""
    key = f"{split}/accuracy"
    settings, base, runs = None, None, {}
    for path in paths:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError) as err:
            raise SystemExit(f"{path}: cannot read a comparison.json ({err})") from None
        if "runs" not in result or "entropy" not in result.get("base", {}) or key not in result["base"]:
            raise SystemExit(f"{path}: expected a comparison.json with runs and the base model's entropy and {key}")
        point = (result["base"]["entropy"], result["base"][key])
        evaluation = {k: v for k, v in result.get("evaluation", {}).items() if k != "eval_samples"} or None
        if base is None:
            base = point
        elif point != base or (evaluation and settings and evaluation != settings):
            raise SystemExit(f"{path}: another evaluation than the first file's (base {point} vs {base}, settings "
                             f"{evaluation} vs {settings}): its accuracies and entropies are not comparable")
        settings = settings or evaluation
        for label, run in result["runs"].items():
            for record in run["seeds"]:
                after = record.get("after", {})
                if "entropy" in after and key in after:  # a run recorded in several files counts once
                    runs[label, record["seed"], after["entropy"], after[key]] = ">".join(run["stages"])
    return base, [(label, method, seed, entropy, accuracy)
                  for (label, seed, entropy, accuracy), method in runs.items()]


def pearson(xs: list, ys: list) -> float:
    n = len(xs)
    if n < 3:
        raise ValueError(f"a correlation needs at least 3 runs, got {n}")
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        raise ValueError("a correlation needs runs that differ in both entropy and accuracy")
    return sxy / math.sqrt(sxx * syy)


def plot(base, runs: list, path: str, split: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    methods = sorted({method for _, method, *_ in runs})
    for index, method in enumerate(methods):
        points = [(entropy, 100 * accuracy) for _, m, _, entropy, accuracy in runs if m == method]
        ax.scatter(*zip(*points), s=18, color=f"C{index}", label=method)
    ax.scatter([base[0]], [100 * base[1]], marker="*", s=160, color="black", label="base model")
    ax.set(xlabel="policy entropy per token (nats, own samples at T=1)", ylabel=f"{split} greedy accuracy (%)",
           title="trained runs: accuracy against entropy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.entropy_accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("comparisons", nargs="+", help="comparison.json files of compare_methods")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=None, help="scatter plot (PNG)")
    args = p.parse_args(argv)
    base, runs = collect(args.comparisons, args.split)
    try:
        r = pearson([run[3] for run in runs], [run[4] for run in runs])
    except ValueError as err:
        raise SystemExit(str(err)) from None
    print("| run | method | seed | entropy | accuracy |\n|---|---|---|---|---|")
    for label, method, seed, entropy, accuracy in sorted(runs, key=lambda run: (run[3], run[0])):
        print(f"| {label} | {method} | {seed} | {entropy:.2f} | {100 * accuracy:.1f} |")
    print(f"| base model | - | - | {base[0]:.2f} | {100 * base[1]:.1f} |")
    print(f"\n{len(runs)} trained runs; Pearson's r (entropy, {args.split} accuracy) = {r:.2f}")
    if args.out:
        print(f"plot: {plot(base, runs, args.out, args.split)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
