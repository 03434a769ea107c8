"""Issue 16 regressions: checkpoints, run folders, non-finite guards, reward failures, resume (tiny models)."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import pydistill.trainers.checkpoint as ckpt
from pydistill.models import tiny_model
from pydistill.trainers import GRPOLoopConfig, GRPOLoopTrainer, OPSDTrainer
from pydistill.trainers.checkpoint import CheckpointError, clean_stale, latest_checkpoint
from pydistill.trainers.core import NonFiniteTraining
from pydistill.trainers.groups import RewardFunctionError
from pydistill.trainers.metrics import read_metrics
from tests.trainer_helpers import TASK, GroupEngine, ScriptedEngine, tiny_config

pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
              pytest.mark.usefixtures("one_thread")]


def opsd(tmp_path, seed=0, **overrides):
    model, tok = tiny_model(seed=seed)
    return OPSDTrainer(tiny_config(tmp_path, **overrides), model=model, tokenizer=tok, task=TASK,
                       rollout_engine=ScriptedEngine(tok))


def grpo(tmp_path, rewards, **overrides):
    values = dict(model="tiny", lora_r=0, max_steps=2, batch_size=2, micro_batch_size=2, num_generations=4,
                  max_new_tokens=16, eval_problems=0, output_dir=str(tmp_path / "run"), learning_rate=1e-3,
                  progress=False, train_problems=8, max_grad_norm=1.0)
    values.update(overrides)
    cfg = GRPOLoopConfig(**values)
    model, tok = tiny_model()
    engine = GroupEngine(tok, TASK.problems(cfg.train_split, n=cfg.train_problems, seed=cfg.seed))
    return GRPOLoopTrainer(cfg, model=model, tokenizer=tok, task=TASK, rollout_engine=engine, reward_functions=rewards)


def finite(trainer):
    return all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


# ----- 1. checkpoints ---------------------------------------------------------------------------------------
def test_resave_of_the_latest_step_survives_a_kill_at_every_point(tmp_path, monkeypatch):
    trainer = opsd(tmp_path, max_steps=1)
    trainer.train()
    out = trainer.config.output_dir
    calls = {"n": 0}
    real_replace, real_rmtree = os.replace, ckpt.shutil.rmtree

    for kill_at in range(1, 8):
        def counting(fn):
            def wrapped(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == kill_at:
                    raise KeyboardInterrupt("killed")
                return fn(*args, **kwargs)
            return wrapped

        calls["n"] = 0
        monkeypatch.setattr(os, "replace", counting(real_replace))
        monkeypatch.setattr(ckpt.shutil, "rmtree", counting(real_rmtree))
        trainer._saved_step = None  # force a re-save of step 1, the one `latest` names
        try:
            trainer.save()
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(os, "replace", real_replace)
        monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
        path = latest_checkpoint(out)  # the pointer always names a complete checkpoint
        assert load_file(os.path.join(path, "weights.safetensors"))
        clean_stale(out)
        assert latest_checkpoint(out).endswith("checkpoint-1")
        assert sorted(e for e in os.listdir(out) if e.startswith(("checkpoint", ".tmp", ".trash"))) == ["checkpoint-1"]


def test_no_resave_at_the_end_or_when_a_finished_run_resumes(tmp_path, monkeypatch):
    trainer = opsd(tmp_path, max_steps=2, save_every=1)
    saved = []
    real = ckpt.save_checkpoint
    monkeypatch.setattr("pydistill.trainers.core.save_checkpoint", lambda *a, **k: saved.append(a[1]) or real(*a, **k))
    trainer.train()
    assert saved == [1, 2]
    opsd(tmp_path, max_steps=2, save_every=1, resume=True).train()
    assert saved == [1, 2]


def test_stale_temporary_folders_are_removed_and_metrics_cut_back_on_resume(tmp_path):
    trainer = opsd(tmp_path, max_steps=2, save_every=1)
    trainer.train()
    out = trainer.config.output_dir
    os.makedirs(os.path.join(out, ".tmp-checkpoint-abc"))
    with open(os.path.join(out, "latest"), "w") as f:
        f.write("checkpoint-1")  # as if killed after logging step 2, before its checkpoint
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 1')  # a line cut by the kill
    resumed = opsd(tmp_path, max_steps=3, save_every=1, resume=True)
    assert resumed.step == 1 and not os.path.exists(os.path.join(out, ".tmp-checkpoint-abc"))
    resumed.train()
    assert [r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]


# ----- 4. resume runs no pickled code and stays inside the run --------------------------------------------
class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/pydistill-pwned", "w"))


def test_a_planted_pickle_is_refused(tmp_path):
    trainer = opsd(tmp_path, max_steps=1)
    trainer.train()
    path = latest_checkpoint(trainer.config.output_dir)
    with open(os.path.join(path, "training_state.pt"), "wb") as f:
        pickle.dump({"optimizer": _Payload()}, f)
    with pytest.raises(CheckpointError, match="not written by this version"):
        opsd(tmp_path, max_steps=2, resume=True)
    assert not os.path.exists("/tmp/pydistill-pwned")


@pytest.mark.parametrize("pointer", ["/etc", "../elsewhere/checkpoint-1", "checkpoint-1/../../x"])
def test_latest_must_name_a_checkpoint_of_the_run(tmp_path, pointer):
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "latest").write_text(pointer)
    with pytest.raises(CheckpointError, match="not a checkpoint-<step> folder"):
        latest_checkpoint(str(tmp_path / "run"))


# ----- 7. a longer schedule on resume ---------------------------------------------------------------------
def test_resume_with_more_steps_follows_the_new_schedule(tmp_path):
    opsd(tmp_path, max_steps=2, lr_scheduler="linear").train()
    resumed = opsd(tmp_path, max_steps=4, lr_scheduler="linear", resume=True)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3 * 2 / 4)  # not the old end, 0
    metrics = resumed.training_step()
    assert metrics["learning_rate"] == pytest.approx(5e-3 * 1 / 4)


# ----- 3. run folders ------------------------------------------------------------------------------------
def test_a_used_folder_needs_resume_or_overwrite(tmp_path):
    opsd(tmp_path, max_steps=1).train()
    with pytest.raises(ValueError, match="already holds a run.*--overwrite true"):
        opsd(tmp_path, max_steps=1)
    fresh = opsd(tmp_path, max_steps=1, overwrite=True)
    assert not os.path.exists(os.path.join(fresh.config.output_dir, "checkpoint-1"))
    fresh.train()
    assert len(read_metrics(os.path.join(fresh.config.output_dir, "metrics.jsonl"))) == 1


def test_a_second_process_cannot_take_the_run_folder(tmp_path):
    trainer = opsd(tmp_path, max_steps=1)  # holds the lock until train() ends
    code = ("import sys; from pydistill.trainers.run_folder import acquire\n"
            "try:\n    acquire(sys.argv[1])\nexcept ValueError as e:\n    print(e); sys.exit(3)\n")
    other = subprocess.run([sys.executable, "-c", code, trainer.config.output_dir], capture_output=True, text=True)
    assert other.returncode == 3 and "is in use by pid" in other.stdout
    trainer.train()
    other = subprocess.run([sys.executable, "-c", code, trainer.config.output_dir], capture_output=True, text=True)
    assert other.returncode == 0, other.stdout


# ----- 2. non-finite values and failing reward functions --------------------------------------------------
def test_infinite_and_missing_rewards_are_unscorable_and_counted(tmp_path):
    def odd(problems, completions):
        return [float("inf"), None, 1.0, 0.0] * (len(completions) // 4)

    trainer = grpo(tmp_path, [odd])
    trainer.train()
    assert finite(trainer)
    records = read_metrics(os.path.join(trainer.config.output_dir, "metrics.jsonl"))
    assert records[-1]["rewards/nonfinite_total"] == 8  # 2 steps x 2 prompts x 2 of their 4 rollouts
    assert all(isinstance(r["reward"], float) and r["reward"] == r["reward"] for r in records)
    assert "Infinity" not in open(os.path.join(trainer.config.output_dir, "metrics.jsonl")).read()


def test_a_raising_reward_is_reported_counted_and_ends_the_run_with_a_checkpoint(tmp_path, capsys):
    calls = {"n": 0}

    def flaky(problems, completions):
        calls["n"] += 1
        if calls["n"] > 2:
            raise ZeroDivisionError("boom")
        return [1.0, 0.0] * (len(completions) // 2)

    trainer = grpo(tmp_path, [flaky], max_steps=10, max_reward_failures=2)
    with pytest.raises(RewardFunctionError, match="'flaky' failed 2 times"):
        trainer.train()
    err = capsys.readouterr().err
    assert "reward function 'flaky' failed (ZeroDivisionError: boom)" in err and "e.g. '" in err
    path = latest_checkpoint(trainer.config.output_dir)
    state = json.load(open(os.path.join(path, "trainer_state.json")))
    # steps 1-2 scored, step 3 trained on a failed (unscorable) call, step 4's failure ended the run: its
    # checkpoint is the state before step 4 (data position and RNG states of step 3's end)
    assert state["step"] == 3 and state["data_position"] == 3 * 2


def test_a_nonfinite_loss_skips_the_update_and_stops_after_k_in_a_row(tmp_path):
    trainer = opsd(tmp_path, max_steps=10, max_nonfinite_steps=2)
    real_loss = trainer.loss

    def poisoned(prepared, num_items):
        out = real_loss(prepared, num_items)
        return out._replace(loss=out.loss * float("nan")) if trainer.step >= 1 else out

    trainer.loss = poisoned
    with pytest.raises(NonFiniteTraining, match="2 optimizer steps in a row"):
        trainer.train()
    assert finite(trainer)
    records = read_metrics(os.path.join(trainer.config.output_dir, "metrics.jsonl"))
    assert [r["nonfinite_skipped"] for r in records] == [0, 1]
    path = latest_checkpoint(trainer.config.output_dir)
    weights = load_file(os.path.join(path, "weights.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_no_checkpoint_with_nonfinite_weights(tmp_path):
    trainer = opsd(tmp_path, max_steps=1)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(ckpt.NonFiniteWeights):
        trainer.save()
    assert latest_checkpoint(trainer.config.output_dir) is None


def test_any_crash_in_the_loop_saves_an_emergency_checkpoint(tmp_path, monkeypatch):
    trainer = opsd(tmp_path, max_steps=5)
    real = trainer.prepare

    def crash_at_step_3(problems):
        if trainer.step == 2:
            raise RuntimeError("disk on fire")
        return real(problems)

    trainer.prepare = crash_at_step_3
    with pytest.raises(RuntimeError, match="disk on fire"):
        trainer.train()
    path = latest_checkpoint(trainer.config.output_dir)
    assert path.endswith("checkpoint-2")
    assert json.load(open(os.path.join(path, "trainer_state.json")))["data_position"] == 8


# ----- issue 15: checkpoints the ecosystem loads; eval reads the run's settings --------------------------
def test_checkpoints_load_with_from_pretrained(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = opsd(tmp_path / "full", max_steps=1)
    full.train()
    folder = os.path.join(latest_checkpoint(full.config.output_dir), "model")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    trained = dict(full.model.named_parameters())
    for name, p in loaded.named_parameters():
        assert torch.equal(p, trained[name]), name
    assert AutoTokenizer.from_pretrained(folder).encode("3 + 4 = 7") == full.tokenizer.encode("3 + 4 = 7")

    lora = opsd(tmp_path / "lora", max_steps=1, lora_r=4, lora_alpha=8)
    lora.train()
    base, _ = tiny_model()
    adapted = PeftModel.from_pretrained(base, os.path.join(latest_checkpoint(lora.config.output_dir), "adapter"))
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(adapted(ids).logits, lora.model(ids).logits)


def test_eval_reads_the_runs_lora_settings(tmp_path, monkeypatch, capsys):
    import pydistill.models as models
    from pydistill.cli import main

    lora = opsd(tmp_path, max_steps=1, lora_r=4, lora_alpha=8)
    lora.train()
    seen = {}

    def fake_load(name, lora=None, **kwargs):
        seen.update(name=name, lora=lora)
        model, tok = tiny_model()
        return models.apply_lora(model, lora), tok

    monkeypatch.setattr(models, "load_model", fake_load)
    assert main(["eval", "--checkpoint", lora.config.output_dir, "--n", "2", "--max-new-tokens", "2"]) == 0
    assert seen["name"] == "tiny" and (seen["lora"].r, seen["lora"].alpha) == (4, 8)
    assert "accuracy" in capsys.readouterr().out


def test_a_crash_in_exgrpo_sft_saves_the_sft_stage(tmp_path):
    from tests.test_trainer_exgrpo import make_trainer as exgrpo_trainer

    trainer = exgrpo_trainer(tmp_path, sft_steps=3, save_every=0)
    real = trainer.sft_loss

    def crash_in_step_2(batch, num_items):
        if trainer.sft_step == 1:
            raise RuntimeError("out of memory")
        return real(batch, num_items)

    trainer.sft_loss = crash_in_step_2
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train()
    path = latest_checkpoint(os.path.join(trainer.config.output_dir, "sft"))
    state = json.load(open(os.path.join(path, "trainer_state.json")))
    assert state["step"] == 1 and state["sft_position"] == trainer.config.sft_batch_size
    assert latest_checkpoint(trainer.config.output_dir) is None  # no stage-2 checkpoint claimed


def test_export_merges_the_runs_lora_into_one_loadable_model(tmp_path, monkeypatch, capsys):
    """`pydistill export RUN --output DIR`: the run's model and LoRA settings from its checkpoint, the adapter
    merged, a folder that plain transformers loads and that computes what the trained PEFT model computes."""
    import pydistill.models as models
    from transformers import AutoModelForCausalLM

    from pydistill.cli import main

    lora = opsd(tmp_path, max_steps=1, lora_r=4, lora_alpha=8)
    lora.train()
    seen = {}

    def base_with(name, lora=None, **kwargs):
        seen.update(name=name, lora=lora)
        model, tok = tiny_model()  # the run's base weights (seed 0)
        return models.apply_lora(model, lora), tok

    monkeypatch.setattr(models, "load_model", base_with)
    out = tmp_path / "merged"
    assert main(["export", lora.config.output_dir, "--output", str(out)]) == 0
    assert seen["name"] == "tiny" and (seen["lora"].r, seen["lora"].alpha) == (4, 8)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, lora.model(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(ids).logits, tiny_model()[0](ids).logits)  # the adapter did train
    assert main(["export", lora.config.output_dir, "--output", str(out)]) == 2  # never over a model folder
    assert "is not empty" in capsys.readouterr().err


def test_save_total_limit_keeps_the_newest_and_deletes_only_after_a_complete_save(tmp_path, monkeypatch):
    import pydistill.trainers.checkpoint as checkpoint

    trainer = opsd(tmp_path, max_steps=3, save_every=1, save_total_limit=2, save_pretrained=False)
    trainer.train()
    run = trainer.config.output_dir
    assert sorted(e for e in os.listdir(run) if e.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-3"]
    assert latest_checkpoint(run) == os.path.join(run, "checkpoint-3")

    # A save that dies while writing step 3 deletes nothing: the two complete checkpoints before it stay.
    crashing = opsd(tmp_path / "crash", max_steps=3, save_every=1, save_total_limit=2, save_pretrained=False)
    real = checkpoint.save_file

    def die_at_step_3(state, path, *args, **kwargs):
        if crashing.step == 3:
            raise OSError("disk full")
        return real(state, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", die_at_step_3)
    with pytest.raises(OSError, match="disk full"):
        crashing.train()
    run = crashing.config.output_dir
    assert sorted(e for e in os.listdir(run) if e.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    assert latest_checkpoint(run) == os.path.join(run, "checkpoint-2")
    with pytest.raises(ValueError, match="save_total_limit must be >= 1 or null"):
        tiny_config(tmp_path, save_total_limit=0).validate()
