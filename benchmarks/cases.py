"""Benchmark cases: each builds its inputs once and returns a closure running one forward + backward.

Families (the numbers of the benchmark issue):

1. ``core-<divergence>[-clip]-<impl>``: the core op on two contexts sharing the lm_head (logp + entropy +
   divergence), for forward_kl / reverse_kl / jsd, each plain and with OPSD's pointwise clip.
2. ``ce-<impl>``: logp + entropy of one context, no teacher (the cross-entropy family); ``ce-cce`` is Cut
   Cross-Entropy's ``linear_cross_entropy`` (CE only, no entropy) when it is installed.
3. ``distill-<eager|ours|liger>``: :func:`pydistill.losses.distillation_loss` (JSD, beta 0.5) against Liger's
   ``LigerFusedLinearJSDLoss`` and an eager full-logits JSD.
4. ``grpo-<eager|ours|liger>``: :func:`pydistill.losses.grpo_loss` (DAPO normalization, on-policy, no KL)
   against Liger's ``LigerFusedLinearGRPOLoss`` and the same loss on eager full logits.
5. ``mask<p>-<impl>``: first-error masking, p% of the rows masked out (reverse KL, two contexts).
7. ``modes-<loss>-<impl>``: the losses users train with (KL, JSD, clip, GRPO, blend) in the op's lean and fast
   modes against the plain eager loss, its torch.compile, TRL's chunked functions and Liger (:mod:`.modes`).

(6), a full OPSD trainer step, lives in :mod:`benchmarks.trainer_step` (it needs a model, not a shape).

``impl``: ``eager`` (logits in the input dtype, statistics in float32: a user's plain PyTorch loss),
``compile`` (torch.compile of eager), ``torch`` / ``triton`` (the fused op's chunk loop with its torch or its
Triton folds), ``ours`` (the fused loss with its default folds), ``trl`` (TRL's ``ChunkedDivergenceFunction``
for two contexts: divergence with gradient, entropy without, no logp, no clip; ``ChunkedLogProbFunction`` for
one: logp and entropy), ``liger`` / ``cce`` (third-party baselines).

FLOPs per case: ``12 N H V`` for two contexts and ``6 N H V`` for one (forward GEMM 2NHV, backward 4NHV
per context, as the issue counts them), over the rows that are not masked out.
"""
from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from pydistill import token_stats
from pydistill.losses import distillation_loss, grpo_loss
from pydistill.token_stats.eager import eager_token_stats
from pydistill.token_stats.config import DIVERGENCES, StatsConfig

SHAPES = {  # name: (N tokens on CUDA, H, V)
    "cpu-small": (512, 576, 8192),
    "smollm2": (2048, 576, 49152),  # SmolLM2-135M/360M: 576 x 49152
    "llama3-8b": (8192, 4096, 128256),
    "qwen": (8192, 4096, 151936),  # Qwen2.5-7B-like head: 4096 (3584 in Qwen2.5-7B itself) x 151936
    "gemma3-270m": (2048, 640, 262144),  # a 262k vocabulary
}
# Default N on the CPU, where a full sweep at SmolLM2 shapes must stay under about ten minutes.
CPU_N = {"cpu-small": 512, "smollm2": 512, "llama3-8b": 256, "qwen": 256, "gemma3-270m": 512}
QUICK_N = 256

CLIP = 0.05  # OPSD v3's pointwise clip
JSD_BETA = 0.5  # the same mixture under the TRL/pydistill and Liger conventions
SEQUENCE = 256  # completion length T of the [B, T, H] layout the losses take (B = N / T)


@dataclass
class Inputs:
    hidden: torch.Tensor  # [N, H] student hidden states, requires grad
    weight: torch.Tensor  # [V, H] shared lm_head, requires grad
    teacher: torch.Tensor  # [N, H] teacher-context hidden states (no grad)
    targets: torch.Tensor  # [N] sampled token ids
    advantages: torch.Tensor  # [B] one per sequence
    batch: int  # B, with B * T = N
    length: int  # T


