"""The GRPO baseline trainer on a tiny model: one step against an eager float64 computation of TRL's objective,
gradient accumulation, zero-spread groups, the reference model, reward functions, config checks and the CLI."""
import copy

import pytest
import torch

from pydistill.cli import build_parser, load_config
from pydistill.models import tiny_model
from pydistill.prompts import render, student_messages
from pydistill.trainers import GRPOLoopConfig, GRPOLoopTrainer
from pydistill.boundary import read_head
from pydistill.trainers.rollout import SamplingSettings
from tests.trainer_helpers import TASK, GroupEngine, count_op_rows, step_gradients


pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
              pytest.mark.usefixtures("one_thread")]


def grpo_config(tmp_path, **overrides):
    values = dict(model="tiny", lora_r=0, max_steps=1, batch_size=4, micro_batch_size=2, num_generations=4,
                  max_new_tokens=32, eval_problems=0, output_dir=str(tmp_path / "run"), learning_rate=1e-3,
                  progress=False, train_problems=8, max_grad_norm=1e9)
    values.update(overrides)
    return GRPOLoopConfig(**values)


def make_trainer(tmp_path, seed=0, patterns=GroupEngine.PATTERNS, callables=None, callable_weights=None,
                 **overrides):
    cfg = grpo_config(tmp_path, **overrides)
    model, tok = tiny_model(seed=seed)
    engine = GroupEngine(tok, TASK.problems(cfg.train_split, n=cfg.train_problems, seed=cfg.seed), patterns)
    return GRPOLoopTrainer(cfg, model=model, tokenizer=tok, task=TASK, rollout_engine=engine,
                       reward_functions=callables, reward_weights=callable_weights)


def eager_advantages(rewards, group_size, scaling):
    """A = (r - mean_group) / (std + 1e-4), written out group by group; 0 for zero-spread groups."""
    r = torch.tensor(rewards, dtype=torch.float64).reshape(-1, group_size)
    batch_std = r.reshape(-1).std()
    out = []
    for group in r:
        if bool((group == group[0]).all()):
            out.append(torch.zeros_like(group))
            continue
        centered = group - group.mean()
        if scaling == "group":
            centered = centered / (group.std() + 1e-4)
        elif scaling == "batch":
            centered = centered / (batch_std + 1e-4)
        out.append(centered)
    return torch.cat(out)


def eager_logp(model, prompt_ids, completion_ids):
    """log pi(y_t) of one unpadded sequence, float64 logits from hidden @ W.T."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    hidden = model.model(input_ids=ids).last_hidden_state[0]
    start = len(prompt_ids) - 1
    logits = hidden[start:start + len(completion_ids)].double() @ read_head(model).weight.double().t()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion_ids).unsqueeze(1)).squeeze(1)


def eager_grpo_loss(model, reference, tok, engine, problems, cfg):
    """TRL's GRPO objective over the whole global batch, one sequence at a time."""
    g = cfg.num_generations
    prompts = [render(tok, student_messages(p.question)) for p in problems]
    rollouts = engine.sample(prompts, SamplingSettings(cfg.max_new_tokens, n=g))
    repeated = [p for p in problems for _ in range(g)]
    rewards = [float(TASK.is_correct(p, t)) for p, t in zip(repeated, rollouts.texts)]
    advantages = eager_advantages(rewards, g, cfg.scale_rewards)
    eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    sums, counts = [], []
    for i, (prompt, completion) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids)):
        logp = eager_logp(model, prompt, completion)
        ratio = torch.exp(logp - logp.detach())
        a = advantages[i]
        per_token = -torch.minimum(ratio * a, ratio.clamp(1 - cfg.epsilon, 1 + eps_high) * a)
        if cfg.beta:
            with torch.no_grad():
                ref = eager_logp(reference, prompt, completion)
            per_token = per_token + cfg.beta * (torch.exp(ref - logp) - (ref - logp) - 1)
        sums.append(per_token.sum())
        counts.append(len(completion))
    sums = torch.stack(sums)
    if cfg.loss_type == "grpo":
        return (sums / torch.tensor(counts, dtype=torch.float64)).mean()
    if cfg.loss_type in ("dapo", "bnpo"):
        return sums.sum() / sum(counts)
    return sums.sum() / (len(counts) * cfg.max_new_tokens)  # dr_grpo


