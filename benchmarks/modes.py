"""The ``modes`` family: the losses a user trains with, lean vs fast vs the plain losses a user would write.

Cases ``modes-<loss>-<impl>``, forward + backward of one scalar loss:

- loss: ``kl`` (forward KL(teacher || student), token mean), ``jsd`` (generalized JSD, beta 0.5), ``clip`` (forward
  KL with OPSD's pointwise clip 0.05), ``grpo`` (on-policy DAPO, one context), ``blend`` (0.5 KL + 0.5 GRPO).
- impl: ``lean`` (the fused loss with the fast mode switched off: 6 GEMM passes for two contexts, 3 for one),
  ``b256`` (the fused loss at ``memory_budget_mb=256``, the former default: lean or partial, whatever it picks),
  ``fast`` (``memory_budget_mb=4096``, the default: the gradient formed in the forward, 4 passes / 2),
  ``eager`` (the plain loss a user writes: [N, V] logits, ``log_softmax``, only what the loss needs),
  ``compile`` (``torch.compile`` of that eager loss), ``trl`` (TRL 1.16's ``ChunkedDivergenceFunction`` /
  ``ChunkedLogProbFunction``, as its trainers call them; no clip), ``liger`` / ``liger-eager`` (Liger's
  ``LigerFusedLinearJSDLoss``, compiled as it ships, and with ``compiled=False``; JSD only).

``python -m benchmarks.modes`` runs chosen cases alternately in one process and prints time ratios (for a
loaded machine); ``python -m benchmarks --cases modes ...`` runs each case in a fresh process (time and memory).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time

import torch

LOSSES = ("kl", "jsd", "clip", "grpo", "blend")
IMPLS = ("lean", "b256", "fast", "eager", "compile", "trl", "liger", "liger-eager")
CLIP = 0.05
BETA = 0.5


@contextlib.contextmanager
def _lean_only(enabled: bool):
    """The fast mode switched off (its plan says no row fits): the lean mode at the same budget."""
    from pydistill.token_stats import fast

    real = fast.plan_fast
    if enabled:
        fast.plan_fast = lambda *a, **k: None
    try:
        yield
    finally:
        fast.plan_fast = real


def _eager_loss(loss: str):
    """What a user writes: logits in the input dtype, float32 statistics, only what the loss needs."""
    def divergence(z_s, z_t):
        log_q = z_s.float().log_softmax(-1)
        log_p = z_t.float().log_softmax(-1)
        if loss == "jsd":
            log_m = torch.logaddexp(log_p + math.log(BETA), log_q + math.log(1 - BETA))
            return (BETA * (log_p.exp() * (log_p - log_m)).sum(-1)
                    + (1 - BETA) * (log_q.exp() * (log_q - log_m)).sum(-1))
        d = log_p.exp() * (log_p - log_q)
        return (d.clamp(max=CLIP) if loss == "clip" else d).sum(-1)

    def policy(z_s, targets, advantages):
        logp = z_s.float().log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        ratio = torch.exp(logp - logp.detach())  # on-policy: 1, gradient of logp * A
        return -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages).mean()  # DAPO: token mean

    def fn(hidden, weight, teacher, targets, advantages):
        z_s = hidden @ weight.t()
        if loss == "grpo":
            return policy(z_s, targets, advantages)
        with torch.no_grad():
            z_t = teacher @ weight.t()
        distill = divergence(z_s, z_t).mean()
        return distill if loss != "blend" else 0.5 * distill + 0.5 * policy(z_s, targets, advantages)
    return fn


def _trl_loss(loss: str):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    def fn(hidden, weight, teacher, targets, advantages):
        parts = []
        if loss in ("kl", "jsd", "blend"):
            div, _ = ChunkedDivergenceFunction.apply(hidden, weight, None, teacher, weight, None,
                                                     0.0 if loss != "jsd" else BETA)
            parts.append(div.mean())
        if loss in ("grpo", "blend"):  # TRL's trainers ask for the entropy too (logged, no gradient)
            logp, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0,
                                                    ("entropy",))
            ratio = torch.exp(logp - logp.detach())
            parts.append(-torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages).mean())
        return parts[0] if len(parts) == 1 else 0.5 * parts[0] + 0.5 * parts[1]
    return fn


def _liger_loss(compiled: bool):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, compiled=compiled)

    def fn(hidden, weight, teacher, targets, advantages):
        out = module(hidden, weight, teacher, weight.detach(), targets, None, None)
        return out[0] if isinstance(out, tuple) else out
    return fn


def _ours_loss(loss: str, budget_mb: float):
    from pydistill.losses import blended_loss, distillation_loss, grpo_loss

    def fn(hidden, weight, teacher, targets, advantages, batch, length):
        width = hidden.shape[1]
        h, t = hidden.view(batch, length, width), teacher.view(batch, length, width)
        y, adv = targets.view(batch, length), advantages.view(batch, length)
        if loss == "grpo":
            return grpo_loss(h, weight, y, adv, loss_type="dapo", memory_budget_mb=budget_mb).loss
        if loss == "blend":
            return blended_loss(h, weight, t, y, adv, distillation_weight=0.5, divergence="forward_kl",
                                loss_type="dapo", memory_budget_mb=budget_mb).loss
        return distillation_loss(h, weight, t, divergence="jsd" if loss == "jsd" else "forward_kl", beta=BETA,
                                 clip=CLIP if loss == "clip" else None, memory_budget_mb=budget_mb).loss
    return fn


def unavailable(loss: str, impl: str):
    """None when the (loss, impl) pair exists, else why not."""
    if impl == "trl" and loss == "clip":
        return "not run: TRL has no pointwise clip"
    if impl.startswith("liger") and loss != "jsd":
        return "not run: Liger's chunked loss here is the JSD"
    return None


def make_step(loss: str, impl: str, compile_backend: str = "inductor"):
    """``make_step(inputs, compile_backend)`` for :class:`benchmarks.cases.Case`."""
    def build(x, backend=compile_backend):
        advantages = x.advantages.repeat_interleave(x.length)  # per token, as the losses broadcast them
        args = (x.hidden, x.weight, x.teacher, x.targets, advantages)
        if impl in ("lean", "b256", "fast"):
            fn = _ours_loss(loss, 4096.0 if impl == "fast" else 256.0)

            def step():
                with _lean_only(impl == "lean"):
                    value = fn(*args, x.batch, x.length)
                    value.backward()
                return value.detach()
            return step
        if impl in ("eager", "compile"):
            fn = _eager_loss(loss)
            fn = torch.compile(fn, backend=backend) if impl == "compile" else fn
        elif impl == "trl":
            fn = _trl_loss(loss)
        else:
            fn = _liger_loss(compiled=impl == "liger")

        def step():
            value = fn(*args)
            value.backward()
            return value.detach()
        return step
    return build


def interleaved(names, n, h, v, dtype, rounds, warmup=1):
    """Median seconds of each case, running the cases in turn ``rounds`` times in this process (shared noise),
    and each case's (loss, dH, dW) relative difference to the first case's, from the warm-up step."""
    from benchmarks.cases import CASES, make_inputs

    x = make_inputs(n, h, v, dtype, "cpu")
    steps = {name: CASES[name].build(x) for name in names}
    results, differences = {}, {}
    for i in range(warmup):
        for name, step in steps.items():
            x.hidden.grad = x.weight.grad = None
            value = step()
            if i == 0:
                results[name] = (value.double(), x.hidden.grad.double(), x.weight.grad.double())
    first = results[names[0]]
    for name, got in results.items():
        differences[name] = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got, first))
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name, step in steps.items():
            x.hidden.grad = x.weight.grad = None
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, differences


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.modes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--impls", nargs="+", default=["lean", "b256", "fast", "eager", "compile", "trl"], choices=IMPLS)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--h", type=int, default=576)
    p.add_argument("--v", type=int, default=49152)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"N={args.n} H={args.h} V={args.v} float32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} alternating rounds; ratios are to the eager loss (or the first impl)", flush=True)
    for loss in args.losses:
        names = [f"modes-{loss}-{i}" for i in args.impls if unavailable(loss, i) is None]
        med, differences = interleaved(names, args.n, args.h, args.v, torch.float32, args.rounds)
        base = med.get(f"modes-{loss}-eager", next(iter(med.values())))
        for name, s in med.items():
            print(f"{name:24s} {s * 1e3:9.0f} ms  {s / base:5.2f}x eager  (loss, dH, dW) vs {names[0]}: "
                  f"{differences[name]:.1e} relative", flush=True)


if __name__ == "__main__":
    main()
