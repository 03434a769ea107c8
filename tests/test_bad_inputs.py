"""Issue 27 item 5 regressions: bad input gets one line naming the argument and what was expected; a run never
loses its last good checkpoint; nothing outside a run's own files is ever deleted (tiny models)."""
import os

import pytest
import torch

import pydistill.models as models
import pydistill.trainers.checkpoint as ckpt
from pydistill.cli import main
from pydistill.losses import GRPOLoss, distillation_loss, group_advantages, grpo_loss
from pydistill.models import tiny_model
from pydistill.tasks import GSM8KTask
from pydistill.tasks.dataset import DatasetTask
from pydistill.trainers import OPSDTrainer
from pydistill.trainers.checkpoint import CheckpointError, latest_checkpoint
from pydistill.trainers.groups import RewardHealth
from tests.trainer_helpers import TASK, ScriptedEngine, tiny_config

pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
              pytest.mark.usefixtures("one_thread")]


def opsd(tmp_path, task=TASK, hidden_size=32, **overrides):
    model, tok = tiny_model(hidden_size=hidden_size)
    return OPSDTrainer(tiny_config(tmp_path, **overrides), model=model, tokenizer=tok, task=task,
                       rollout_engine=ScriptedEngine(tok))


def one_line_error(capsys, argv):
    capsys.readouterr()  # what came before (e.g. a training run's progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def tiny_loader(monkeypatch):
    """`pydistill eval/export` load the tiny model (of ``sizes["hidden"]``) instead of a hub model."""
    sizes = {"hidden": 32}

    def load(name, lora=None, **kwargs):
        model, tok = tiny_model(hidden_size=sizes["hidden"])
        return (models.apply_lora(model, lora) if lora else model), tok

    monkeypatch.setattr(models, "load_model", load)
    return sizes


# ----- run folders: overwrite deletes only what a pydistill run wrote ---------------------------------------
def test_a_folder_of_the_users_own_files_is_refused_and_never_deleted(tmp_path):
    out = tmp_path / "run"
    for name in ("sft", "tensorboard"):
        os.makedirs(out / name)
        (out / name / "mine.txt").write_text("the user's own work")
    for overwrite in (False, True):
        with pytest.raises(ValueError) as error:
            opsd(tmp_path, overwrite=overwrite)
        message = str(error.value)
        assert "holds sft, tensorboard" in message and "no pydistill run" in message, message
        assert "checkpoints" not in message
    assert (out / "sft" / "mine.txt").exists() and (out / "tensorboard" / "mine.txt").exists()


def test_overwrite_of_a_run_keeps_other_files_and_never_follows_a_link(tmp_path):
    other = opsd(tmp_path / "other", max_steps=1)
    other.train()
    other_checkpoint = latest_checkpoint(other.config.output_dir)
    opsd(tmp_path, max_steps=1).train()
    out = tmp_path / "run"
    (out / "notes.txt").write_text("kept")
    os.symlink(other_checkpoint, out / "checkpoint-7")  # a link to another run's checkpoint
    fresh = opsd(tmp_path, max_steps=1, overwrite=True)
    assert sorted(e for e in os.listdir(out) if not e.startswith(".")) == ["notes.txt"]
    assert os.path.isfile(os.path.join(other_checkpoint, "weights.safetensors"))  # the link, not its target
    fresh.close()


def test_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "out.txt"
    a_file.write_text("x")
    err = one_line_error(capsys, ["train", "opsd", "--output-dir", str(a_file)])
    assert "output_dir" in err and "is a file, not a folder" in err
    assert a_file.read_text() == "x"


# ----- empty and malformed data -----------------------------------------------------------------------------
def _gsm8k_without_test_problems(tmp_path):
    folder = tmp_path / "gsm8k"
    os.makedirs(folder)
    (folder / "train.jsonl").write_text('{"question": "1 + 2?", "answer": "1 + 2 = 3\\n#### 3"}\n')
    (folder / "test.jsonl").write_text("")
    return str(folder)


def test_an_empty_eval_split_is_an_error_not_accuracy_zero(tmp_path, capsys, tiny_loader):
    data = _gsm8k_without_test_problems(tmp_path)
    with pytest.raises(ValueError, match="eval_problems 2 .*'test' split .* has no problems"):
        opsd(tmp_path, task=GSM8KTask(data), eval_problems=2, train_problems=1, batch_size=2)
    err = one_line_error(capsys, ["eval", "--model", "tiny", "--task", "gsm8k", "--data-path", data, "--n", "2"])
    assert "'test' split" in err and "has no problems" in err


def test_empty_and_malformed_dataset_files_are_one_line(tmp_path, capsys, tiny_loader):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text('prompt,answer\n"1 + 1",2\n"2 + 2",4,surplus\n')
    os.makedirs(tmp_path / "no_files")
    for source, expected in ((empty, "holds no rows"), (ragged, "cannot be read as csv"),
                             (tmp_path / "no_files", "holds no data files")):
        with pytest.raises(ValueError) as error:
            DatasetTask(str(source))
        assert str(source) in str(error.value) and expected in str(error.value), str(error.value)
    err = one_line_error(capsys, ["eval", "--model", "tiny", "--dataset", str(empty)])
    assert str(empty) in err and "holds no rows" in err


# ----- export and checkpoints ------------------------------------------------------------------------------
def test_export_to_a_file_or_with_a_model_of_another_size_is_one_line(tmp_path, capsys, tiny_loader):
    run = opsd(tmp_path, max_steps=1)
    run.train()
    a_file = tmp_path / "model.bin"
    a_file.write_text("x")
    err = one_line_error(capsys, ["export", run.config.output_dir, "--output", str(a_file)])
    assert f"output {str(a_file)!r} is a file, not a folder" in err
    tiny_loader["hidden"] = 64
    err = one_line_error(capsys, ["export", run.config.output_dir, "--output", str(tmp_path / "merged")])
    assert "weights.safetensors" in err and "shape" in err and "--model" in err
    assert not os.path.exists(tmp_path / "merged")


