"""Every fused loss and its gradients against an independent float64 eager implementation of the formulas."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pydistill.losses import (BlendedLoss, DistillationLoss, GRPOLoss, NLLLoss, blended_loss, distillation_loss,
                              first_error_mask, group_advantages, grpo_loss, nll_loss, pack_rows,
                              sampled_token_distillation_loss, unpack_rows)

B, T, H, V = 4, 7, 16, 301


def batch(seed=0, b=B, t=T, width=H, vocab=V, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, width, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, width, generator=g, dtype=dtype) * 0.6).requires_grad_()
    teacher = torch.randn(b, t, width, generator=g, dtype=dtype)
    targets = torch.randint(0, vocab, (b, t), generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    return hidden, weight, teacher, targets, mask, g


# ----- eager float64 reference, written from the formulas --------------------------------------------------
def eager_logprobs(hidden, weight, temperature=1.0):
    return torch.log_softmax((hidden.double() @ weight.double().t()) / temperature, dim=-1)


def eager_divergence(log_q, log_p, divergence, beta, clip):
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        terms = p * (log_p - log_q)
    elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        terms = q * (log_q - log_p)
    else:
        m = beta * p + (1 - beta) * q
        terms = beta * p * (log_p - m.log()) + (1 - beta) * q * (log_q - m.log())
    if clip is not None:
        terms = terms.clamp(max=clip)
    return terms.sum(-1)


def eager_reduce(per_token, mask, reduction, num_items=None):
    per_token = per_token * mask
    if reduction == "sum":
        return per_token.sum()
    if reduction == "token_mean":
        return per_token.sum() / (num_items if num_items is not None else max(int(mask.sum()), 1))
    lengths = mask.sum(1)
    seq = per_token.sum(1) / lengths.clamp_min(1)
    return seq.sum() / max(int((lengths > 0).sum()), 1)


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def assert_same(a, b, tol=1e-5):
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() <= tol * (1 + y.abs().max().item()), (x - y).abs().max().item()


# ----- distillation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence,beta", [("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("forward_kl", 0.5),
                                             ("reverse_kl", 0.5)])
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum"])
def test_distillation_loss_matches_eager(divergence, beta, clip, reduction):
    hidden, weight, teacher, targets, _, g = batch(seed=1)
    first_error = torch.randint(-1, T, (B,), generator=g)
    mask = first_error_mask(first_error, lengths=torch.full((B,), T), max_length=T)
    token_weights = torch.rand(B, T, generator=g, dtype=torch.float64)
    out = distillation_loss(hidden, weight, teacher, mask, divergence=divergence, beta=beta, clip=clip,
                            temperature=1.2, token_weights=token_weights, reduction=reduction)
    log_q = eager_logprobs(hidden, weight, 1.2)
    log_p = eager_logprobs(teacher, weight, 1.2).detach()
    want = eager_reduce(eager_divergence(log_q, log_p, divergence, beta, clip) * token_weights, mask, reduction)
    assert abs(out.loss.item() - want.item()) <= 1e-5 * (1 + abs(want.item()))
    assert_same(grads(out.loss, hidden, weight), grads(want, hidden, weight))


@pytest.mark.parametrize("importance_clip", [None, 2.0])
def test_distillation_importance_weight(importance_clip):
    hidden, weight, teacher, targets, mask, g = batch(seed=2)
    log_q = eager_logprobs(hidden, weight)
    logp = log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old_logp = (logp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    out = distillation_loss(hidden, weight, teacher, mask, divergence="jsd", beta=0.5, targets=targets,
                            old_logp=old_logp, importance_clip=importance_clip)
    iw = torch.exp(logp.detach() - old_logp.double()).clamp(max=importance_clip) if importance_clip else 1.0
    per = eager_divergence(log_q, eager_logprobs(teacher, weight).detach(), "jsd", 0.5, None) * iw
    want = eager_reduce(per, mask, "token_mean")
    assert abs(out.loss.item() - want.item()) <= 1e-5 * (1 + abs(want.item()))
    assert_same(grads(out.loss, hidden, weight), grads(want, hidden, weight))
    if importance_clip:
        assert out.metrics["importance_weight"] <= importance_clip


def test_separate_teacher_head_and_num_items():
    hidden, weight, _, targets, mask, g = batch(seed=3)
    teacher_hidden = torch.randn(B, T, 11, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(V, 11, generator=g, dtype=torch.float64)
    out = distillation_loss(hidden, weight, teacher_hidden, mask, teacher_weight=teacher_weight,
                            divergence="reverse_kl", num_items_in_batch=50)
    want = eager_reduce(eager_divergence(eager_logprobs(hidden, weight), eager_logprobs(teacher_hidden, teacher_weight),
                                         "reverse_kl", 0.5, None), mask, "token_mean", 50)
    assert abs(out.loss.item() - want.item()) <= 1e-5 * (1 + abs(want.item()))
    assert_same(grads(out.loss, hidden, weight), grads(want, hidden, weight))


def test_sampled_token_variant():
    hidden, weight, teacher, targets, mask, _ = batch(seed=4)
    log_q = eager_logprobs(hidden, weight)
    logp = log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    teacher_logp = eager_logprobs(teacher, weight).gather(-1, targets.unsqueeze(-1)).squeeze(-1).detach()
    out = sampled_token_distillation_loss(hidden, weight, targets, teacher_logp.float(), mask)
    want = eager_reduce(-(teacher_logp - logp.detach()) * logp, mask, "token_mean")
    assert abs(out.loss.item() - want.item()) <= 1e-5 * (1 + abs(want.item()))
    assert_same(grads(out.loss, hidden, weight), grads(want, hidden, weight))


# ----- GRPO family ---------------------------------------------------------------------------------------
def eager_grpo(logp, advantages, mask, old_logp, ref_logp, beta, eps_low, eps_high, delta, level, loss_type,
               max_len, num_items, entropy=None, entropy_coef=0.0):
    log_ratio = (logp - old_logp) * mask
    if level == "sequence":
        log_ratio = (log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)).expand_as(logp)
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    if delta is not None:
        ratio = ratio.clamp(max=delta)
    a = advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(logp)
    per = -torch.minimum(ratio * a, clipped * a)
    if beta:
        per = per + beta * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)
    per = per * mask
    if loss_type == "grpo":
        loss = (per.sum(1) / mask.sum(1).clamp_min(1)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = per.sum() / (num_items if num_items is not None else mask.sum().clamp_min(1))
    else:
        loss = per.sum() / (mask.shape[0] * (max_len or mask.shape[1]))
    if entropy_coef:  # TRL: the token-mean entropy is subtracted after the loss type's reduction
        loss = loss - entropy_coef * (entropy * mask).sum() / mask.sum().clamp_min(1)
    return loss


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("group_size", [1, 4, 8])
@pytest.mark.parametrize("level,beta,delta", [("token", 0.0, None), ("token", 0.04, 1.5), ("sequence", 0.0, None)])
def test_grpo_loss_matches_eager(loss_type, group_size, level, beta, delta):
    b = 8
    hidden, weight, _, targets, mask, g = batch(seed=5, b=b)
    rewards = torch.randint(0, 2, (b,), generator=g).float()
    rewards[:group_size] = 1.0  # at least one zero-spread group
    adv = group_advantages(rewards, group_size).advantages.double()
    log_q = eager_logprobs(hidden, weight)
    logp = log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old_logp = logp.detach() + 0.3 * torch.randn(b, T, generator=g, dtype=torch.float64)
    ref_logp = logp.detach() + 0.2 * torch.randn(b, T, generator=g, dtype=torch.float64)
    entropy = -(log_q.exp() * log_q).sum(-1)
    kw = dict(old_logp=old_logp, ref_logp=ref_logp, beta=beta, epsilon_low=0.2, epsilon_high=0.28, delta=delta,
              importance_sampling_level=level, loss_type=loss_type, max_completion_length=10, num_items_in_batch=None,
              entropy_coef=0.01)
    out = grpo_loss(hidden, weight, targets, adv, mask, **kw)
    want = eager_grpo(logp, adv, mask, old_logp, ref_logp, beta, 0.2, 0.28, delta, level, loss_type, 10, None,
                      entropy, 0.01)
    assert abs(out.loss.item() - want.item()) <= 1e-5 * (1 + abs(want.item()))
    assert_same(grads(out.loss, hidden, weight), grads(want, hidden, weight))
    assert 0.0 <= out.metrics["clip_ratio"] <= 1.0 and out.metrics["tokens"] == int(mask.sum())


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_entropy_bonus_is_trls_token_mean_after_the_reduction(loss_type):
    """TRL 1.16: loss = L_policy - coef * mean entropy over the masked tokens, for every loss type; with zero
    advantages only the bonus is left."""
    hidden, weight, _, targets, mask, g = batch(seed=7)
    log_q = eager_logprobs(hidden, weight)
    entropy = -(log_q.exp() * log_q).sum(-1)
    out = grpo_loss(hidden, weight, targets, torch.zeros(B), mask, loss_type=loss_type, entropy_coef=0.1,
                    max_completion_length=2 * T)
    want = -0.1 * (entropy * mask).sum() / mask.sum()
    assert abs(out.loss.item() - want.item()) <= 1e-5 * (1 + abs(want.item()))
    assert_same(grads(out.loss, hidden, weight), grads(want, hidden, weight))


def test_grpo_on_policy_and_per_token_advantages():
    hidden, weight, _, targets, mask, g = batch(seed=6)
    adv_tokens = torch.randn(B, T, generator=g, dtype=torch.float64)
    out = GRPOLoss(loss_type="bnpo")(hidden, weight, targets, adv_tokens.reshape(-1), mask)
    logp = eager_logprobs(hidden, weight).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    want = -(adv_tokens * logp * mask).sum() / mask.sum()  # on-policy: gradient of logp * A
    assert_same(grads(out.loss, hidden, weight), grads(want, hidden, weight))
    assert out.metrics["clip_ratio"] == 0.0 and abs(out.metrics["ratio_mean"] - 1.0) < 1e-12


# ----- blend and NLL -------------------------------------------------------------------------------------
@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_blend_gradient_is_weighted_sum(w, monkeypatch):
    from pydistill.token_stats import loop as chunked

    from pydistill.token_stats import fast

    calls = []
    real, real_fast = chunked.stats_forward, fast.fast_forward
    monkeypatch.setattr(chunked, "stats_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(fast, "fast_forward", lambda *a, **k: calls.append(1) or real_fast(*a, **k))
    hidden, weight, teacher, targets, mask, g = batch(seed=7)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    common = dict(divergence="jsd", beta=0.5, loss_type="grpo")
    out = blended_loss(hidden, weight, teacher, targets, adv, mask, distillation_weight=w, **common)
    assert len(calls) == 1  # one pass of the op for both parts
    distill = distillation_loss(hidden, weight, teacher, mask, divergence="jsd", beta=0.5).loss
    policy = grpo_loss(hidden, weight, targets, adv, mask, loss_type="grpo").loss
    assert abs(out.loss.item() - (w * distill + (1 - w) * policy).item()) < 1e-6
    g_blend = grads(out.loss, hidden, weight)
    g_d, g_p = grads(distill, hidden, weight), grads(policy, hidden, weight)
    assert_same(g_blend, [w * a + (1 - w) * b for a, b in zip(g_d, g_p)])
    module = BlendedLoss(distillation_weight=w, **common)(hidden, weight, teacher, targets, adv, mask)
    assert abs(module.loss.item() - out.loss.item()) < 1e-12


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum"])
def test_nll_matches_eager(reduction):
    hidden, weight, _, targets, mask, _ = batch(seed=8)
    out = NLLLoss(reduction=reduction)(hidden, weight, targets, mask)
    logp = eager_logprobs(hidden, weight).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    want = eager_reduce(-logp, mask, reduction)
    assert abs(out.loss.item() - want.item()) <= 1e-5 * (1 + abs(want.item()))
    assert_same(grads(out.loss, hidden, weight), grads(want, hidden, weight))


# ----- all masked, masked rows skipped, modules ------------------------------------------------------------
@pytest.mark.parametrize("make_loss", [
    lambda h, w, t, y, m: distillation_loss(h, w, t, m, clip=0.05).loss,
    lambda h, w, t, y, m: grpo_loss(h, w, y, torch.ones(h.shape[0]), m, loss_type="grpo").loss,
    lambda h, w, t, y, m: grpo_loss(h, w, y, torch.ones(h.shape[0]), m, loss_type="dr_grpo", beta=0.1,
                                    ref_logp=torch.zeros(h.shape[:2])).loss,
    lambda h, w, t, y, m: blended_loss(h, w, t, y, torch.ones(h.shape[0]), m).loss,
    lambda h, w, t, y, m: nll_loss(h, w, y, m, reduction="sequence_mean").loss,
    lambda h, w, t, y, m: sampled_token_distillation_loss(h, w, y, torch.zeros(h.shape[:2]), m).loss,
])
def test_all_masked_batch_is_zero_with_zero_grads(make_loss):
    hidden, weight, teacher, targets, _, _ = batch(seed=9, dtype=torch.float32)
    loss = make_loss(hidden, weight, teacher, targets, torch.zeros(B, T, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_masked_rows_never_reach_the_op(monkeypatch):
    from pydistill.token_stats import loop as chunked

    rows = []
    real_f, real_b = chunked.stats_forward, chunked.stats_backward
    monkeypatch.setattr(chunked, "stats_forward", lambda f, p, h, *a, **k: rows.append(h.shape[0]) or real_f(f, p, h, *a, **k))
    monkeypatch.setattr(chunked, "stats_backward", lambda f, p, h, *a, **k: rows.append(h.shape[0]) or real_b(f, p, h, *a, **k))
    from pydistill.token_stats import fast

    real_fast = fast.fast_forward
    monkeypatch.setattr(fast, "fast_forward", lambda f, p, h, *a, **k: rows.append(-h.shape[0]) or real_fast(f, p, h, *a, **k))
    hidden, weight, teacher, _, _, _ = batch(seed=10, b=6, t=10, dtype=torch.float32)
    mask = first_error_mask(torch.full((6,), 5), lengths=torch.full((6,), 10), max_length=10)  # 50% masked
    distillation_loss(hidden, weight, teacher, mask).loss.backward()
    assert rows == [-30]  # the fast mode: the forward forms the gradient, no lean sweep
    rows.clear()
    distillation_loss(hidden, weight, teacher, mask, memory_budget_mb=0.01).loss.backward()
    assert rows == [30, 30]  # the lean mode: forward and backward sweeps


# ----- helpers ---------------------------------------------------------------------------------------------
def test_first_error_mask():
    completion = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    mask = first_error_mask(torch.tensor([2, -1, 4]), completion)
    assert mask.int().tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]
    same = first_error_mask(torch.tensor([2, -1, 4]), lengths=torch.tensor([4, 5, 2]), max_length=5)
    assert torch.equal(mask, same)
    with pytest.raises(ValueError, match="completion_mask must be"):
        first_error_mask(torch.tensor([1, 2]), completion)
    with pytest.raises(ValueError, match="give completion_mask"):
        first_error_mask(torch.tensor([1, 2]))


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 6), group_size=st.sampled_from([1, 2, 4, 8]),
       scaling=st.sampled_from(["group", "batch", "none"]), seed=st.integers(0, 10_000),
       nan_share=st.sampled_from([0.0, 0.3]))
def test_group_advantages_properties(groups, group_size, scaling, seed, nan_share):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (groups * group_size,), generator=g).float()
    rewards[torch.rand(rewards.shape, generator=g) < nan_share] = math.nan
    out = group_advantages(rewards, group_size, scaling=scaling)
    adv = out.advantages.reshape(groups, group_size)
    r = rewards.reshape(groups, group_size)
    assert torch.isfinite(adv).all()
    assert torch.all(adv[torch.isnan(r)] == 0)
    zero = 0
    for i in range(groups):
        valid = r[i][~torch.isnan(r[i])]
        if valid.numel() < 2 or torch.all(valid == valid[0]):
            zero += 1
            assert torch.all(adv[i] == 0)
            continue
        centered = (valid - valid.mean()).double()
        scale = {"group": valid.double().std() + 1e-4,
                 "batch": rewards[~torch.isnan(rewards)].double().std() + 1e-4, "none": 1.0}[scaling]
        assert torch.allclose(adv[i][~torch.isnan(r[i])].double(), centered / scale, atol=1e-5)
    assert out.zero_spread_fraction == pytest.approx(zero / groups)


def test_pack_and_unpack_rows():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    packed = pack_rows(hidden, mask)
    assert packed.rows.tolist() == [[0, 1], [4, 5], [8, 9]]
    back = unpack_rows(packed.rows[:, 0], packed, fill=-1)
    assert back.tolist() == [[0, -1, 4], [-1, 8, -1]]


# ----- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,match", [
    (lambda h, w, t, y, m: grpo_loss(h, w, y, torch.ones(B + 1), m), r"advantages must have shape \[B\]=\[4\]"),
    (lambda h, w, t, y, m: grpo_loss(h, w, y, torch.ones(B), m[:, :3]), r"mask must have shape \[B, T\]=\[4, 7\]"),
    (lambda h, w, t, y, m: grpo_loss(h, w, y, torch.ones(B), m, epsilon_low=-0.1), "epsilon_low must be"),
    (lambda h, w, t, y, m: grpo_loss(h, w, y, torch.ones(B), m, epsilon_high=-1.0), "epsilon_high must be"),
    (lambda h, w, t, y, m: grpo_loss(h, w, y, torch.ones(B), m, loss_type="ppo"), "loss_type must be one of"),
    (lambda h, w, t, y, m: grpo_loss(h, w, y, torch.ones(B), m, beta=0.1), "ref_logp"),
    (lambda h, w, t, y, m: grpo_loss(h, w, y, torch.ones(B), m, delta=0.5), "delta must be > 1"),
    (lambda h, w, t, y, m: distillation_loss(h, w, t, m, clip=0.0), r"clip \(tau\) must be"),
    (lambda h, w, t, y, m: distillation_loss(h, w, t, m, clip=-1.0), r"clip \(tau\) must be"),
    (lambda h, w, t, y, m: distillation_loss(h, w, t, m, importance_clip=2.0), "targets"),
    (lambda h, w, t, y, m: distillation_loss(h, w, t[:, :3], m), r"teacher_hidden must be \[B, T, H_t\]"),
    (lambda h, w, t, y, m: distillation_loss(h[0], w, t, m[0]), r"hidden must be \[B, T, H\]"),
    (lambda h, w, t, y, m: distillation_loss(h, w, t, m, reduction="mean"), "reduction must be one of"),
    (lambda h, w, t, y, m: distillation_loss(h, w, t, m, num_items_in_batch=0), "num_items_in_batch"),
    (lambda h, w, t, y, m: blended_loss(h, w, t, y, torch.ones(B), m, distillation_weight=1.5), "distillation_weight"),
    (lambda h, w, t, y, m: nll_loss(h, w, y[:, :2], m), r"targets must have shape \[B, T\]"),
    (lambda h, w, t, y, m: group_advantages(torch.ones(10), 4), "group_size 4 must divide"),
    (lambda h, w, t, y, m: group_advantages(torch.ones(8), 0), "group_size must be a positive int"),
    (lambda h, w, t, y, m: group_advantages(torch.ones(8), 4, eps=-1.0), "eps must be >= 0"),
])
def test_bad_input_names_the_argument(call, match):
    hidden, weight, teacher, targets, mask, _ = batch(seed=11, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        call(hidden, weight, teacher, targets, mask)


def test_modules_forward_their_options():
    hidden, weight, teacher, targets, mask, _ = batch(seed=12)
    a = DistillationLoss(divergence="reverse_kl", clip=0.1)(hidden, weight, teacher, mask).loss
    b = distillation_loss(hidden, weight, teacher, mask, divergence="reverse_kl", clip=0.1).loss
    assert a.item() == b.item()


@pytest.mark.parametrize("name,make_loss", [
    ("distill", lambda h, w, t, y, m, **k: distillation_loss(h, w, t, m, divergence="jsd", clip=0.05, **k).loss),
    ("distill_entropy", lambda h, w, t, y, m, **k: distillation_loss(h, w, t, m, entropy_coef=0.1, targets=y,
                                                                      importance_clip=2.0, **k).loss),
    ("grpo", lambda h, w, t, y, m, **k: grpo_loss(h, w, y, torch.randn(h.shape[0], generator=torch.Generator()
                                                                       .manual_seed(3)), m, **k).loss),
    ("grpo_entropy", lambda h, w, t, y, m, **k: grpo_loss(h, w, y, torch.ones(h.shape[0]), m, entropy_coef=0.1,
                                                          beta=0.1, ref_logp=torch.zeros(h.shape[:2]), **k).loss),
    ("blend", lambda h, w, t, y, m, **k: blended_loss(h, w, t, y, torch.linspace(-1, 1, h.shape[0]), m, **k).loss),
    ("nll", lambda h, w, t, y, m, **k: nll_loss(h, w, y, m, **k).loss),
    ("sampled", lambda h, w, t, y, m, **k: sampled_token_distillation_loss(h, w, y, torch.zeros(h.shape[:2]), m,
                                                                           **k).loss),
])
def test_every_loss_declares_what_it_differentiates(name, make_loss, monkeypatch):
    """memory_budget_mb reaches the op: fast (the default here) and lean give the same loss and gradients, and
    the fast backward never falls back to a lean sweep (each loss names the outputs it differentiates)."""
    from pydistill.token_stats import loop as chunked

    sweeps = []
    real_b = chunked.stats_backward
    monkeypatch.setattr(chunked, "stats_backward", lambda *a, **k: sweeps.append(1) or real_b(*a, **k))
    hidden, weight, teacher, targets, mask, _ = batch(seed=12, dtype=torch.float32)
    fast_loss = make_loss(hidden, weight, teacher, targets, mask)
    fast_grads = grads(fast_loss, hidden, weight)
    assert sweeps == []
    lean_loss = make_loss(hidden, weight, teacher, targets, mask, memory_budget_mb=0.01)
    lean_grads = grads(lean_loss, hidden, weight)
    assert sweeps == [1]
    assert abs(fast_loss.item() - lean_loss.item()) <= 1e-6 * (1 + abs(lean_loss.item()))
    assert_same(fast_grads, lean_grads)