def assert_gradients_close(got: dict, want: dict):
    assert set(got) == set(want)
    for name in want:
        scale = float(want[name].abs().max()) + 1e-8
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-4, atol=2e-5 * scale, msg=name)


@pytest.mark.parametrize("loss_type,scale_rewards,beta", [
    ("grpo", "group", 0.0), ("dapo", "group", 0.0), ("dr_grpo", "none", 0.0), ("bnpo", "batch", 0.0),
    ("grpo", "group", 0.2), ("dapo", "batch", 0.2),
])
def test_step_matches_eager_trl_objective(tmp_path, loss_type, scale_rewards, beta):
    trainer = make_trainer(tmp_path, loss_type=loss_type, scale_rewards=scale_rewards, beta=beta)
    reference = copy.deepcopy(trainer.model)
    if beta:  # move the policy away from the reference so that the KL term and its gradient are not 0
        with torch.no_grad():
            torch.manual_seed(1)
            for p in trainer.model.parameters():
                p.add_(0.3 * torch.randn_like(p) * p.std())
    policy = copy.deepcopy(trainer.model)
    metrics, grads = step_gradients(trainer)

    problems = trainer.train_pool[:trainer.config.batch_size]
    want_loss = eager_grpo_loss(policy, reference, trainer.tokenizer, trainer.engine, problems, trainer.config)
    want_loss.backward()
    want = {n: p.grad.double() for n, p in policy.named_parameters()}
    assert metrics["loss"] == pytest.approx(float(want_loss.detach()), abs=1e-5)
    assert_gradients_close(grads, want)
    assert any(float(g.abs().max()) > 0 for g in grads.values())
    if beta:
        assert metrics["kl"] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_gradient_accumulation_is_equivalent(tmp_path, loss_type):
    grads = []
    for micro in (1, 2, 4):
        trainer = make_trainer(tmp_path / str(micro), loss_type=loss_type, micro_batch_size=micro)
        metrics, g = step_gradients(trainer)
        grads.append((metrics["loss"], g))
    (loss0, g0), *others = grads
    for loss, g in others:
        assert loss == pytest.approx(loss0, abs=1e-6)
        for name in g0:
            torch.testing.assert_close(g[name], g0[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("skip", [True, False])
def test_zero_spread_groups_have_zero_advantage_and_skip_the_op(tmp_path, monkeypatch, skip):
    # groups: mixed, all wrong, all right, mixed (GroupEngine.PATTERNS)
    trainer = make_trainer(tmp_path, micro_batch_size=4, skip_zero_advantage=skip)
    problems = trainer.train_pool[:4]
    prepared = [trainer.prepare(problems)]
    trainer.finalize_batch(prepared)
    adv = prepared[0]["advantages"].reshape(4, 4)
    assert torch.equal(adv[1], torch.zeros(4)) and torch.equal(adv[2], torch.zeros(4))
    assert bool((adv[0] != 0).all()) and bool((adv[3] != 0).all())
    assert prepared[0]["metrics"]["zero_spread_fraction"] == 0.5
    lengths = [len(c) for c in prepared[0]["groups"].rollouts.completion_ids]
    rows = count_op_rows(monkeypatch)
    out = trainer.loss(prepared[0], float(sum(lengths)))
    out.loss.backward()
    trained = sum(lengths[:4]) + sum(lengths[12:]) if skip else sum(lengths)
    assert rows == [trained]
    assert out.metrics["tokens"] == trained
    # the skipped rows still count in the normalization (dapo: global token count), so the loss is unchanged
    if skip:
        monkeypatch.undo()
        trainer.optimizer.zero_grad()
        trainer.config.skip_zero_advantage = False
        full = trainer.loss(prepared[0], float(sum(lengths)))
        assert float(full.loss) == pytest.approx(float(out.loss), abs=1e-6)


def test_all_groups_zero_spread_gives_zero_loss_and_gradients(tmp_path):
    trainer = make_trainer(tmp_path, patterns=("WWWW", "RRRR"))
    metrics, grads = step_gradients(trainer)
    assert metrics["loss"] == 0.0 and metrics["zero_spread_fraction"] == 1.0
    assert all(float(g.abs().max()) == 0 for g in grads.values())


@pytest.mark.parametrize("lora", [False, True])
def test_kl_reference_is_the_initial_weights(tmp_path, lora):
    extra = dict(lora_r=4, lora_alpha=8, learning_rate=5e-2) if lora else dict(learning_rate=1e-2)
    trainer = make_trainer(tmp_path, beta=0.1, max_steps=3, **extra)
    initial = copy.deepcopy(trainer.model.get_base_model() if lora else trainer.model)
    first = trainer.training_step()
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)
    later = [trainer.training_step() for _ in range(2)]
    assert later[-1]["kl"] > 1e-6
    # the reference log-probs are those of the initial model, not of the trained one
    batch = trainer.prepare(trainer.train_pool[:2])["groups"]
    student = batch.student
    ref = trainer.reference_logp(student, student.completion_mask)
    for row, (p, c) in enumerate(zip(batch.rollouts.prompt_ids, batch.rollouts.completion_ids)):
        with torch.no_grad():
            want = eager_logp(initial, p, c).float()
        torch.testing.assert_close(ref[row, :len(c)], want, atol=1e-4, rtol=1e-4)


def test_no_reference_copy_without_kl(tmp_path):
    assert make_trainer(tmp_path, beta=0.0).teacher is None
    assert make_trainer(tmp_path / "b", beta=0.04).teacher is not None


def test_plain_callable_reward_functions_with_weights(tmp_path):
    def length_bonus(problems, completions):
        return [len(c) / 100 for c in completions]

    def accuracy(problems, completions):
        return [float(TASK.is_correct(p, c)) for p, c in zip(problems, completions)]

    trainer = make_trainer(tmp_path, callables=[accuracy, length_bonus], callable_weights=[1.0, 0.5])
    prepared = trainer.prepare(trainer.train_pool[:2])
    batch = prepared["groups"]
    texts = batch.rollouts.texts
    want = [float(TASK.is_correct(p, t)) + 0.5 * len(t) / 100 for p, t in zip(batch.problems, texts)]
    torch.testing.assert_close(batch.rewards, torch.tensor(want, dtype=torch.float32))
    assert set(batch.reward_columns) == {"accuracy", "length_bonus"}
    metrics = trainer.training_step()
    assert "rewards/length_bonus" in metrics and "rewards/accuracy" in metrics


def test_named_reward_functions_and_weights(tmp_path):
    trainer = make_trainer(tmp_path, reward_functions="accuracy,format", reward_weights="1,0.25")
    batch = trainer.prepare(trainer.train_pool[:1])["groups"]
    assert set(batch.reward_columns) == {"accuracy", "format"}
    want = [a + 0.25 * f for a, f in zip(batch.reward_columns["accuracy"], batch.reward_columns["format"])]
    assert batch.rewards.tolist() == pytest.approx(want)


@pytest.mark.parametrize("overrides,match", [
    (dict(loss_type="ppo"), "loss_type must be one of"),
    (dict(scale_rewards="std"), "scale_rewards must be one of"),
    (dict(epsilon=1.0), r"epsilon must be in \[0, 1\)"),
    (dict(epsilon=-0.1), r"epsilon must be in \[0, 1\)"),
    (dict(epsilon_high=-0.1), "epsilon_high must be >= 0"),
    (dict(delta=1.0), "delta must be > 1"),
    (dict(beta=-0.01), r"beta \(KL coefficient\) must be >= 0"),
    (dict(importance_sampling_level="group"), "importance_sampling_level must be"),
    (dict(num_generations=0), r"group size \(num_generations\)"),
    (dict(reward_functions="accuracy,length"), "reward_functions must name"),
    (dict(reward_weights="1,x"), "reward_weights must be comma-separated numbers"),
    (dict(reward_functions="accuracy,format", reward_weights="1"), "reward_weights must have one entry per"),
    (dict(init_from="/no/such/run"), "init_from '/no/such/run' does not exist"),
    (dict(memory_budget_mb=0), "memory_budget_mb must be a finite number > 0"),
    (dict(memory_budget_mb=float("nan")), "memory_budget_mb must be a finite number"),
])
def test_bad_config_fails_fast(overrides, match):
    with pytest.raises(ValueError, match=match):
        GRPOLoopConfig(**overrides).validate()


def test_init_from_loads_checkpoint_weights(tmp_path):
    first = make_trainer(tmp_path / "first", learning_rate=5e-2)
    first.training_step()
    first.step = 1
    first.save()
    trained = {n: p.detach().clone() for n, p in first.model.named_parameters()}
    fresh = {n: p.detach().clone() for n, p in tiny_model(seed=0)[0].named_parameters()}
    assert any(not torch.equal(trained[n], fresh[n]) for n in trained)
    for source in (str(tmp_path / "first" / "run"), str(tmp_path / "first" / "run" / "checkpoint-1")):
        second = make_trainer(tmp_path / "second", init_from=source, beta=0.1)
        for n, p in second.model.named_parameters():
            assert torch.equal(p, trained[n]), n
        # the KL reference is the loaded weights (the start of this run), not the random init
        assert second.training_step()["kl"] == pytest.approx(0.0, abs=1e-7)


def test_init_from_under_lora_uses_the_loaded_adapter_as_reference(tmp_path):
    # Under LoRA the fixed reference is normally the base model (adapter disabled); a run that starts from a
    # checkpoint (FD -> GRPO) must use the loaded adapter instead, so the KL starts at 0.
    first = make_trainer(tmp_path / "first", learning_rate=5e-2, lora_r=4, lora_alpha=8)
    first.training_step()
    first.step = 1
    first.save()
    second = make_trainer(tmp_path / "second", init_from=str(tmp_path / "first" / "run"), beta=0.1, lora_r=4,
                          lora_alpha=8)
    assert not second.teacher.uses_adapter_switch and second.teacher.copy is not None
    assert second.training_step()["kl"] == pytest.approx(0.0, abs=1e-7)


def test_cli_parses_grpo_flags():
    args = build_parser().parse_args([
        "train", "grpo", "--loss-type", "dr_grpo", "--num-generations", "4", "--epsilon", "0.1",
        "--epsilon-high", "0.28", "--beta", "0.04", "--scale-rewards", "none", "--max-completion-length", "256",
        "--reward-functions", "accuracy,format", "--reward-weights", "1,0.1", "--delta", "none",
        "--temperature", "0.9"])
    assert args.method == "grpo"
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "method", "config")}
    cfg = load_config(GRPOLoopConfig, None, overrides)
    assert (cfg.loss_type, cfg.num_generations, cfg.epsilon, cfg.epsilon_high, cfg.beta) == \
        ("dr_grpo", 4, 0.1, 0.28, 0.04)
    assert cfg.scale_rewards == "none" and cfg.delta is None and cfg.temperature == 0.9
    assert cfg.max_completion_length == 256 and cfg.max_new_tokens == 256  # TRL's name wins
    assert cfg.reward_functions == "accuracy,format" and cfg.reward_weights == "1,0.1"


