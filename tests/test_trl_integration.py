"""pydistill inside TRL: the fused trainers must reproduce TRL's own losses and gradients, without logits.

Every run trains a tiny local Llama for 2 steps with scripted rollouts (no generation, no downloads) and SGD, and
compares the logged losses (1e-5 relative) and the gradients before each optimizer step (float32 tolerance) with
TRL's own trainer, which uses its fused LM head, and with a plain full-logits path.
"""
from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

import trl  # noqa: E402

from pydistill.integrations.trl import GRPOTrainer, patch  # noqa: E402

from .trl_helpers import assert_close_runs, eager_grpo_trainer, run_grpo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def compare(tmp_path, *, eager=False, **options):
    ours = run_grpo(GRPOTrainer, tmp_path / "ours", forbid_logits=True, **options)
    theirs = run_grpo(eager_grpo_trainer() if eager else trl.GRPOTrainer, tmp_path / "trl", **options)
    assert_close_runs(ours[:2], theirs[:2])
    return ours[2]


def test_grpo_default_matches_trl_fused_and_eager(tmp_path):
    ours = run_grpo(GRPOTrainer, tmp_path / "ours", forbid_logits=True)
    assert_close_runs(ours[:2], run_grpo(trl.GRPOTrainer, tmp_path / "trl")[:2])
    assert_close_runs(ours[:2], run_grpo(eager_grpo_trainer(), tmp_path / "eager")[:2])
    assert ours[2].args.loss_type == "dapo"


@pytest.mark.parametrize("options", [
    dict(loss_type="grpo", entropy_coef=0.05),
    dict(loss_type="bnpo", top_entropy_quantile=0.5),
    dict(loss_type="dr_grpo", entropy_coef=0.02, scale_rewards="batch"),
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="cispo", num_iterations=2),
    dict(loss_type="sapo"),
    dict(loss_type="vespo", num_iterations=2),
    dict(loss_type="dapo", epsilon=0.1, epsilon_high=0.3, delta=1.5, num_iterations=2, mask_truncated_completions=True,
         max_completion_length=6),
], ids=lambda o: o["loss_type"])
def test_grpo_loss_types_match_trl(tmp_path, options):
    compare(tmp_path, **options)


def test_grpo_kl_to_reference_model_matches_trl(tmp_path):
    trainer = compare(tmp_path, from_disk=True, beta=0.1, loss_type="grpo")
    assert trainer.ref_model is not None


def test_grpo_gradient_accumulation_matches_trl(tmp_path):
    compare(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2, entropy_coef=0.01)


def test_grpo_peft_matches_trl(tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = compare(tmp_path, peft_config=lora, beta=0.05)
    assert trainer.ref_model is None  # the KL reference is the base model with the adapter disabled


def test_patch_switches_an_existing_trainer(tmp_path):
    ours = run_grpo(trl.GRPOTrainer, tmp_path / "ours", forbid_logits=True, patch=patch)
    assert_close_runs(ours[:2], run_grpo(trl.GRPOTrainer, tmp_path / "trl")[:2])


def test_other_trl_version_is_refused_at_construction(tmp_path, monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match="installed TRL is 1.17.0"):
        run_grpo(GRPOTrainer, tmp_path)


def test_patch_refuses_other_trainers():
    with pytest.raises(TypeError, match="got object"):
        patch(object())


def test_moe_aux_loss_is_refused(tmp_path):
    from pydistill.integrations.trl.grpo import check_grpo

    trainer = run_grpo(trl.GRPOTrainer, tmp_path, max_steps=1)[2]
    trainer.aux_loss_enabled = True
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        check_grpo(trainer)
