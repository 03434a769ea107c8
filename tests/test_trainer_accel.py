"""The accelerate side of the trainers: report_to trackers (TensorBoard through accelerate, metrics.jsonl kept),
gradient checkpointing (same gradients, activations recomputed) and the precision of full fine-tuning."""
import glob
import os

import pytest
import torch

from pydistill.models import tiny_model
from pydistill.trainers import OPSDConfig, OPSDTrainer
from pydistill.trainers.accel import parse_report_to, training_precision
from pydistill.trainers.metrics import read_metrics
from tests.trainer_helpers import TASK, ScriptedEngine, step_gradients, tiny_config

pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
              pytest.mark.usefixtures("one_thread")]


def opsd(tmp_path, **overrides):
    model, tok = tiny_model(seed=0)
    return OPSDTrainer(tiny_config(tmp_path, **overrides), model=model, tokenizer=tok, task=TASK,
                       rollout_engine=ScriptedEngine(tok))


def test_report_to_tensorboard_logs_through_accelerate(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = opsd(tmp_path, max_steps=2, report_to="tensorboard")
    trainer.train()
    run = tmp_path / "run"
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl"))] == [1, 2]  # the JSONL log stays
    events = glob.glob(str(run / "tracking" / "pydistill-opsd" / "events.out.tfevents.*"))
    assert events, os.listdir(run)
    scalars = EventAccumulator(os.path.dirname(events[0])).Reload()
    assert [e.step for e in scalars.Scalars("loss")] == [1, 2]


def test_report_to_is_checked():
    assert parse_report_to("none") == [] and parse_report_to("tensorboard") == ["tensorboard"]
    assert "tensorboard" in parse_report_to("all")
    with pytest.raises(ValueError, match="report_to must be one of .* got 'mlflow'"):
        OPSDConfig(report_to="mlflow").validate()
    with pytest.raises(ValueError, match="report_to 'none' cannot be combined"):
        parse_report_to("none,tensorboard")
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="report_to 'wandb' needs the wandb package.*pip install wandb"):
            OPSDConfig(report_to="wandb").validate()


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    plain = opsd(tmp_path / "a", max_steps=1)
    checkpointed = opsd(tmp_path / "b", max_steps=1, gradient_checkpointing=True)
    assert checkpointed.model.model.layers[0].gradient_checkpointing
    assert not plain.model.model.layers[0].gradient_checkpointing
    layer = checkpointed.model.model.layers[0]
    calls = []
    layer.register_forward_hook(lambda *args: calls.append(1))
    _, g1 = step_gradients(plain)
    _, g2 = step_gradients(checkpointed)
    assert len(calls) == 2  # the layer ran again in backward
    for name, grad in g1.items():
        torch.testing.assert_close(g2[name], grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="gradient_checkpointing must be true or false, got 'yes'"):
        OPSDConfig(gradient_checkpointing="yes").validate()


def test_full_finetune_keeps_fp32_master_weights_under_bf16_autocast(tmp_path):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    full = training_precision(full_finetune=True, device=cuda)
    assert full.load_dtype == torch.float32 and full.mixed_precision in ("bf16", "no")
    assert training_precision(full_finetune=False, device=cuda).load_dtype is None  # LoRA: bf16 base
    assert training_precision(full_finetune=True, device=cpu).mixed_precision == "no"  # the CPU: plain fp32
    trainer = opsd(tmp_path, max_steps=1)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    if torch.cuda.is_available():
        assert trainer.accelerator.mixed_precision == "bf16"


def test_cuda_precision_path_on_the_cpu(tmp_path, monkeypatch):
    """The full fine-tune's CUDA precision (fp32 weights, bf16 autocast) forced on the CPU: a bf16 model handed
    in is upcast, the optimizer holds fp32 weights, and a step under autocast gives finite fp32 gradients."""
    from accelerate.state import AcceleratorState

    import pydistill.trainers.accel as accel

    monkeypatch.setattr(accel, "training_precision",
                        lambda full_finetune, device: accel.Precision(torch.float32, "bf16"))
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    try:
        model, tok = tiny_model(seed=0)
        trainer = OPSDTrainer(tiny_config(tmp_path, max_steps=1), model=model.to(torch.bfloat16), tokenizer=tok,
                              task=TASK, rollout_engine=ScriptedEngine(tok))
        assert trainer.accelerator.mixed_precision == "bf16"
        assert all(p.dtype == torch.float32 for group in trainer.optimizer.param_groups for p in group["params"])
        metrics, grads = step_gradients(trainer)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["loss"] != 0
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())


def test_gradient_checkpointing_under_lora(tmp_path):
    trainer = opsd(tmp_path, max_steps=1, lora_r=4, lora_alpha=8, gradient_checkpointing=True)
    _, grads = step_gradients(trainer)
    lora = [g for name, g in grads.items() if "lora_B" in name]
    assert lora and all(torch.isfinite(g).all() for g in lora) and any(g.abs().sum() > 0 for g in lora)


def test_sharding_kinds_are_classified_or_refused_with_a_message():
    """ZeRO-1/2 keep whole parameters on every process (the DDP path); ZeRO-3 and FSDP1 are refused at start-up
    with one line naming the setting to change; FSDP2 is the sharded path."""
    import types

    from accelerate.utils import DistributedType

    from pydistill.trainers.accel import uses_sharded_parameters

    def accelerator(kind, zero_stage=None, fsdp2=True):
        state = types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=zero_stage),
                                      fsdp_plugin=types.SimpleNamespace(fsdp_version=2 if fsdp2 else 1))
        return types.SimpleNamespace(distributed_type=kind, state=state, is_fsdp2=fsdp2)

    assert uses_sharded_parameters(accelerator(DistributedType.DEEPSPEED, zero_stage=1)) is False
    assert uses_sharded_parameters(accelerator(DistributedType.DEEPSPEED, zero_stage=2)) is False
    assert uses_sharded_parameters(accelerator(DistributedType.MULTI_CPU)) is False
    assert uses_sharded_parameters(accelerator(DistributedType.FSDP)) is True
    with pytest.raises(ValueError, match="ZeRO stage 3 is not supported.*use zero_stage 1 or 2"):
        uses_sharded_parameters(accelerator(DistributedType.DEEPSPEED, zero_stage=3))
    with pytest.raises(ValueError, match="FSDP version 1 is not supported.*fsdp_version: 2"):
        uses_sharded_parameters(accelerator(DistributedType.FSDP, fsdp2=False))
