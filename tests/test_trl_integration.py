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

import pydistill.integrations.trl as pydistill_trl  # noqa: E402
from pydistill.integrations.trl import GRPOTrainer, patch  # noqa: E402

from .trl_helpers import (assert_close_runs, eager_grpo_trainer, run_distillation, run_gkd, run_grpo,  # noqa: E402
                          run_self_distillation, tiny_policy)

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
    dict(loss_type="cispo", num_iterations=2, off_policy_mask_threshold=0.5),
    dict(loss_type="sapo"),
    dict(loss_type="vespo", num_iterations=2),
    dict(loss_type="dapo", epsilon=0.1, epsilon_high=0.3, delta=1.5, num_iterations=2, mask_truncated_completions=True,
         max_completion_length=6),
], ids=lambda o: o["loss_type"])
def test_grpo_loss_types_match_trl(tmp_path, options):
    compare(tmp_path, **options)


def test_grpo_kl_to_reference_model_matches_trl(tmp_path):
    trainer = compare(tmp_path, from_disk=True, beta=0.1, loss_type="grpo", num_iterations=2,
                      use_bias_correction_kl=True)
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


@pytest.mark.parametrize("options", [dict(beta=0.5), dict(beta=0.0, temperature=0.7), dict(beta=1.0)],
                         ids=["jsd", "forward_kl-temperature", "reverse_kl"])
def test_distillation_trainer_matches_trl(tmp_path, options):
    ours = run_distillation(pydistill_trl.DistillationTrainer, tmp_path / "ours", forbid_logits=True, **options)
    assert_close_runs(ours[:2], run_distillation(trl.DistillationTrainer, tmp_path / "trl", **options)[:2])


def test_distillation_trainer_peft_and_accumulation_match_trl(tmp_path):
    from peft import LoraConfig

    options = dict(peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM"),
                   gradient_accumulation_steps=2, per_device_train_batch_size=2)
    ours = run_distillation(pydistill_trl.DistillationTrainer, tmp_path / "ours", forbid_logits=True, **options)
    assert_close_runs(ours[:2], run_distillation(trl.DistillationTrainer, tmp_path / "trl", **options)[:2])


def test_patch_switches_a_distillation_trainer(tmp_path):
    ours = run_distillation(trl.DistillationTrainer, tmp_path / "ours", forbid_logits=True, patch=patch)
    assert_close_runs(ours[:2], run_distillation(trl.DistillationTrainer, tmp_path / "trl")[:2])


@pytest.mark.parametrize("options", [dict(beta=0.5), dict(beta=1.0, gradient_accumulation_steps=2,
                                                          per_device_train_batch_size=2)],
                         ids=["jsd", "reverse_kl-accumulation"])
def test_gkd_trainer_matches_trl(tmp_path, options):
    from trl.experimental.gkd import GKDTrainer

    ours = run_gkd(pydistill_trl.GKDTrainer, tmp_path / "ours", forbid_logits=True, **options)
    assert_close_runs(ours[:2], run_gkd(GKDTrainer, tmp_path / "trl", **options)[:2])


