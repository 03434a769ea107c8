"""benchmarks.entropy_accuracy: runs of several comparison.json files, each counted once, Pearson's r, the plot,
and the refusal of files from another evaluation."""
import json
import math

import pytest

from benchmarks import entropy_accuracy

BASE = {"test/accuracy": 0.25, "ood/accuracy": 0.05, "entropy": 2.0}
EVALUATION = dict(model="m", splits=["test", "ood"], eval_problems=8, seed=0, eval_max_new_tokens=16,
                  eval_samples=1, entropy_problems=4)


def comparison(runs: dict, base=BASE, evaluation=EVALUATION) -> dict:
    return dict(base=base, evaluation=evaluation, runs={
        label: dict(stages=stages, seeds=[dict(seed=seed, after={"test/accuracy": a, "entropy": e})
                                          for seed, e, a in points]) for label, (stages, points) in runs.items()})


def test_runs_counted_once_with_pearson_and_plot(tmp_path, capsys):
    first = tmp_path / "a.json"
    second = tmp_path / "b.json"
    first.write_text(json.dumps(comparison({"grpo": (["grpo"], [(0, 1.5, 0.5), (1, 1.7, 0.4)])})))
    # grpo seed 1 again (the same figures: one run) and a chain; pass@k files may differ in eval_samples
    second.write_text(json.dumps(comparison({"grpo": (["grpo"], [(1, 1.7, 0.4)]),
                                             "fd>grpo": (["fd", "grpo"], [(0, 2.5, 0.1)])},
                                            evaluation=dict(EVALUATION, eval_samples=8))))
    base, runs = entropy_accuracy.collect([str(first), str(second)])
    assert base == (2.0, 0.25)
    assert sorted(runs) == [("fd>grpo", "fd>grpo", 0, 2.5, 0.1), ("grpo", "grpo", 0, 1.5, 0.5),
                            ("grpo", "grpo", 1, 1.7, 0.4)]
    xs, ys = [1.5, 1.7, 2.5], [0.5, 0.4, 0.1]
    mx, my = sum(xs) / 3, sum(ys) / 3
    expected = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(
        sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
    assert entropy_accuracy.pearson(xs, ys) == pytest.approx(expected) and expected < -0.9
    out = tmp_path / "plot.png"
    assert entropy_accuracy.main([str(first), str(second), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"3 trained runs; Pearson's r (entropy, test accuracy) = {expected:.2f}" in printed
    assert "| fd>grpo | fd>grpo | 0 | 2.50 | 10.0 |" in printed and out.stat().st_size > 0


def test_other_evaluations_and_too_few_runs_are_refused(tmp_path):
    first = tmp_path / "a.json"
    first.write_text(json.dumps(comparison({"grpo": (["grpo"], [(0, 1.5, 0.5), (1, 1.7, 0.4), (2, 1.6, 0.45)])})))
    other_base = tmp_path / "b.json"
    other_base.write_text(json.dumps(comparison({"fd": (["fd"], [(0, 2.5, 0.1)])}, base=dict(BASE, entropy=2.1))))
    with pytest.raises(SystemExit, match="another evaluation than the first file's"):
        entropy_accuracy.collect([str(first), str(other_base)])
    other_settings = tmp_path / "c.json"
    other_settings.write_text(json.dumps(comparison({"fd": (["fd"], [(0, 2.5, 0.1)])},
                                                    evaluation=dict(EVALUATION, eval_problems=64))))
    with pytest.raises(SystemExit, match="another evaluation"):
        entropy_accuracy.collect([str(first), str(other_settings)])
    few = tmp_path / "d.json"
    few.write_text(json.dumps(comparison({"grpo": (["grpo"], [(0, 1.5, 0.5), (1, 1.7, 0.4)])})))
    with pytest.raises(SystemExit, match="at least 3 runs, got 2"):
        entropy_accuracy.main([str(few)])
    with pytest.raises(SystemExit, match="cannot read"):
        entropy_accuracy.main([str(tmp_path / "missing.json")])
