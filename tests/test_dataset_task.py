"""Your own data and rewards: a jsonl file / saved `datasets` folder with custom column names becomes a task,
named in a config (relative paths are paths); reward functions with TRL's signature receive the dataset's other
columns and the completion ids; the pydistill (problems, completions) form still works."""
import json

import pytest
import torch

from pydistill.models import tiny_model
from pydistill.rewards import combine_rewards, is_trl_signature
from pydistill.tasks import ArithmeticTask, DatasetTask, extract_answer, task_from_config
from pydistill.trainers import GRPOLoopConfig, GRPOLoopTrainer, OPSDTrainer, SFTConfig, SFTTrainer
from tests.trainer_helpers import GroupEngine, ScriptedEngine, tiny_config

pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
              pytest.mark.usefixtures("one_thread")]

SOURCE = ArithmeticTask().problems("train", n=8, seed=3)


def write_jsonl(path, problems=SOURCE):
    """Custom column names: question_text / worked / final, and an extra column the rewards can read."""
    with open(path, "w") as f:
        for i, p in enumerate(problems):
            f.write(json.dumps(dict(question_text=p.question, worked=p.solution, final=f"#### {p.answer}",
                                    difficulty=i % 3)) + "\n")
    return path


COLUMNS = dict(prompt_column="question_text", solution_column="worked", answer_column="final")


def test_jsonl_with_custom_columns_becomes_problems(tmp_path):
    task = DatasetTask(str(write_jsonl(tmp_path / "mine.jsonl")), **COLUMNS)
    assert task.splits == ("train",)
    problems = task.problems("train")
    assert [(p.question, p.solution, p.answer) for p in problems] == [(p.question, p.solution, p.answer)
                                                                       for p in SOURCE]
    assert problems[1].meta["columns"]["difficulty"] == 1
    assert task.is_correct(problems[0], f"The answer is {SOURCE[0].answer}.")
    assert len(task.problems("train", n=3, seed=1)) == 3


def test_saved_dataset_dict_folder_and_in_memory_dataset(tmp_path):
    import datasets

    rows = dict(prompt=["What is 2 + 3?", "What is 4 * 5?"], answer=["5", "20"])
    datasets.DatasetDict(train=datasets.Dataset.from_dict(rows), test=datasets.Dataset.from_dict(rows)) \
        .save_to_disk(str(tmp_path / "saved"))
    task = DatasetTask(str(tmp_path / "saved"), solution_column=None)
    assert set(task.splits) == {"train", "test"}
    first = task.problems("test")[0]
    assert (first.question, first.answer, first.solution) == ("What is 2 + 3?", "5", "The answer is 5.")
    chat = datasets.Dataset.from_dict(dict(prompt=[[{"role": "user", "content": "What is 1 + 1?"}]], answer=["2"]))
    assert DatasetTask(chat, solution_column=None).problems("train")[0].question == "What is 1 + 1?"


def test_bad_dataset_input_names_the_field(tmp_path, monkeypatch):
    path = str(write_jsonl(tmp_path / "mine.jsonl"))
    with pytest.raises(ValueError, match="answer_column 'answer' is not a column.*columns: question_text"):
        DatasetTask(path, prompt_column="question_text", solution_column="worked")
    with pytest.raises(ValueError, match="split 'test' is not a split.*splits: train.*eval_split"):
        DatasetTask(path, **COLUMNS).problems("test")
    with pytest.raises(ValueError, match="dataset 'data/missing.jsonl' does not exist"):
        GRPOLoopConfig(dataset="data/missing.jsonl").validate()
    with pytest.raises(ValueError, match="prompt_column must be a column name, got ''"):
        GRPOLoopConfig(prompt_column="").validate()
    monkeypatch.chdir(tmp_path)  # a relative path is a path, read from the working directory
    cfg = GRPOLoopConfig(dataset="mine.jsonl", **COLUMNS).validate()
    assert isinstance(task_from_config(cfg), DatasetTask)


