"""Tiny local TRL setups for the integration tests: a random Llama, scripted rollouts, recorded gradients."""
from __future__ import annotations

import os

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

PROMPTS = ["Tom has 12 apples.", "Ana buys 5 more.", "8 / 2 = 4.", "Reason step by step.",
           "How many stickers?", "20 - 7 = 13.", "Here is a solution.", "9 + 6 = 15."]


def tiny_policy(seed=0, hidden_size=32, layers=2):
    from pydistill.models import tiny_model

    model, tokenizer = tiny_model(hidden_size=hidden_size, layers=layers, seed=seed)
    tokenizer.padding_side = "left"
    return model, tokenizer


def scripted_rollouts(prompts, trainer):
    """Deterministic completions of different lengths (some end early: padding inside the batch)."""
    tok = trainer.processing_class
    prompt_ids, completion_ids = [], []
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        g = torch.Generator().manual_seed(sum(ids) + 7 * i)
        length = 3 + (i * 5 + len(ids)) % 6
        body = torch.randint(3, len(tok) - 1, (length,), generator=g).tolist()
        prompt_ids.append(ids)
        completion_ids.append(body + [tok.eos_token_id])
    return dict(prompt_ids=prompt_ids, completion_ids=completion_ids, logprobs=None)


def length_reward(completions, **kwargs):
    return [float(len(c) % 5) for c in completions]


class GradientRecorder:
    """A TrainerCallback that keeps a float64 copy of every trainable parameter's gradient before each step."""

    def __init__(self):
        self.steps = []

    def __getattr__(self, name):  # every other callback event is a no-op
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().double().clone() for n, p in model.named_parameters()
                           if p.requires_grad and p.grad is not None})


def grpo_config(tmp_path, **overrides):
    from trl import GRPOConfig

    values = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=10, learning_rate=1e-2, optim="sgd", report_to="none", use_cpu=True,
                  logging_steps=1, save_strategy="no", seed=0, disable_dropout=True, lr_scheduler_type="constant",
                  dataloader_num_workers=0, bf16=False)
    values.update(overrides)
    return GRPOConfig(**values)


def run_grpo(trainer_cls, tmp_path, *, from_disk=False, peft_config=None, forbid_logits=False, patch=None,
             **overrides):
    """Train 2 steps; return (logged losses, recorded gradients, trainer). ``from_disk`` saves the tiny model
    and passes its path (TRL then builds the KL reference model from it); ``patch`` is applied to the trainer."""
    from datasets import Dataset

    model, tokenizer = tiny_policy()
    if from_disk:
        model.save_pretrained(tmp_path / "policy")
        model = str(tmp_path / "policy")
    recorder = GradientRecorder()
    trainer = trainer_cls(model=model, reward_funcs=length_reward, args=grpo_config(tmp_path, **overrides),
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
                          rollout_func=scripted_rollouts, callbacks=[recorder], peft_config=peft_config)
    return train_and_record(trainer, recorder, patch, forbid_logits, "ref_model")


def forbid_lm_head(model, trainer=None):
    """Make the lm_head raise on more than one position per row while gradients are on or while the trainer's
    ``compute_loss`` runs (teacher forwards run without gradients): any [B, T, V] logits of a training forward
    fail the test, while generation (no gradients, outside the loss) keeps working."""
    from pydistill.integrations.trl._head import unwrap

    head = unwrap(model).get_output_embeddings()
    original = head.forward
    state = getattr(trainer, "_forbid_state", None) if trainer is not None else None
    if trainer is not None and state is None:
        state = trainer._forbid_state = {"in_loss": False}
        compute_loss = trainer.compute_loss

        def guarded_loss(*args, **kwargs):
            state["in_loss"] = True
            try:
                return compute_loss(*args, **kwargs)
            finally:
                state["in_loss"] = False

        trainer.compute_loss = guarded_loss

    def guarded(hidden, *args, **kwargs):
        training = torch.is_grad_enabled() or (state is not None and state["in_loss"])
        if training and hidden.dim() == 3 and hidden.shape[1] > 1:
            raise AssertionError(f"the lm_head forward ran on {tuple(hidden.shape)}: [B, T, V] logits were built")
        return original(hidden, *args, **kwargs)

    head.forward = guarded



def train_and_record(trainer, recorder, patch, forbid_logits: bool, other_model: str):
    """Optionally patch the trainer and forbid [B, T, V] logits in the policy and ``other_model`` (the reference
    or the teacher, when present), train, and return (logged losses, recorded gradient steps, trainer)."""
    if patch is not None:
        patch(trainer)
    if forbid_logits:
        forbid_lm_head(trainer.model, trainer)
        if getattr(trainer, other_model, None) is not None:
            forbid_lm_head(getattr(trainer, other_model), trainer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, recorder.steps, trainer

def eager_grpo_trainer():
    """TRL's GRPOTrainer with its fused head bypassed: full logits, log_softmax, entropy (the plain path)."""
    import trl

    class EagerGRPOTrainer(trl.GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **multimodal):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -logits_to_keep - 1:-1]
            logp_all = torch.log_softmax(logits.float() / self.temperature, dim=-1)
            targets = input_ids[:, -logits_to_keep:]
            valid = attention_mask[:, -logits_to_keep:] != 0
            logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * valid
            entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
            return logps, entropy if compute_entropy else None, None

    return EagerGRPOTrainer


