"""Progress bars: the training bar is drawn over the bound that ends the run (the demo's 9 minutes, not its
1000-step ceiling), and the held-out evaluations show theirs."""
import pytest

from pydistill.cli import demo_config
from pydistill.models import tiny_model
from pydistill.trainers import OPSDTrainer
from pydistill.trainers.progress import TrainProgress
from tests.trainer_helpers import ScriptedEngine, tiny_config

pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
              pytest.mark.usefixtures("one_thread")]


def test_the_demo_bar_is_over_its_time_budget(tmp_path):
    config = demo_config(str(tmp_path), minutes=9)
    assert config.max_steps == 1000 and config.time_budget_s == 540  # the ceiling and the bound that ends it
    progress = TrainProgress(config, "train opsd")
    assert (progress.kind, progress.bar.total) == ("seconds", 540.0)
    progress.update(step=3, train_seconds=30.4, generated_tokens=900, loss=0.25)
    line = str(progress.bar)
    assert "30/540 s of training" in line and "step=3/1000" in line and "loss=0.2500" in line
    assert "1000" not in line.replace("step=3/1000", "")  # the step ceiling is not the bar's total
    progress.update(step=40, train_seconds=545.0, generated_tokens=9000, loss=0.2)  # the last step ran past
    assert progress.bar.n == 540.0
    progress.close()


def test_a_resumed_time_boxed_run_starts_where_it_was(tmp_path):
    config = demo_config(str(tmp_path), minutes=2)
    progress = TrainProgress(config, "train opsd", step=5, train_seconds=60.0)
    assert (progress.bar.n, progress.bar.total) == (60.0, 120.0)
    progress.close()


@pytest.mark.parametrize("budgets, kind, total", [({}, "steps", 7),
                                                  (dict(generated_token_budget=5000), "tokens", 5000)])
def test_other_bounds(tmp_path, budgets, kind, total):
    progress = TrainProgress(tiny_config(tmp_path, max_steps=7, **budgets), "train opsd")
    assert (progress.kind, progress.bar.total) == (kind, total)
    progress.update(step=2, train_seconds=9.0, generated_tokens=1200, loss=1.0)
    assert progress.bar.n == (2 if kind == "steps" else 1200)
    if kind == "tokens":
        assert "1200/5000 generated tokens" in str(progress.bar) and "step=2/7" in str(progress.bar)
    progress.close()


def test_a_training_run_draws_both_bars(tmp_path, capsys):
    model, tok = tiny_model(seed=0)
    config = tiny_config(tmp_path, max_steps=2, progress=True, time_budget_s=600, eval_problems=3,
                         eval_max_new_tokens=4)
    OPSDTrainer(config, model=model, tokenizer=tok, rollout_engine=ScriptedEngine(tok)).train()
    err = capsys.readouterr().err
    assert "train opsd" in err and "/600 s of training" in err and "step=2/2" in err
    assert "evaluate" in err and "0/3 " in err  # the final held-out evaluation, counted in prompts (not batches)
