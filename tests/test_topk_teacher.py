"""A teacher given as top-k log-probs: the fused op against the float64 eager top-k + tail reference, values and
gradients, every divergence, with and without the tail, padding rows, odd shapes, dtypes and impls."""
import math

import pytest
import torch

from pydistill import token_stats
from pydistill.token_stats.config import StatsConfig
from pydistill.token_stats.eager import eager_topk_divergence

N, H, V = 9, 13, 301


def _teacher_topk(n, v, k, generator, *, pad_rows=(), pad_tail=()):
    """Top-k ids (shuffled within each row) and log-probs of a random teacher; padded with -1 / -inf."""
    logits = torch.randn(n, v, generator=generator, dtype=torch.float64) * 3
    logprobs, ids = torch.log_softmax(logits, -1).topk(k, dim=-1)
    order = torch.argsort(torch.rand(n, k, generator=generator), dim=1)
    ids, logprobs = ids.gather(1, order), logprobs.gather(1, order).float()
    for row in pad_rows:  # a row with no teacher entry at all
        ids[row], logprobs[row] = -1, -math.inf
    for row in pad_tail:  # a row with fewer than k entries
        ids[row, k // 2:], logprobs[row, k // 2:] = -1, -math.inf
    return ids, logprobs


def _inputs(dtype, k, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    ids, logprobs = _teacher_topk(N, V, k, g, pad_rows=(2,), pad_tail=(5,) if k > 1 else ())
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, b, ids, logprobs, targets


CASES = [
    dict(divergence="forward_kl"),
    dict(divergence="reverse_kl"),
    dict(divergence="jsd", beta=0.3),
    dict(divergence="forward_kl", clip=0.02),
    dict(divergence="reverse_kl", clip=0.02),
    dict(divergence="jsd", beta=0.7, temperature=0.7, softcap=4.0),
]


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("k", [1, 6])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_topk_matches_float64_reference(case, k, tail):
    hidden, weight, bias, ids, logprobs, targets = _inputs(torch.float32, k, bias=True)
    mask = torch.ones(N, dtype=torch.bool)
    mask[7] = False
    stats = token_stats(hidden, weight, bias=bias, targets=targets, mask=mask, teacher_topk_ids=ids,
                        teacher_topk_logprobs=logprobs, topk_tail=tail, impl="torch", **case)
    coef = torch.linspace(0.5, 1.5, N)
    grads = torch.autograd.grad((coef * stats.divergence).sum() + stats.logp.sum(), (hidden, weight))

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    cfg = StatsConfig(temperature=case.get("temperature", 1.0), softcap=case.get("softcap"),
                      divergence=case["divergence"], beta=case.get("beta", 0.5), clip=case.get("clip"))
    want = eager_topk_divergence(h64, w64, cfg, ids, logprobs, tail=tail, bias=bias.double(), active=mask)
    log_q = torch.log_softmax(((h64 @ w64.t() + bias.double()) if not cfg.softcap else
                               cfg.softcap * torch.tanh((h64 @ w64.t() + bias.double()) / cfg.softcap))
                              / cfg.temperature, -1)
    want_logp = torch.where(mask, log_q.gather(1, targets[:, None]).squeeze(1), torch.zeros((), dtype=torch.float64))
    want_grads = torch.autograd.grad((coef.double() * want).sum() + want_logp.sum(), (h64, w64))

    torch.testing.assert_close(stats.divergence.double(), want, rtol=2e-5, atol=2e-6)
    assert stats.divergence[7] == 0 and abs(stats.divergence[2].item()) < 1e-6  # masked row; row without entries
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), ref, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_16_bit_inputs_compute_in_float32(dtype):
    hidden, weight, _, ids, logprobs, _ = _inputs(dtype, 5, seed=1)
    stats = token_stats(hidden, weight, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs,
                        divergence="reverse_kl", impl="torch")
    assert stats.divergence.dtype == torch.float32 and not stats.logp.any()
    grads = torch.autograd.grad(stats.divergence.sum(), (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = eager_topk_divergence(h64, w64, StatsConfig(divergence="reverse_kl"), ids, logprobs, tail=True)
    want_grads = torch.autograd.grad(want.sum(), (h64, w64))
    torch.testing.assert_close(stats.divergence.double(), want, rtol=1e-4, atol=1e-5)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-3)


@pytest.mark.triton
def test_topk_with_triton_folds_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    hidden, weight, _, ids, logprobs, targets = _inputs(torch.float32, 4, seed=2)
    out = {}
    for impl in ("torch", "triton"):
        stats = token_stats(hidden, weight, targets=targets, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs,
                            divergence="jsd", beta=0.4, impl=impl)
        out[impl] = [*stats, *torch.autograd.grad((stats.divergence + stats.entropy).sum(), (hidden, weight))]
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_topk_agrees_with_trl_server_distillation_formula():
    """TRL 1.16's ServerDistillationTrainer builds the k + 1 outcomes from the full student log-softmax; same
    numbers here, with and without the tail."""
    server = pytest.importorskip("trl.experimental.server_distillation.server_distillation_trainer")
    hidden, weight, _, ids, logprobs, _ = _inputs(torch.float32, 6, seed=3)
    ids, logprobs = ids[[0, 1, 3, 4]], logprobs[[0, 1, 3, 4]]  # full rows: TRL's path has no padding
    hidden = hidden[[0, 1, 3, 4]]
    student = torch.log_softmax(hidden.detach() @ weight.detach().t(), -1).gather(1, ids)
    valid = torch.ones_like(ids, dtype=torch.bool)
    for tail in (True, False):
        if tail:
            s, support = server._add_tail_bucket(student, valid)
            t, _ = server._add_tail_bucket(logprobs, valid)
        else:
            s, t, support = student - student.logsumexp(-1, True), logprobs - logprobs.logsumexp(-1, True), valid
        for beta in (0.0, 0.5, 1.0):
            want = server._jsd_divergence(s, t, beta, support)
            want = want.sum(-1) if want.dim() == 2 else want
            got = token_stats(hidden, weight, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs,
                              divergence="jsd", beta=beta, topk_tail=tail, impl="torch").divergence
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda ids, lp: (ids.masked_fill(ids == ids[0, 0], V), lp), "teacher_topk_ids must be in [0, V=301)"),
    (lambda ids, lp: (torch.cat([ids[:, :1], ids[:, :1]], 1), lp[:, :2]), "repeated token id in row 0"),
    (lambda ids, lp: (ids, lp.abs() + 0.5), "must be <= 0"),
    (lambda ids, lp: (ids, torch.full_like(lp, math.log(0.6))), "sum to probability 1.8"),
    (lambda ids, lp: (ids[:, :2], lp), "must have the shape of teacher_topk_ids"),
    (lambda ids, lp: (ids[:4], lp[:4]), "teacher_topk_ids must have shape [N, k] with N=9"),
    (lambda ids, lp: (ids.float(), lp), "int64 or int32"),
    (lambda ids, lp: (ids, lp.masked_fill(ids == ids[0, 0], -math.inf)), "must be finite where"),
])
def test_topk_bad_input_one_clear_line(change, message):
    hidden, weight, _, ids, logprobs, _ = _inputs(torch.float32, 3)
    full = [0, 1, 3, 4, 6, 7, 8, 0, 1]  # rows without padding
    ids, logprobs = ids[full], logprobs[full]
    bad_ids, bad_lp = change(ids, logprobs)
    with pytest.raises(ValueError, match=None) as err:
        token_stats(hidden, weight, teacher_topk_ids=bad_ids, teacher_topk_logprobs=bad_lp, divergence="forward_kl")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_topk_refuses_two_teachers_and_a_missing_divergence():
    hidden, weight, _, ids, logprobs, _ = _inputs(torch.float32, 3)
    with pytest.raises(ValueError, match="not both"):
        token_stats(hidden, weight, teacher_hidden=hidden.detach(), teacher_topk_ids=ids,
                    teacher_topk_logprobs=logprobs, divergence="forward_kl")
    with pytest.raises(ValueError, match="divergence must be set"):
        token_stats(hidden, weight, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs)
    with pytest.raises(ValueError, match="given together"):
        token_stats(hidden, weight, teacher_topk_ids=ids, divergence="forward_kl")


