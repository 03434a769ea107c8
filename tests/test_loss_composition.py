"""One composition per loss (issue 27, item 3): the blend is the GRPO term and the distillation term over one
op call, so its ends are those losses exactly; ``entropy_coef`` has TRL's meaning and sign in every loss."""
import pytest
import torch

from pydistill.losses import blended_loss, distillation_loss, grpo_loss
from tests.test_losses import B, T, batch, eager_logprobs, grads

POLICY = dict(epsilon_low=0.2, epsilon_high=0.28, delta=1.8, loss_type="grpo", max_completion_length=9)
DISTILL = dict(divergence="jsd", beta=0.3, clip=0.4)


def policy_inputs(g):
    return dict(old_logp=-3.0 + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64),
                ref_logp=-3.0 + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64))


LEAN, FAST = 0.01, 4096  # memory_budget_mb: no gradient basis at all / every row's basis


def same_gradients(a, b, hidden, weight, exact=True):
    for x, y in zip(grads(a, hidden, weight), grads(b, hidden, weight)):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("budget", [LEAN, FAST])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_blend_at_weight_0_is_grpo_loss_exactly(loss_type, budget):
    hidden, weight, teacher, targets, mask, g = batch(seed=21)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    extra = dict(POLICY, loss_type=loss_type, num_items_in_batch=40.0, memory_budget_mb=budget, **policy_inputs(g))
    blend = blended_loss(hidden, weight, teacher, targets, adv, mask, distillation_weight=0.0, kl_beta=0.1,
                         **DISTILL, **extra)
    alone = grpo_loss(hidden, weight, targets, adv, mask, beta=0.1, **extra)
    assert torch.equal(blend.loss, alone.loss)
    for key, value in alone.metrics.items():
        assert blend.metrics[key] == value, key
    # The fast mode's GEMMs over two contexts (student rows stacked over the teacher's) round the student's basis
    # apart from a one-context call by an ulp; everything the blend adds is exact.
    same_gradients(blend.loss, alone.loss, hidden, weight, exact=budget == LEAN)


@pytest.mark.parametrize("budget", [LEAN, FAST])
def test_blend_at_weight_1_is_distillation_loss_exactly(budget):
    hidden, weight, teacher, targets, mask, g = batch(seed=22)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    blend = blended_loss(hidden, weight, teacher, targets, adv, mask, distillation_weight=1.0,
                         num_items_in_batch=33.0, memory_budget_mb=budget, **DISTILL, **POLICY, **policy_inputs(g))
    alone = distillation_loss(hidden, weight, teacher, mask, targets=targets, num_items_in_batch=33.0,
                              memory_budget_mb=budget, **DISTILL)
    assert torch.equal(blend.loss, alone.loss)
    assert blend.metrics["divergence"] == alone.metrics["divergence"]
    same_gradients(blend.loss, alone.loss, hidden, weight)


def mean_entropy(hidden, weight, mask, count=None):
    log_q = eager_logprobs(hidden, weight)
    entropy = -(log_q.exp() * log_q).sum(-1)
    return (entropy * mask).sum() / (mask.sum() if count is None else count)


ENTROPY_LOSSES = {
    "grpo": lambda h, w, t, y, m, c, **k: grpo_loss(h, w, y, torch.zeros(B), m, entropy_coef=c, **k).loss,
    "grpo_dr": lambda h, w, t, y, m, c, **k: grpo_loss(h, w, y, torch.zeros(B), m, entropy_coef=c,
                                                       loss_type="dr_grpo", **k).loss,
    "distill_token_mean": lambda h, w, t, y, m, c, **k: distillation_loss(h, w, t, m, entropy_coef=c, **k).loss,
    "distill_sequence_mean": lambda h, w, t, y, m, c, **k: distillation_loss(h, w, t, m, entropy_coef=c,
                                                                             reduction="sequence_mean", **k).loss,
    "distill_sum": lambda h, w, t, y, m, c, **k: distillation_loss(h, w, t, m, entropy_coef=c, reduction="sum",
                                                                   **k).loss,
}


@pytest.mark.parametrize("name", sorted(ENTROPY_LOSSES))
def test_entropy_coef_is_minus_coef_times_the_token_mean_entropy(name):
    """TRL 1.16's GRPOConfig.entropy_coef: loss = L - coef * H, H the masked token-mean entropy (whatever the
    reduction), so a positive coefficient lowers the loss of a more uniform policy: descent raises entropy."""
    hidden, weight, teacher, targets, mask, _ = batch(seed=23)
    make = ENTROPY_LOSSES[name]
    coef = 0.25
    bonus = make(hidden, weight, teacher, targets, mask, coef) - make(hidden, weight, teacher, targets, mask, 0.0)
    want = -coef * mean_entropy(hidden, weight, mask)
    assert abs(bonus.item() - want.item()) <= 1e-9
    (g_hidden,) = grads(bonus, hidden)
    with torch.no_grad():  # one small descent step on the bonus alone
        stepped = hidden - 0.05 * g_hidden
    assert mean_entropy(stepped, weight, mask) > mean_entropy(hidden, weight, mask)


def test_entropy_bonus_over_the_global_token_count_with_token_mean():
    hidden, weight, teacher, targets, mask, _ = batch(seed=24)
    for loss in (lambda c: distillation_loss(hidden, weight, teacher, mask, entropy_coef=c, num_items_in_batch=50.0),
                 lambda c: grpo_loss(hidden, weight, targets, torch.zeros(B), mask, entropy_coef=c,
                                     num_items_in_batch=50.0)):
        bonus = loss(0.5).loss - loss(0.0).loss
        assert abs(bonus.item() + 0.5 * mean_entropy(hidden, weight, mask, count=50.0).item()) <= 1e-9