def make_inputs(n, width, vocab, dtype, device, seed=0) -> Inputs:
    # generated on the device itself: a [V, H] weight of a large vocabulary takes seconds to draw on the CPU
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=g, device=device)
    hidden = torch.randn(n, width, **kw).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, width, **kw) / width ** 0.5).to(dtype).requires_grad_()
    # the teacher context sees the same tokens with more context: close to the student, not equal
    teacher = (hidden.detach().float() + 0.5 * torch.randn(n, width, **kw)).to(dtype)
    targets = torch.randint(0, vocab, (n,), **kw)
    length = SEQUENCE if n % SEQUENCE == 0 else n
    advantages = torch.randn(n // length, **kw)
    # gradients exist before the timed run, so "extra memory" is what the op needs beyond inputs and grads
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    return Inputs(hidden, weight, teacher, targets, advantages, n // length, length)


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _cce_impl(device: str) -> Optional[str]:
    """CCE's implementation for this device: its Triton kernel on CUDA, its torch.compile path elsewhere."""
    if device == "cuda":
        return "cce"
    from cut_cross_entropy import LinearCrossEntropyImpl

    return "torch_compile" if hasattr(LinearCrossEntropyImpl, "TORCH_COMPILE") else None


@dataclass(frozen=True)
class Case:
    """One benchmark case. ``build(inputs, compile_backend)`` returns the timed closure: one forward and
    backward, returning the detached scalar it backpropagated."""

    name: str
    family: str  # core | ce | distill | grpo | mask
    impl: str  # eager | compile | torch | triton | ours | trl | liger | cce
    contexts: int  # 2: student + teacher; 1: student only
    make_step: Callable = field(repr=False)
    active: float = 1.0  # share of rows not masked out
    baseline: Optional[str] = None  # the eager case this one is compared with
    rival: Optional[str] = None  # a third-party case it is compared with
    note: str = ""

    def flops(self, n: int, h: int, v: int) -> int:
        return 6 * self.contexts * (n - int(round((1.0 - self.active) * n))) * h * v

    def unavailable(self, device: str) -> Optional[str]:
        """None when the case can run on ``device``, else the status to record ("not run: <reason>")."""
        if self.impl == "triton":
            if device != "cuda":
                return "not run: needs CUDA"
            if not _module_available("triton"):
                return "not run: triton not installed"
        if self.impl == "trl" and not _module_available("trl"):
            return "not run: trl not installed"
        if self.impl == "liger":
            if not _module_available("liger_kernel"):
                return "not run: liger-kernel not installed"
            if device != "cuda" and self.family != "modes":  # the modes family runs Liger's torch path
                return "not run: needs CUDA"
        if self.impl == "cce":
            if not _module_available("cut_cross_entropy"):
                return "not run: cut-cross-entropy not installed"
            if _cce_impl(device) is None:
                return "not run: this cut-cross-entropy has no implementation for " + device
        if self.impl in ("compile", "cce") and device == "cpu" and shutil.which("g++") is None \
                and shutil.which("c++") is None:
            return "not run: torch.compile needs a C++ compiler on the CPU"
        return None

    def backend(self, device: str) -> str:
        """The fused op's backend this case actually runs ("ours" resolves like impl="auto")."""
        if self.impl == "ours":
            return "triton" if device == "cuda" and _module_available("triton") else "torch"
        return self.impl

    def build(self, inputs: Inputs, compile_backend: str = "inductor"):
        return self.make_step(inputs, compile_backend)


def _backward(loss: torch.Tensor) -> torch.Tensor:
    """Backpropagate the case's scalar; the detached value comes back so that tests can check what ran."""
    loss.backward()
    return loss.detach()


def _row_mask(inputs: Inputs, masked: float):
    """First-error layout: the first ``masked`` share of the rows is masked out."""
    n = inputs.hidden.shape[0]
    return torch.arange(n, device=inputs.hidden.device) >= int(round(masked * n))


def _eager_stats(cfg: StatsConfig, compile_backend: Optional[str]):
    def eager(h, w, t, y, active):
        return eager_token_stats(h, w, cfg, teacher_hidden=t, teacher_weight=None if t is None else w,
                                     targets=y, dtype=None, active=active)
    return torch.compile(eager, backend=compile_backend) if compile_backend else eager


def core_op(impl: str, divergence: str = "reverse_kl", clip: Optional[float] = None, masked: float = 0.0):
    """Two contexts sharing the lm_head: logp + entropy + divergence, forward and backward."""
    def make_step(x: Inputs, compile_backend):
        mask = _row_mask(x, masked)
        if impl in ("eager", "compile"):
            cfg = StatsConfig(divergence=divergence, beta=JSD_BETA, clip=clip, has_targets=True)
            fn = _eager_stats(cfg, compile_backend if impl == "compile" else None)

            def step():
                logp, entropy, div = fn(x.hidden, x.weight, x.teacher, x.targets, mask)
                return _backward(logp.sum() + entropy.sum() + div.sum())
        elif impl == "trl":
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": JSD_BETA}[divergence]

            def step():  # TRL's mixture weight beta multiplies the teacher, as in pydistill's convention
                rows = mask.nonzero().squeeze(1)  # masked rows gathered out, as TRL's trainers do
                div, _ = ChunkedDivergenceFunction.apply(x.hidden[rows], x.weight, None, x.teacher[rows], x.weight,
                                                         None, beta)
                return _backward(div.sum())
        else:
            def step():
                out = token_stats(x.hidden, x.weight, targets=x.targets, teacher_hidden=x.teacher,
                                  divergence=divergence, beta=JSD_BETA, clip=clip, mask=mask, impl=impl)
                return _backward(out.logp.sum() + out.entropy.sum() + out.divergence.sum())
        return step
    return make_step


def ce_op(impl: str):
    """One context, no teacher: logp + entropy (the CE family); CCE computes the CE (-logp) alone."""
    def make_step(x: Inputs, compile_backend):
        if impl == "cce":
            from cut_cross_entropy import linear_cross_entropy

            cce_impl = _cce_impl(x.hidden.device.type)

            def step():
                return _backward(linear_cross_entropy(x.hidden, x.weight, x.targets, reduction="none",
                                                      impl=cce_impl).sum())
        elif impl == "trl":
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction

            def step():  # TRL's trainers call it with vocabulary chunks of 32768
                logp, entropy, *_ = ChunkedLogProbFunction.apply(x.hidden, x.weight, None, x.targets, 1.0, 32768, None,
                                                                 1.0, ("entropy",))
                return _backward(logp.sum() + entropy.sum())
        elif impl in ("eager", "compile"):
            fn = _eager_stats(StatsConfig(has_targets=True), compile_backend if impl == "compile" else None)

            def step():
                logp, entropy, _ = fn(x.hidden, x.weight, None, x.targets, None)
                return _backward(logp.sum() + entropy.sum())
        else:
            def step():
                out = token_stats(x.hidden, x.weight, targets=x.targets, impl=impl)
                return _backward(out.logp.sum() + out.entropy.sum())
        return step
    return make_step


def distill_op(impl: str):
    """Token-mean generalized JSD (beta 0.5) of a student context against a teacher context, shared head."""
    def make_step(x: Inputs, compile_backend):
        b, t, width = x.batch, x.length, x.hidden.shape[1]
        if impl == "liger":
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            # soft loss only (weight_hard_loss=0): the same objective as ours; Liger takes flat [N, H] rows
            loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=JSD_BETA)
            teacher_weight = x.weight.detach()

            def step():
                out = loss_fn(x.hidden, x.weight, x.teacher, teacher_weight, x.targets, None, None)
                return _backward(out[0] if isinstance(out, tuple) else out)
        elif impl == "eager":
            cfg = StatsConfig(divergence="jsd", beta=JSD_BETA)

            def step():
                _, _, div = eager_token_stats(x.hidden, x.weight, cfg, teacher_hidden=x.teacher,
                                                  teacher_weight=x.weight, dtype=None)
                return _backward(div.mean())
        else:
            def step():
                out = distillation_loss(x.hidden.view(b, t, width), x.weight, x.teacher.view(b, t, width),
                                        divergence="jsd", beta=JSD_BETA)
                return _backward(out.loss)
        return step
    return make_step


def grpo_op(impl: str):
    """On-policy GRPO clipped surrogate, DAPO normalization (token sum / token count), no KL term."""
    def make_step(x: Inputs, compile_backend):
        b, t, width = x.batch, x.length, x.hidden.shape[1]
        targets = x.targets.view(b, t)
        if impl == "liger":
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                               epsilon_low=0.2, epsilon_high=0.2)
            attention = torch.ones(b, t, device=x.hidden.device)

            def step():
                out = loss_fn(x.hidden.view(b, t, width), x.weight, targets, attention, x.advantages)
                return _backward(out[0] if isinstance(out, tuple) else out)
        elif impl == "eager":
            cfg = StatsConfig(has_targets=True)
            advantages = x.advantages.unsqueeze(1).expand(b, t)

            def step():  # the plain loss: the clipped surrogate on the sampled tokens' logp, token mean
                logp, _, _ = eager_token_stats(x.hidden, x.weight, cfg, targets=x.targets, dtype=None)
                ratio = torch.exp(logp.view(b, t) - logp.view(b, t).detach())
                per_token = -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
                return _backward(per_token.mean())
        else:
            def step():
                return _backward(grpo_loss(x.hidden.view(b, t, width), x.weight, targets, x.advantages,
                                           loss_type="dapo").loss)
        return step
    return make_step