def test_reward_signature_detection():
    def trl(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    def trl_named(prompts, completions, answer):
        return [0.0] * len(completions)

    def legacy(problems, completions):
        return [0.0] * len(completions)

    assert is_trl_signature(trl) and is_trl_signature(trl_named) and not is_trl_signature(legacy)
    combined, names = combine_rewards([trl, legacy, lambda prompts, completions: [None] * len(completions)])
    values, columns = combined(SOURCE[:2], ["a", "b"])
    assert names[:2] == ["trl", "legacy"] and all(v != v for v in values)  # None -> nan -> advantage 0


def test_grpo_on_a_jsonl_dataset_with_a_trl_reward(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "mine.jsonl")
    calls = []

    def final_match(prompts, completions, final, completion_ids, **kwargs):
        """TRL-style: the dataset's other columns arrive as keyword lists, one entry per completion."""
        calls.append(dict(prompts=prompts, final=final, difficulty=kwargs["difficulty"], ids=completion_ids))
        return [float(extract_answer(c) == f.split()[-1]) for f, c in zip(final, completions)]

    cfg = GRPOLoopConfig(model="tiny", lora_r=0, max_steps=1, batch_size=2, micro_batch_size=2, num_generations=4,
                     max_new_tokens=32, eval_problems=0, output_dir=str(tmp_path / "run"), progress=False,
                     train_problems=8, dataset="mine.jsonl", **COLUMNS)
    model, tok = tiny_model(seed=0)
    engine = GroupEngine(tok, DatasetTask("mine.jsonl", **COLUMNS).problems("train", n=8, seed=cfg.seed))
    trainer = GRPOLoopTrainer(cfg, model=model, tokenizer=tok, rollout_engine=engine, reward_functions=[final_match])
    metrics = trainer.training_step()
    call = calls[0]
    assert len(call["prompts"]) == len(call["final"]) == len(call["ids"]) == 8  # 2 prompts x 4 generations
    assert call["prompts"][0] in {p.question for p in SOURCE} and call["final"][0].startswith("#### ")
    assert all(isinstance(i, list) and i for i in call["ids"])
    # GroupEngine's patterns RWLP and WWPW: 2 of 8 right final answers, as the task's verifier says too.
    assert metrics["rewards/final_match"] == pytest.approx(2 / 8) == metrics["accuracy"]
    assert torch.isfinite(torch.tensor(metrics["loss"]))


def test_opsd_and_sft_read_the_dataset_from_the_config(tmp_path):
    path = str(write_jsonl(tmp_path / "mine.jsonl"))
    model, tok = tiny_model(seed=0)
    cfg = tiny_config(tmp_path, max_steps=1, dataset=path, eval_split="train", eval_problems=2, eval_max_new_tokens=4,
                      **COLUMNS)
    trainer = OPSDTrainer(cfg, model=model, tokenizer=tok, rollout_engine=ScriptedEngine(tok))
    assert trainer.train_pool[0].meta["source"] == "dataset"
    assert "eval/accuracy" in trainer.train()
    sft = SFTTrainer(SFTConfig(model="tiny", lora_r=0, max_steps=1, batch_size=2, micro_batch_size=2,
                               eval_problems=0, output_dir=str(tmp_path / "sft"), progress=False, train_problems=4,
                               dataset=path, **COLUMNS), model=model, tokenizer=tok)
    assert torch.isfinite(torch.tensor(sft.training_step()["loss"]))


def test_readme_dataset_example_runs(tmp_path, monkeypatch):
    """The README's dataset + TRL-reward example as written, on a tiny model with scripted rollouts."""
    import dataclasses
    import os
    import re

    import pydistill.trainers as trainers

    text = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8").read()
    section = text.split("### Your data and your rewards", 1)[1].split("\n### ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    monkeypatch.chdir(tmp_path)
    os.makedirs("data")
    with open("data/my_problems.jsonl", "w") as f:
        for p in SOURCE:
            f.write(json.dumps(dict(q=p.question, final=p.answer, level=1)) + "\n")
    built = []

    def tiny_trainer(config, **kwargs):
        config = dataclasses.replace(config, model="tiny", lora_r=0, max_steps=1, batch_size=2, micro_batch_size=2,
                                     num_generations=4, max_new_tokens=24, progress=False, train_problems=8)
        model, tok = tiny_model(seed=0)
        engine = GroupEngine(tok, SOURCE)  # scripts right and wrong answers from the source problems' solutions
        built.append(GRPOLoopTrainer(config, model=model, tokenizer=tok, rollout_engine=engine, **kwargs))
        return built[-1]

    monkeypatch.setattr(trainers, "GRPOLoopTrainer", tiny_trainer)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    rows = [json.loads(line) for line in open("runs/mine/metrics.jsonl")]
    assert rows[0]["rewards/final_answer"] == pytest.approx(rows[0]["accuracy"])
    assert rows[0]["rewards/shorter"] < 0


def test_eval_takes_the_runs_dataset_and_columns_or_flags(tmp_path, monkeypatch, capsys):
    """`pydistill eval --checkpoint RUN` evaluates on the data the run trained on (its dataset and column names);
    --dataset and the column flags name other data; --task replaces the run's dataset."""
    import pydistill.evaluation as evaluation
    import pydistill.models as models
    from pydistill.cli import main

    path = str(write_jsonl(tmp_path / "mine.jsonl"))
    model, tok = tiny_model(seed=0)
    run = OPSDTrainer(tiny_config(tmp_path, max_steps=1, dataset=path, **COLUMNS), model=model, tokenizer=tok,
                      rollout_engine=ScriptedEngine(tok))
    run.train()
    monkeypatch.setattr(models, "load_model", lambda name, lora=None, **kw: tiny_model(seed=0))
    seen = []
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda m, t, task, problems, **kw: (
        seen.append([p.question for p in problems]), real(m, t, task, problems, **kw))[1])
    args = ["eval", "--checkpoint", run.config.output_dir, "--n", "3", "--max-new-tokens", "2", "--split", "train"]
    assert main(args) == 0
    assert set(seen[-1]) <= {p.question for p in SOURCE} and len(seen[-1]) == 3
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"q": p.question, "a": f"#### {p.answer}"}) + "\n" for p in SOURCE[:2]))
    # The run's solution column ("worked") is not required of another dataset: evaluation never reads it.
    assert main(args + ["--dataset", str(renamed), "--prompt-column", "q", "--answer-column", "a"]) == 0
    assert sorted(seen[-1]) == sorted(p.question for p in SOURCE[:2])
    assert main(args[:-2] + ["--task", "arithmetic", "--split", "test"]) == 0
    assert not set(seen[-1]) & {p.question for p in SOURCE}
    assert "accuracy" in capsys.readouterr().out


