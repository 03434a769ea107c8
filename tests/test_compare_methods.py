"""benchmarks.compare_methods at tiny scale: several seeds per run, mean and standard error per metric, a
chained run (FD -> GRPO through init_from), labelled variants, and the run grammar's errors."""
import json
import math

import pytest

from benchmarks import compare_methods
from benchmarks.compare_methods import mean_and_se, parse_run
from pydistill.models import tiny_model


def test_mean_and_standard_error():
    assert mean_and_se([0.5]) == (0.5, None)
    mean, se = mean_and_se([0.2, 0.4, 0.9])
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(math.sqrt(((0.3 ** 2 + 0.1 ** 2 + 0.4 ** 2) / 2) / 3))


def test_run_grammar():
    assert parse_run("grpo") == compare_methods.RunSpec("grpo", ["grpo"], {})
    assert parse_run("fd>grpo") == compare_methods.RunSpec("fd>grpo", ["fd", "grpo"], {})
    assert parse_run("ref=rosd:privileged=solution,loss_span=whole") == compare_methods.RunSpec(
        "ref", ["rosd"], {"privileged": "solution", "loss_span": "whole"})
    assert parse_run("rosd:explanation=false").label == "rosd"
    for text, match in [("gpro", "expected"), ("fd>nope", "expected"), ("rosd:colour=red", "no config of"),
                        ("rosd:privileged", "is not FIELD=VALUE")]:
        with pytest.raises(ValueError, match=match):
            parse_run(text)