def _core_name(divergence, clip, impl):
    return f"core-{divergence}{'-clip' if clip else ''}-{impl}"


def _build_cases() -> dict:
    cases = {}

    def add(case: Case):
        cases[case.name] = case

    for divergence in DIVERGENCES:
        for clip in (None, CLIP):
            eager = _core_name(divergence, clip, "eager")
            for impl in ("eager", "compile", "torch", "triton", "trl"):
                if impl == "trl" and clip:
                    continue  # TRL has no pointwise clip
                add(Case(_core_name(divergence, clip, impl), "core", impl, 2, core_op(impl, divergence, clip),
                         baseline=None if impl == "eager" else eager,
                         rival=_core_name(divergence, None, "trl") if impl in ("torch", "triton") and not clip
                         else None,
                         note="divergence gradient only (entropy without gradient, no logp)" if impl == "trl"
                         else ""))
    for impl in ("eager", "compile", "torch", "triton", "trl", "cce"):
        add(Case(f"ce-{impl}", "ce", impl, 1, ce_op(impl), baseline=None if impl == "eager" else "ce-eager",
                 rival="ce-trl" if impl in ("torch", "triton") else None,
                 note="CE (-logp) only, no entropy" if impl == "cce" else ""))
    for family, op, note in (("distill", distill_op, "JSD beta 0.5, token mean"),
                             ("grpo", grpo_op, "DAPO, on-policy, beta 0")):
        contexts = 2 if family == "distill" else 1
        for impl in ("eager", "ours", "liger"):
            add(Case(f"{family}-{impl}", family, impl, contexts, op(impl),
                     baseline=None if impl == "eager" else f"{family}-eager",
                     rival=f"{family}-liger" if impl == "ours" else None, note=note))
    for p in (0.0, 0.25, 0.5, 0.75):
        for impl in ("torch", "triton", "trl", "eager"):
            # eager computes every row whatever the mask (its mask25..75 cases show it): mask0-eager is the
            # baseline of every masked fused case
            add(Case(f"mask{int(p * 100)}-{impl}", "mask", impl, 2, core_op(impl, "reverse_kl", masked=p),
                     active=1.0 - p, baseline=None if impl == "eager" else "mask0-eager"))
    from benchmarks import modes

    for loss in modes.LOSSES:
        for impl in modes.IMPLS:
            if modes.unavailable(loss, impl) is None:
                kind = "ours" if impl in ("lean", "b256", "fast") else impl.split("-")[0]
                add(Case(f"modes-{loss}-{impl}", "modes", kind, 1 if loss == "grpo" else 2, modes.make_step(loss, impl),
                         baseline=None if impl == "eager" else f"modes-{loss}-eager",
                         rival=f"modes-{loss}-compile" if impl in ("lean", "fast") else None))
    return cases