def test_eval_on_a_question_and_answer_dataset(tmp_path, monkeypatch, capsys):
    """`pydistill eval --dataset` needs a question and an answer column, no solution; a dataset without them
    ends the command with one line naming the file, the columns expected and the columns there are."""
    import pydistill.models as models
    from pydistill.cli import main

    monkeypatch.setattr(models, "load_model", lambda name, lora=None, **kw: tiny_model(seed=0))
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": p.question, "answer": p.answer}) + "\n" for p in SOURCE[:3]))
    common = ["eval", "--model", "tiny", "--split", "train", "--n", "3", "--max-new-tokens", "2"]
    assert main(common + ["--dataset", str(plain)]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0
    named = tmp_path / "named.jsonl"
    named.write_text("".join(json.dumps({"question": p.question, "final": p.answer}) + "\n" for p in SOURCE[:3]))
    assert main(common + ["--dataset", str(named), "--prompt-column", "question", "--answer-column", "final"]) == 0
    capsys.readouterr()
    assert main(common + ["--dataset", str(named)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert str(named) in err and "prompt_column 'prompt' and answer_column 'answer' are not columns" in err
    assert "expected prompt_column 'prompt' (the question), answer_column 'answer' (the final answer)" in err
    assert "its columns: question, final" in err and "solution" not in err.split("(name them")[0]