def test_losses_take_a_topk_teacher_per_position():
    """distillation_loss and blended_loss with [B, T, k] teacher tensors: the per-token divergence equals the
    reference's at each position in the mask; positions outside it may hold garbage ids."""
    from pydistill.losses import blended_loss, distillation_loss

    b, t, k = 2, 5, 4
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(b, t, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    ids, logprobs = _teacher_topk(b * t, V, k, g)
    ids, logprobs = ids.view(b, t, k), logprobs.view(b, t, k)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 3:] = False
    ids[1, 3:] = 7  # garbage (repeated ids) outside the mask
    out = distillation_loss(hidden, weight, None, mask, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs,
                            divergence="reverse_kl", topk_tail=False)
    want = eager_topk_divergence(hidden.detach().double().view(-1, H), weight.detach().double(),
                                     StatsConfig(divergence="reverse_kl"), ids.view(-1, k).masked_fill(
                                         ~mask.view(-1, 1), -1), logprobs.view(-1, k), tail=False,
                                     active=mask.view(-1))
    torch.testing.assert_close(out.per_token["divergence"].double().view(-1), want, rtol=2e-5, atol=2e-6)
    targets = torch.randint(0, V, (b, t), generator=g)
    blend = blended_loss(hidden, weight, None, targets, torch.tensor([1.0, -1.0]), mask, teacher_topk_ids=ids,
                         teacher_topk_logprobs=logprobs, divergence="reverse_kl", topk_tail=False,
                         distillation_weight=1.0)
    torch.testing.assert_close(blend.loss, out.loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"teacher_topk_ids must be \[B, T, k\]"):
        distillation_loss(hidden, weight, None, mask, teacher_topk_ids=ids[0], teacher_topk_logprobs=logprobs,
                          divergence="forward_kl")