CASES = _build_cases()

# Case lists of `python -m benchmarks`.
ALL_CASES = list(CASES)
CPU_DEFAULT = (
    [_core_name(d, c, i) for d in DIVERGENCES for c in (None, CLIP) for i in ("eager", "torch", "trl")
     if not (i == "trl" and c)]
    + [_core_name("forward_kl", CLIP, "compile"), _core_name("reverse_kl", None, "triton")]
    + ["ce-eager", "ce-torch", "ce-trl", "ce-compile", "ce-cce", "distill-eager", "distill-ours", "distill-liger",
       "grpo-eager", "grpo-ours", "grpo-liger"]
    + [f"mask{p}-torch" for p in (0, 25, 50, 75)] + ["mask0-eager"])
CUDA_DEFAULT = [name for name in ALL_CASES if not (name.startswith("mask") and name.endswith("-eager")
                                                   and name != "mask0-eager")]
QUICK = ["core-reverse_kl-eager", "core-reverse_kl-torch", "core-reverse_kl-triton", "core-reverse_kl-trl",
         "core-forward_kl-clip-eager", "core-forward_kl-clip-torch", "ce-eager", "ce-torch", "ce-trl", "ce-cce",
         "distill-eager", "distill-ours", "distill-liger", "grpo-eager", "grpo-ours", "grpo-liger", "mask0-torch",
         "mask50-torch", "mask0-eager"]


def select(names) -> list:
    """Case names from names, family names (``core``, ``ce``, ``distill``, ``grpo``, ``mask``) or ``all``."""
    out = []
    for name in names:
        if name == "all":
            chosen = ALL_CASES
        elif name in CASES:
            chosen = [name]
        else:
            chosen = [c.name for c in CASES.values() if c.family == name]
            if not chosen:
                raise ValueError(f"unknown case or family {name!r}; cases: {', '.join(CASES)}")
        out.extend(c for c in chosen if c not in out)
    return out