def test_shared_head_is_one_op_with_the_same_divergence():
    """Self-distillation (the teacher is the student model in another context) hands the op one head; the result
    equals passing a separate copy of that head."""
    import copy

    import torch

    from pydistill.integrations.trl.distillation import fused_divergence

    model, _ = tiny_policy()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 32, generator=g, requires_grad=True)
    teacher = torch.randn(2, 5, 32, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    shared = fused_divergence(hidden, model, teacher, model, mask, beta=0.3, temperature=1.0, num_items_in_batch=None)
    separate = fused_divergence(hidden, model, teacher, twin, mask, beta=0.3, temperature=1.0,
                                num_items_in_batch=None)
    torch.testing.assert_close(shared[0], separate[0], rtol=1e-6, atol=1e-7)
    assert int(shared[2]) == 8


def _self_distillation_pair(kind, tmp_path, **options):
    if kind == "sdft":
        from trl.experimental.sdft import SDFTTrainer as theirs
    else:
        from trl.experimental.sdpo import SDPOTrainer as theirs
    ours_cls = pydistill_trl.SDFTTrainer if kind == "sdft" else pydistill_trl.SDPOTrainer
    ours = run_self_distillation(kind, ours_cls, tmp_path / "ours", forbid_logits=True, **options)
    assert_close_runs(ours[:2], run_self_distillation(kind, theirs, tmp_path / "trl", **options)[:2])
    return ours[2]


@pytest.mark.parametrize("kind, options", [
    ("sdft", dict()),  # full-vocabulary JSD(0.5) to a frozen copy (its own head)
    ("sdft", dict(distillation_mode="sampled_token", distillation_alpha=1.0, teacher_model_kind="live",
                  num_loss_tokens_to_skip=2)),
    ("sdpo", dict()),  # reverse KL to an EMA copy, importance clip
    ("sdpo", dict(distillation_weight=0.5, teacher_model_kind="base", loss_type="grpo",
                  gradient_accumulation_steps=2, per_device_train_batch_size=2)),
    ("sdft", dict(distillation_mode="topk_logits", distillation_topk=5, distillation_add_tail=True)),
    ("sdpo", dict(distillation_mode="topk_logits", distillation_topk=3, distillation_add_tail=False,
                  distillation_alpha=0.5, teacher_model_kind="live")),
], ids=["sdft-full", "sdft-sampled-live", "sdpo-ema", "sdpo-blend-accumulation", "sdft-topk-tail",
        "sdpo-topk-renormalized-live"])
def test_self_distillation_trainers_match_trl(tmp_path, kind, options):
    _self_distillation_pair(kind, tmp_path, **options)


def test_self_distillation_peft_base_teacher_shares_the_head(tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _self_distillation_pair("sdft", tmp_path, peft_config=lora, teacher_model_kind="base")
    assert trainer.teacher_model is trainer.model  # adapter disabled for the teacher: one model, one head


def test_lm_head_adapters_are_refused(tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="target_modules includes the lm_head"):  # TRL's SDFT would train it
        run_self_distillation("sdft", pydistill_trl.SDFTTrainer, tmp_path, peft_config=lora)


@pytest.mark.slow  # ~30 s: two processes each train both trainers
def test_grpo_under_two_ddp_processes_matches_trl(tmp_path):
    """Two CPU processes (gloo, through accelerate): the fused forward goes through DDP like TRL's."""
    import os

    import torch

    from .ranks import run_ranks

    out = tmp_path / "runs.pt"
    run_ranks("tests.trl_ddp_worker", [str(out), str(tmp_path / "r{rank}")], 2, env=dict(TRL_EXPERIMENTAL_SILENCE="1"))
    runs = torch.load(out)
    assert runs["ours"]["world"] == 2 and runs["ours"]["wrapped"] == "DistributedDataParallel"
    assert_close_runs((runs["ours"]["losses"], runs["ours"]["grads"]), (runs["trl"]["losses"], runs["trl"]["grads"]))
    assert not os.environ.get("WORLD_SIZE")  # the parent stayed a single process


@pytest.mark.slow  # two fresh processes with TRL and a SmolLM2-shaped model
def test_trl_step_benchmark_smoke(tmp_path):
    import json

    from benchmarks.trl_step import main

    main(["--layers", "1", "--completion-length", "8", "--generations", "2", "--steps", "1", "--rounds", "1",
          "--out", str(tmp_path)])
    records = json.load(open(tmp_path / "results.json"))["records"]
    assert [r["variant"] for r in records] == ["trl", "pydistill"]
    assert all(r["status"] == "ok" and r["peak_mb"] > 0 for r in records)
    assert records[0]["losses"] == pytest.approx(records[1]["losses"], rel=1e-5, abs=1e-7)


def test_memory_budget_reaches_the_op_in_every_mode(tmp_path, monkeypatch):
    """``memory_budget_mb`` (constructor keyword, or patch()'s) picks the op's mode; lean and fast both match TRL.
    The fast run never takes a lean sweep: the hook names the outputs TRL's loss differentiates."""
    import functools

    from pydistill.token_stats import loop

    sweeps = []
    real = loop.stats_backward
    monkeypatch.setattr(loop, "stats_backward", lambda *a, **k: sweeps.append(1) or real(*a, **k))
    theirs = run_grpo(trl.GRPOTrainer, tmp_path / "trl")
    fast = run_grpo(GRPOTrainer, tmp_path / "fast", forbid_logits=True)
    assert sweeps == [] and fast[2].pydistill_memory_budget_mb == 4096
    assert_close_runs(fast[:2], theirs[:2])
    lean = run_grpo(functools.partial(GRPOTrainer, memory_budget_mb=0.01), tmp_path / "lean", forbid_logits=True)
    assert sweeps and lean[2].pydistill_memory_budget_mb == 0.01
    assert_close_runs(lean[:2], theirs[:2])
    sweeps.clear()
    distill = run_distillation(pydistill_trl.DistillationTrainer, tmp_path / "d", forbid_logits=True,
                               patch=lambda t: patch(t, memory_budget_mb=8192))
    assert sweeps == [] and distill[2].pydistill_memory_budget_mb == 8192
    with pytest.raises(ValueError, match="memory_budget_mb must be a finite number > 0"):
        patch(distill[2], memory_budget_mb=0)