def test_a_truncated_or_broken_checkpoint_file_is_named_on_resume(tmp_path, capsys, tiny_loader):
    opsd(tmp_path, max_steps=1).train()
    checkpoint = latest_checkpoint(str(tmp_path / "run"))
    state_file = os.path.join(checkpoint, "trainer_state.json")
    good_state = open(state_file).read()
    with open(state_file, "w") as f:
        f.write(good_state[:20])
    with pytest.raises(CheckpointError, match="trainer_state.json is not valid JSON"):
        opsd(tmp_path, max_steps=2, resume=True)
    err = one_line_error(capsys, ["eval", "--checkpoint", str(tmp_path / "run"), "--n", "1"])
    assert "trainer_state.json is not valid JSON" in err
    with open(state_file, "w") as f:
        f.write(good_state)
    weights = os.path.join(checkpoint, "weights.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*weights.safetensors"):
        opsd(tmp_path, max_steps=2, resume=True)


def test_a_checkpoint_linked_in_from_another_run_is_not_followed(tmp_path):
    other = opsd(tmp_path / "other", max_steps=1)
    other.train()
    opsd(tmp_path, max_steps=1).train()
    own = tmp_path / "run" / "checkpoint-1"
    os.rename(own, tmp_path / "moved")
    os.symlink(latest_checkpoint(other.config.output_dir), own)
    with pytest.raises(CheckpointError, match="symbolic link"):
        latest_checkpoint(str(tmp_path / "run"))
    with pytest.raises(CheckpointError, match="symbolic link"):
        opsd(tmp_path, max_steps=2, resume=True)


def test_latest_moves_only_after_the_checkpoint_is_complete(tmp_path, monkeypatch):
    """A save killed at any file operation leaves ``latest`` on a complete checkpoint: the previous one until
    the new folder is in place with every file, then the new one. (The SIGKILL test rarely hits the short
    window between the pointer and the folder; this pins the order.)"""
    trainer = opsd(tmp_path, max_steps=1)
    trainer.train()
    out = trainer.config.output_dir
    expected = sorted(os.listdir(latest_checkpoint(out)))
    real = {"replace": os.replace, "rmtree": ckpt.shutil.rmtree, "save_file": ckpt.save_file}
    calls = {"n": 0}

    def counting(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise KeyboardInterrupt("killed")
            return fn(*args, **kwargs)
        return wrapped

    for kill_at in range(1, 8):
        calls["n"] = 0
        monkeypatch.setattr(os, "replace", counting(real["replace"]))
        monkeypatch.setattr(ckpt.shutil, "rmtree", counting(real["rmtree"]))
        monkeypatch.setattr(ckpt, "save_file", counting(real["save_file"]))
        trainer.step += 1  # a new step each time: the first save of its folder
        try:
            trainer.save()
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
        path = latest_checkpoint(out)  # raises if `latest` names a folder not (yet) in place
        assert sorted(os.listdir(path)) == expected, (kill_at, path)
        ckpt.clean_stale(out)


# ----- losses and reward functions --------------------------------------------------------------------------
def test_loss_inputs_of_the_wrong_kind_are_one_line():
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"weight must have shape \[V, H\] with V >= 1.*got \(0, 8\)"):
        distillation_loss(hidden, torch.randn(0, 8), hidden.detach())
    with pytest.raises(ValueError, match="group_size must be a positive int, got True"):
        group_advantages(torch.tensor([1.0, 0.0]), True)
    targets, adv = torch.zeros(2, 3, dtype=torch.long), torch.tensor([1.0, -1.0])
    with pytest.raises(ValueError, match="epsilon_low must be a finite number >= 0, got None"):
        grpo_loss(hidden, torch.randn(11, 8), targets, adv, epsilon_low=None)
    with pytest.raises(ValueError, match="epsilon_low must be a finite number >= 0, got None"):
        GRPOLoss(epsilon_low=None)
    for name in ("beta", "entropy_coef"):  # None meant 0 silently
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0, got None"):
            grpo_loss(hidden, torch.randn(11, 8), targets, adv, **{name: None})
    with pytest.raises(ValueError, match="num_items_in_batch must be a number > 0 .*got True"):
        grpo_loss(hidden, torch.randn(11, 8), targets, adv, num_items_in_batch=True)
    with pytest.raises(ValueError, match="num_items_in_batch must be a number > 0 .*got 'x'"):
        grpo_loss(hidden, torch.randn(11, 8), targets, adv, num_items_in_batch="x")
    with pytest.raises(ValueError, match="max_completion_length must be a positive int, got True"):
        grpo_loss(hidden, torch.randn(11, 8), targets, adv, loss_type="dr_grpo", max_completion_length=True)
    loss = grpo_loss(hidden, torch.randn(11, 8), targets, adv, num_items_in_batch=torch.tensor(6))
    assert torch.isfinite(loss.loss)  # a one-element tensor, as transformers passes it, still counts


def test_a_reward_function_returning_text_is_a_failure(capsys):
    health = RewardHealth(max_failures=5)
    scores = health.run("texty", lambda: ["1.0", "0"], ["a", "b"])
    assert all(s != s for s in scores)  # nan: unscorable
    assert health.failures == 1
    assert "reward function 'texty' failed" in capsys.readouterr().err
    assert health.run("numbers", lambda: [1, 0.5], ["a", "b"]) == [1.0, 0.5]

