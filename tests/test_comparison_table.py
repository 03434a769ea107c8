"""benchmarks.comparison_table: seeds of one run gathered across invocations, the summary recomputed, and the
joins that would mix unlike runs refused."""
import json

import pytest

from benchmarks import comparison_table
from benchmarks.compare_methods import mean_and_se

EVALUATION = dict(model="m", splits=["test", "ood"], eval_problems=4, seed=0, eval_max_new_tokens=8, eval_samples=1,
                  entropy_problems=2)
BASE = {"test/accuracy": 0.25, "ood/accuracy": 0.0, "entropy": 2.0}


def record(seed, accuracy, lr=5e-5):
    return dict(seed=seed, steps=3, generated_tokens=100 + seed, train_minutes=1.0,
                stages=[dict(method="grpo", output_dir=f"runs/x/grpo/seed{seed}", steps=3, generated_tokens=100)],
                configs=[dict(seed=seed, output_dir=f"runs/x/grpo/seed{seed}", init_from=None, learning_rate=lr)],
                after={"test/accuracy": accuracy, "ood/accuracy": 0.0, "entropy": 2.1})


def comparison(runs, base=BASE, evaluation=EVALUATION):
    return dict(date="2026-12-07", device="cpu", torch="2.13.0+cpu", seeds=[], command="python -m x",
                evaluation=evaluation, base=base,
                runs={label: dict(stages=["grpo"], fields={}, seeds=seeds, summary={}) for label, seeds in runs.items()})


def write(tmp_path, name, result):
    path = tmp_path / name
    path.write_text(json.dumps(result))
    return str(path)


def test_seeds_are_gathered_and_summarised(tmp_path):
    a = write(tmp_path, "a.json", comparison({"grpo": [record(0, 0.25)], "opsd": [record(0, 0.5)]}))
    b = write(tmp_path, "b.json", comparison({"grpo": [record(2, 0.75), record(1, 0.5)]}))
    assert comparison_table.main([a, b, "--out", str(tmp_path / "out")]) == 0
    merged = json.loads((tmp_path / "out" / "comparison.json").read_text())
    grpo = merged["runs"]["grpo"]
    assert [r["seed"] for r in grpo["seeds"]] == [0, 1, 2]
    assert [r["merged_from"] for r in grpo["seeds"]] == [a, b, b]
    mean, se = mean_and_se([0.25, 0.5, 0.75])
    assert grpo["summary"]["test/accuracy"] == dict(mean=pytest.approx(mean), se=pytest.approx(se), n=3)
    assert merged["runs"]["opsd"]["summary"]["test/accuracy"]["n"] == 1
    assert merged["seeds"] == [0, 1, 2] and merged["base"] == BASE
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "| grpo | 3 |" in table and "50.0 ± 14.4 (+25.0)" in table


@pytest.mark.parametrize("second, match", [
    (comparison({"grpo": [record(0, 0.5)]}), "seed 0 appears in two files"),
    (comparison({"grpo": [record(1, 0.5)]}, base=dict(BASE, entropy=2.5)), "its base differs"),
    (comparison({"grpo": [record(1, 0.5)]}, evaluation=dict(EVALUATION, eval_problems=8)), "its evaluation differs"),
    (comparison({"grpo": [record(1, 0.5, lr=1e-4)]}), "trained with other settings"),
])
def test_unlike_runs_are_refused(tmp_path, second, match):
    a = write(tmp_path, "a.json", comparison({"grpo": [record(0, 0.25)]}))
    b = write(tmp_path, "b.json", second)
    with pytest.raises(SystemExit, match=match):
        comparison_table.main([a, b, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_comparison_is_named(tmp_path):
    bad = write(tmp_path, "bad.json", {"runs": {}})
    with pytest.raises(SystemExit, match="lacks the field"):
        comparison_table.main([bad, "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="cannot read"):
        comparison_table.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")])