def test_topk_support_and_logprobs_at_match_the_full_logits():
    from pydistill.token_stats.topk import logprobs_at, topk_support

    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    bias = torch.randn(V, generator=g)
    logits = hidden.double() @ weight.double().t() + bias.double()
    for k in (1, 7):
        ids = topk_support(hidden, weight, k, bias=bias, memory_budget_mb=0.01)  # many small chunks
        assert torch.equal(ids, logits.topk(k, dim=1).indices)
        got = logprobs_at(hidden, weight, ids, bias=bias, temperature=0.8, softcap=3.0, lean_op=token_stats)
        want = torch.log_softmax(3.0 * torch.tanh(logits / 3.0) / 0.8, -1).gather(1, ids)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, V=301\]"):
        topk_support(hidden, weight, 0)


@pytest.mark.parametrize("tail", [True, False])
def test_student_support_topk_matches_reference(tail):
    """support_topk: the divergence over the student's own top-k ids, the teacher's log-probs taken there."""
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    teacher = torch.randn(N, H, generator=g)
    mask = torch.ones(N, dtype=torch.bool)
    mask[3] = False
    stats = token_stats(hidden, weight, teacher_hidden=teacher, divergence="jsd", beta=0.5, support_topk=4,
                        topk_tail=tail, temperature=0.9, mask=mask, impl="torch")
    grads = torch.autograd.grad(stats.divergence.sum(), (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ids = (h64 @ w64.t()).topk(4, dim=1).indices.masked_fill(~mask[:, None], -1)
    teacher_lp = torch.log_softmax(teacher.double() @ w64.detach().t() / 0.9, -1).gather(1, ids.clamp_min(0))
    want = eager_topk_divergence(h64, w64, StatsConfig(temperature=0.9, divergence="jsd", beta=0.5), ids,
                                     teacher_lp.masked_fill(ids < 0, -math.inf), tail=tail, active=mask)
    torch.testing.assert_close(stats.divergence.double(), want, rtol=2e-5, atol=2e-6)
    for got, ref in zip(grads, torch.autograd.grad(want.sum(), (h64, w64))):
        torch.testing.assert_close(got.double(), ref, rtol=2e-4, atol=2e-6)
    with pytest.raises(ValueError, match="support_topk needs a teacher"):
        token_stats(hidden, weight, support_topk=4)


@pytest.mark.parametrize("teacher_softcap", [0, 3.0], ids=["uncapped-teacher", "own-cap"])
def test_student_support_takes_the_teachers_own_softcap(teacher_softcap):
    """support_topk with a capped student (c=2): the teacher's log-probs at the student's ids under the teacher's own
    cap (0: none), written out in float64."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 2.0 / H ** 0.5
    teacher = torch.randn(N, 5, generator=g)
    teacher_weight = torch.randn(V, 5, generator=g) * 4.0 / 5 ** 0.5
    stats = token_stats(hidden, weight, teacher_hidden=teacher, teacher_weight=teacher_weight, divergence="forward_kl",
                        support_topk=4, softcap=2.0, teacher_softcap=teacher_softcap, impl="torch")
    h64, w64 = hidden.double(), weight.double()
    ids = (h64 @ w64.t()).topk(4, dim=1).indices
    raw = teacher.double() @ teacher_weight.double().t()
    capped = raw if not teacher_softcap else teacher_softcap * torch.tanh(raw / teacher_softcap)
    teacher_lp = torch.log_softmax(capped, -1).gather(1, ids)
    want = eager_topk_divergence(h64, w64, StatsConfig(softcap=2.0, divergence="forward_kl"), ids, teacher_lp,
                                 tail=True)
    torch.testing.assert_close(stats.divergence.double(), want, rtol=2e-5, atol=2e-6)


def test_topk_teacher_benchmark_smoke(tmp_path):
    from benchmarks.topk_teacher import main

    out = tmp_path / "cost.json"
    assert main(["cost", "--n", "16", "--h", "8", "--v", "100", "--ks", "3", "--out", str(out)]) == 0
    import json
    records = json.loads(out.read_text())["records"]
    assert [r["variant"] for r in records] == ["full", "topk3", "topk3-renorm"]
    assert all(r["seconds"] > 0 for r in records)


def test_topk_gap_scores_through_the_whole_head():
    """benchmarks.topk_teacher's gap reads the model's whole head (bias and softcap): in the full teacher, in the
    top-k teacher's log-probs and in the student."""
    from benchmarks.topk_teacher import topk_gap
    from pydistill.boundary import Head

    g = torch.Generator().manual_seed(0)
    n, h, v, cap = 12, 8, 40, 4.0
    head = Head(torch.randn(v, h, generator=g) * 2.0, torch.randn(v, generator=g) * 3.0, cap, 1.0)
    student, teacher = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    result = topk_gap(student, teacher, head, [5, v])

    def log_probs(x):
        logits = x.double() @ head.weight.double().t() + head.bias.double()
        return torch.log_softmax(cap * torch.tanh(logits / cap), -1)

    p_log, q_log = log_probs(teacher), log_probs(student)
    kl = float((p_log.exp() * (p_log - q_log)).sum(-1).mean())
    assert result["full_forward_kl"] == pytest.approx(kl, rel=1e-4)
    assert result["ks"][v]["tail_forward_kl"] == pytest.approx(kl, rel=1e-4)  # the top-V teacher is the full one
    mass = float(p_log.exp().topk(5, dim=-1).values.sum(-1).mean())
    assert result["ks"][5]["teacher_mass"] == pytest.approx(mass, rel=1e-4)