def assert_close_runs(ours, theirs, rtol=1e-5, grad_atol=1e-6):
    """Losses to ``rtol`` relative; gradients to float32 tolerance (relative to the largest entry)."""
    (loss_a, grads_a), (loss_b, grads_b) = ours, theirs
    assert len(loss_a) == len(loss_b) and len(loss_a) > 0
    for a, b in zip(loss_a, loss_b):
        assert abs(a - b) <= rtol * max(abs(b), 1e-8) + 1e-9, f"loss {a} vs TRL {b}"
    assert len(grads_a) == len(grads_b) and len(grads_a) > 0
    for step_a, step_b in zip(grads_a, grads_b):
        assert step_a.keys() == step_b.keys()
        for name in step_b:
            scale = step_b[name].abs().max().item() + 1e-12
            err = (step_a[name] - step_b[name]).abs().max().item()
            assert err <= grad_atol + 1e-4 * scale, f"{name}: max gradient difference {err:.3e} (scale {scale:.3e})"


def distillation_config(tmp_path, **overrides):
    from trl import DistillationConfig

    values = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, max_completion_length=8,
                  learning_rate=1e-2, optim="sgd", report_to="none", use_cpu=True, logging_steps=1,
                  save_strategy="no", seed=0, lr_scheduler_type="constant", bf16=False, beta=0.5)
    values.update(overrides)
    return DistillationConfig(**values)


def run_distillation(trainer_cls, tmp_path, *, peft_config=None, forbid_logits=False, patch=None, **overrides):
    """DistillationTrainer, 2 steps, a tiny student and a wider tiny teacher with its own head."""
    from datasets import Dataset

    student, tokenizer = tiny_policy(seed=0)
    teacher, _ = tiny_policy(seed=1, hidden_size=48)
    recorder = GradientRecorder()
    trainer = trainer_cls(model=student, teacher_model=teacher, args=distillation_config(tmp_path, **overrides),
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
                          callbacks=[recorder], peft_config=peft_config)
    return train_and_record(trainer, recorder, patch, forbid_logits, "teacher_model")


def gkd_config(tmp_path, **overrides):
    from trl.experimental.gkd import GKDConfig

    values = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, max_length=48,
                  learning_rate=1e-2, optim="sgd", report_to="none", use_cpu=True, logging_steps=1,
                  save_strategy="no", seed=0, lr_scheduler_type="constant", bf16=False, lmbda=0.0, beta=0.5)
    values.update(overrides)
    return GKDConfig(**values)


def run_gkd(trainer_cls, tmp_path, *, peft_config=None, forbid_logits=False, **overrides):
    """GKDTrainer on fixed conversations (lmbda=0: no generation), 2 steps."""
    from datasets import Dataset

    student, tokenizer = tiny_policy(seed=0)
    teacher, _ = tiny_policy(seed=1, hidden_size=48)
    rows = [[{"role": "user", "content": p}, {"role": "assistant", "content": f"{i} + 1 = {i + 1}."}]
            for i, p in enumerate(PROMPTS)]
    recorder = GradientRecorder()
    trainer = trainer_cls(model=student, teacher_model=teacher, args=gkd_config(tmp_path, **overrides),
                          train_dataset=Dataset.from_dict({"messages": rows}), processing_class=tokenizer,
                          callbacks=[recorder], peft_config=peft_config)
    if forbid_logits:
        forbid_lm_head(trainer.model, trainer)
        forbid_lm_head(trainer.teacher_model, trainer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, recorder.steps, trainer


def run_self_distillation(kind, trainer_cls, tmp_path, *, peft_config=None, forbid_logits=False, patch=None,
                          **overrides):
    """SDFT (``kind="sdft"``: a demonstration as privileged context) or SDPO, 2 steps on a tiny model saved to
    disk (TRL builds a separate EMA / base teacher from the path)."""
    from datasets import Dataset

    model, tokenizer = tiny_policy()
    # Sharper next-token distributions: the two contexts then differ by a divergence well above float32 rounding
    # (a random tiny model is nearly uniform, and a 1e-4 KL carries 1e-4 relative rounding in any float32 sum).
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(tmp_path / "policy")
    values = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=8, learning_rate=1e-2, optim="sgd", report_to="none", use_cpu=True,
                  logging_steps=1, save_strategy="no", seed=0, lr_scheduler_type="constant", bf16=False,
                  distillation_mode="full_logits")
    values.update(overrides)
    if kind == "sdft":
        from trl.experimental.sdft import SDFTConfig

        data = Dataset.from_dict({"prompt": PROMPTS, "privileged_context": [f"Answer: {i}." for i in range(8)]})
        extra = {}
        config = SDFTConfig(**values)
    else:
        from trl.experimental.sdpo import SDPOConfig

        data = Dataset.from_dict({"prompt": PROMPTS})
        extra = dict(reward_funcs=length_reward)
        config = SDPOConfig(**values)
    recorder = GradientRecorder()
    trainer = trainer_cls(model=str(tmp_path / "policy"), args=config, train_dataset=data, processing_class=tokenizer,
                          callbacks=[recorder], peft_config=peft_config, **extra)
    return train_and_record(trainer, recorder, patch, forbid_logits, "teacher_model")