def test_seeded_comparison_smoke(tmp_path, one_thread, monkeypatch):
    model, tok = tiny_model()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "compare"
    small = [f"--set={m}.{field}" for m in ("grpo", "fd", "rosd") for field in
             ("lora_r=4", "lora_alpha=8", "max_new_tokens=6", "batch_size=2", "micro_batch_size=2",
              "num_generations=2", "learning_rate=0.01")]  # a step large enough to move the entropy
    argv = ["--methods", "grpo", "fd>grpo", "ref=rosd:privileged=solution", "--seeds", "2",
            "--generated-token-budget", "24", "--minutes", "2", "--eval-problems", "3", "--eval-max-new-tokens", "6",
            "--eval-samples", "2", "--entropy-problems", "2", "--model", str(folder), "--out", str(out),
            "--set", "fd.eval_problems=0", *small]
    assert compare_methods.main(argv) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert result["seeds"] == [0, 1] and set(result["runs"]) == {"grpo", "fd>grpo", "ref"}
    base = result["base"]
    assert {"test/accuracy", "ood/accuracy", "test/pass@1", "test/pass@2", "ood/pass@2", "entropy"} <= set(base)
    assert base["entropy"] > 0
    for label, run in result["runs"].items():
        assert [r["seed"] for r in run["seeds"]] == [0, 1]
        assert [c["seed"] for r in run["seeds"] for c in r["configs"][:1]] == [0, 1]
        s = run["summary"]
        for key in ("test/accuracy", "ood/accuracy", "entropy", "test/pass@2"):
            values = [r["after"][key] for r in run["seeds"]]
            mean, se = mean_and_se(values)
            assert s[key]["mean"] == pytest.approx(mean) and s[key]["se"] == pytest.approx(se) and s[key]["n"] == 2
    chain = result["runs"]["fd>grpo"]["seeds"][0]
    assert [st["method"] for st in chain["stages"]] == ["fd", "grpo"]
    fd_config, grpo_config = chain["configs"]
    assert grpo_config["init_from"] == fd_config["output_dir"] == chain["stages"][0]["output_dir"]
    assert fd_config["generated_token_budget"] == grpo_config["generated_token_budget"] == 12  # half each
    assert result["runs"]["ref"]["seeds"][0]["configs"][0]["privileged"] == "solution"
    table = (out / "comparison.md").read_text()
    assert "| fd>grpo | 2 |" in table and "±" in table and "seeds [0, 1]" in table
    assert (out / "comparison.png").exists()

    # a later invocation with the same evaluation settings takes the base figures instead of evaluating again
    evaluated = []
    real_evaluate = compare_methods.evaluate_model
    monkeypatch.setattr(compare_methods, "evaluate_model", lambda *a, **k: evaluated.append(1) or real_evaluate(*a, **k))
    same_evaluation = argv[argv.index("--seeds"):argv.index("--out")]
    later = same_evaluation + ["--methods", "grpo", "--only-seeds", "1", "--out", str(tmp_path / "later"),
                               "--base-from", str(out / "comparison.json"), *small[:7]]
    assert compare_methods.main(later) == 0
    assert json.loads((tmp_path / "later" / "comparison.json").read_text())["base"] == base
    assert len(evaluated) == 1  # the trained run only

    # the trained models evaluated again (here: more samples) without training, found in the earlier files
    monkeypatch.setattr(compare_methods, "train_run", lambda *a, **k: pytest.fail("a run was trained"))
    again = argv[argv.index("--seeds"):argv.index("--out")]
    again[again.index("--eval-samples") + 1] = "4"
    again += ["--methods", "grpo", "fd>grpo", "--out", str(tmp_path / "again"), *small[:14], "--set",
              "fd.eval_problems=0", "--trained-from", str(out / "comparison.json"),
              str(tmp_path / "later" / "comparison.json")]  # seed 1 of grpo is in both: the last file listed wins
    assert compare_methods.main(again) == 0
    redone = json.loads((tmp_path / "again" / "comparison.json").read_text())
    later_result = json.loads((tmp_path / "later" / "comparison.json").read_text())
    for label in ("grpo", "fd>grpo"):
        for seed in (0, 1):
            source = tmp_path / "later" if (label, seed) == ("grpo", 1) else out
            first = (later_result if source != out else result)["runs"][label]["seeds"][-1 if source != out else seed]
            record = redone["runs"][label]["seeds"][seed]
            assert record["trained_in"] == str(source / "comparison.json")
            assert (record["steps"], record["generated_tokens"], record["stages"]) == (
                first["steps"], first["generated_tokens"], first["stages"])
            assert "test/pass@4" in record["after"]
            for key in ("test/accuracy", "ood/accuracy"):  # greedy: the same weights give the same answers
                assert record["after"][key] == first["after"][key]
            # the entropy of the same seeded samples: the trained weights were loaded (FD moved them; GRPO's
            # tiny rollouts earn no reward, hence no gradient)
            assert record["after"]["entropy"] == pytest.approx(first["after"]["entropy"], rel=1e-7)
            if label == "fd>grpo":  # one tiny FD step moved it by ~3e-5, far above float32 rounding
                assert abs(record["after"]["entropy"] - base["entropy"]) > 1e-6

    # other training settings than the earlier run's are refused, before any model is loaded
    monkeypatch.setattr("pydistill.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match="other settings .*learning_rate 0.01 vs 0.001"):
        compare_methods.main(again[:-2] + [str(out / "comparison.json"), "--set", "grpo.learning_rate=1e-3"])
    with pytest.raises(SystemExit, match="no run 'rosd' with seed 0"):
        compare_methods.main(again[:again.index("--methods")] + ["--methods", "rosd", "--out", str(tmp_path / "x"),
                                                                  "--trained-from", str(out / "comparison.json")])


def test_base_from_other_evaluation_settings_fails_before_any_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr("pydistill.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    earlier = tmp_path / "comparison.json"
    earlier.write_text(json.dumps(dict(base={"test/accuracy": 0.5}, evaluation=dict(
        model="SmolLM2-135M-Instruct", splits=["test", "ood"], eval_problems=32, seed=0, eval_max_new_tokens=64,
        eval_samples=1, entropy_problems=16))))
    with pytest.raises(SystemExit, match="--base-from .*eval_problems.: 64"):
        compare_methods.main(["--methods", "grpo", "--eval-problems", "64", "--out", str(tmp_path / "out"),
                              "--base-from", str(earlier)])
    with pytest.raises(SystemExit, match="--base-from .*cannot read"):
        compare_methods.main(["--methods", "grpo", "--out", str(tmp_path / "out"), "--base-from",
                              str(tmp_path / "missing.json")])


def test_bad_runs_fail_before_any_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr("pydistill.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match="no config of"):
        compare_methods.main(["--methods", "grpo:privileged=solution", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="privileged must be one of"):
        compare_methods.main(["--methods", "rosd:privileged=gold", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--only-seeds must be in 0..2"):
        compare_methods.main(["--methods", "grpo", "--seeds", "3", "--only-seeds", "3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="labels must be distinct"):
        compare_methods.main(["--methods", "grpo", "grpo", "--out", str(tmp_path)])


def test_exgrpo_equal_data_rows_smoke(tmp_path, one_thread):
    """The ExGRPO comparison's rows (SFT-only stage, SFT + ExGRPO on the procedural teacher, plain SFT) run and
    are tabled; the SFT-only run has no stage-2 log and is left out of the plot."""
    model, tok = tiny_model()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "compare"
    argv = ["--methods", "sft-only=exgrpo:stage=sft", "exgrpo", "sft=sft:train_problems=4,max_steps=1",
            "--generated-token-budget", "8", "--eval-problems", "2", "--eval-max-new-tokens", "4",
            "--entropy-problems", "1", "--model", str(folder), "--out", str(out)]
    for field in ("lora_r=0", "train_problems=4", "max_new_tokens=4", "sft_steps=1", "num_generations=2",
                  "batch_size=1", "micro_batch_size=1", "ei_filters=false"):
        argv += ["--set", f"exgrpo.{field}"]
    argv += ["--set", "sft.lora_r=0", "--set", "sft.batch_size=2", "--set", "sft.micro_batch_size=2"]
    assert compare_methods.main(argv) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert set(result["runs"]) == {"sft-only", "exgrpo", "sft"}
    assert result["runs"]["sft-only"]["seeds"][0]["configs"][0]["ei_teacher"] == "procedural"
    assert result["runs"]["sft"]["summary"]["steps"]["mean"] == 1
    assert (out / "comparison.png").exists() and "| sft-only | 1 |" in (out / "comparison.md").read_text()
