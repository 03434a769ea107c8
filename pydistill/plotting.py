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