def test_trl_defaults():
    """Every default GRPOLoopConfig shares with trl.GRPOConfig equals TRL's (the docstring names what differs)."""
    import dataclasses

    import trl

    ours, theirs = GRPOLoopConfig(), {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}
    same_concept = dict(learning_rate="learning_rate", lr_scheduler="lr_scheduler_type", max_grad_norm="max_grad_norm",
                        max_new_tokens="max_completion_length", seed="seed", num_generations="num_generations",
                        temperature="temperature", top_p="top_p", top_k="top_k", loss_type="loss_type", beta="beta",
                        epsilon="epsilon", epsilon_high="epsilon_high", delta="delta", scale_rewards="scale_rewards",
                        importance_sampling_level="importance_sampling_level", warmup_steps="warmup_steps",
                        weight_decay="weight_decay")
    for field, trl_name in same_concept.items():
        assert getattr(ours, field) == theirs[trl_name], (field, getattr(ours, field), theirs[trl_name])
    assert ours.lora_r == 0  # TRL trains without PEFT unless given a peft_config


def test_logged_metrics(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.04, max_steps=1)
    summary = trainer.train()
    for key in ("loss", "reward", "reward_std", "accuracy", "zero_spread_fraction", "entropy", "kl", "clip_ratio",
                "clip_ratio_low", "clip_ratio_high", "completion_tokens", "completion_tokens_min",
                "completion_tokens_max", "rewards/accuracy", "grad_norm"):
        assert key in summary, key
    assert summary["zero_spread_fraction"] == 0.5 and summary["accuracy"] == 0.5
