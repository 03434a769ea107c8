"""Training curves of a run folder as a PNG."""
from __future__ import annotations

import os

from .trainers.metrics import read_metrics

CURVES = (("loss", "loss"), ("divergence", "teacher-student divergence"), ("reward", "rollout accuracy (reward)"),
          ("entropy", "entropy per token"))


def plot_run(run_dir: str, path: str | None = None, baseline_accuracy: float | None = None) -> str:
    """Plot loss, divergence, reward and entropy per step (and eval accuracy when logged) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    path = path or os.path.join(run_dir, "training_curves.png")
    fig, axes = plt.subplots(1, len(CURVES) + 1, figsize=(4 * (len(CURVES) + 1), 3.2))
    for ax, (key, title) in zip(axes, CURVES):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker=".", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
    evals = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
    ax = axes[-1]
    if baseline_accuracy is not None:
        evals = [(0, baseline_accuracy)] + evals
    if evals:
        ax.plot(*zip(*evals), marker="o")
    ax.set_title("held-out accuracy")
    ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_comparison(run_dirs: dict, path: str) -> str:
    """Several runs (label -> run folder) in one PNG: policy entropy per token over training, pass@k against k
    at each run's last sampled evaluation, and the distinct final answers per group of samples over training
    (solid, when the method logs it) and on the held-out problems (dashed) — e.g. Feedback Distillation vs GRPO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (entropy_ax, pass_ax, diversity_ax) = plt.subplots(1, 3, figsize=(13, 3.6))
    for index, (label, run_dir) in enumerate(run_dirs.items()):
        color = f"C{index}"
        records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        # a step whose loss saw no token (e.g. GRPO with only zero-spread groups) has no entropy to show
        entropy = [(r["step"], r["entropy"]) for r in records if "entropy" in r and r.get("tokens", 1) > 0]
        if entropy:
            entropy_ax.plot(*zip(*entropy), marker=".", linewidth=1, color=color, label=label)
        evals = [r for r in records if any(k.startswith("eval/pass@") for k in r)]
        if evals:
            last = evals[-1]
            curve = sorted((int(k.split("@")[1]), v) for k, v in last.items() if k.startswith("eval/pass@"))
            pass_ax.plot(*zip(*curve), marker="o", color=color, label=f"{label} (step {last['step']})")
        for key, style, suffix in (("diversity/distinct_answers", "-", "train"),
                                   ("eval/distinct_answers", "--", "held-out")):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                diversity_ax.plot(*zip(*points), style, marker=".", linewidth=1, color=color,
                                  label=f"{label} ({suffix})")
    entropy_ax.set(title="policy entropy per token", xlabel="step")
    pass_ax.set_xscale("log", base=2)
    pass_ax.set(title="held-out pass@k", xlabel="k", ylim=(0, 1))
    pass_ax.set_xticks([1, 2, 4, 8], labels=["1", "2", "4", "8"])
    pass_ax.xaxis.set_minor_formatter(NullFormatter())
    diversity_ax.set(title="distinct final answers per group", xlabel="step")
    for ax in (entropy_ax, pass_ax, diversity_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
