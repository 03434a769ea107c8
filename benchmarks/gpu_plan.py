"""What the GPU session runs, in the order a short lease must not miss, and the cases only it needs.

A job is a plain dict (it travels to the worker process as one JSON line):
``env`` (GPU, versions, measured matmul rate and bandwidth, which baselines import), ``case`` (one benchmark
case at one shape, beside the cost model's prediction), ``check`` (outputs and gradients against float64 at
the real shape) and ``command`` (a step benchmark's child process, or the native tests).

pydistill runs at two memory budgets through the public ``memory_budget_mb`` argument: ``lean`` (256 MB) and
``fast`` (4096 MB). A function whose signature has no such argument yet runs the lean case at its default and
records the fast case as not run, so the plan works before and after the fast mode lands.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Optional

from benchmarks import cost_model
from benchmarks.cases import CASES, JSD_BETA, Case, Inputs, _backward, _row_mask
from pydistill import token_stats
from pydistill.losses import distillation_loss

MODES = {"lean": 256.0, "fast": 4096.0}  # memory_budget_mb of each pydistill mode


def budget_kwargs(fn, budget_mb: float) -> Optional[dict]:
    """``{"memory_budget_mb": budget_mb}`` when ``fn`` takes it, else None (the fast mode is not in yet)."""
    return {"memory_budget_mb": budget_mb} if "memory_budget_mb" in inspect.signature(fn).parameters else None


@dataclass(frozen=True)
class ModeCase(Case):
    """A pydistill case at one memory budget; ``fn`` is the public function the budget is passed to."""

    fn: Optional[object] = None
    budget_mb: float = MODES["lean"]

    def unavailable(self, device: str) -> Optional[str]:
        if budget_kwargs(self.fn, self.budget_mb) is None and self.budget_mb != MODES["lean"]:
            return f"not run: {self.fn.__name__} takes no memory_budget_mb argument yet"
        return super().unavailable(device)


def _core(divergence, clip, budget_mb, masked=0.0):
    def make_step(x: Inputs, compile_backend):
        mask = _row_mask(x, masked) if masked else None
        kw = budget_kwargs(token_stats, budget_mb) or {}

        def step():
            out = token_stats(x.hidden, x.weight, targets=x.targets, teacher_hidden=x.teacher, divergence=divergence,
                              beta=JSD_BETA, clip=clip, mask=mask, **kw)
            return _backward(out.logp.sum() + out.entropy.sum() + out.divergence.sum())
        return step
    return make_step


def _ce(budget_mb):
    def make_step(x: Inputs, compile_backend):
        kw = budget_kwargs(token_stats, budget_mb) or {}

        def step():
            out = token_stats(x.hidden, x.weight, targets=x.targets, **kw)
            return _backward(out.logp.sum() + out.entropy.sum())
        return step
    return make_step


def _distill(budget_mb):
    def make_step(x: Inputs, compile_backend):
        b, t, width = x.batch, x.length, x.hidden.shape[1]
        kw = budget_kwargs(distillation_loss, budget_mb) or {}  # lean runs at the default until the argument exists

        def step():
            out = distillation_loss(x.hidden.view(b, t, width), x.weight, x.teacher.view(b, t, width),
                                    divergence="jsd", beta=JSD_BETA, **kw)
            return _backward(out.loss)
        return step
    return make_step


def _liger_flce(x: Inputs, compile_backend):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def step():
        return _backward(loss_fn(x.weight, x.hidden, x.targets))
    return step


def _build() -> dict:
    cases = dict(CASES)
    for mode, mb in MODES.items():
        for divergence, clip in (("forward_kl", None), ("reverse_kl", None), ("jsd", None), ("forward_kl", 0.05)):
            name = f"core-{divergence}{'-clip' if clip else ''}-{mode}"
            cases[name] = ModeCase(name, "core", "ours", 2, _core(divergence, clip, mb), fn=token_stats, budget_mb=mb)
        for p in (0, 50):
            cases[f"mask{p}-{mode}"] = ModeCase(f"mask{p}-{mode}", "mask", "ours", 2,
                                                _core("reverse_kl", None, mb, masked=p / 100), active=1 - p / 100,
                                                fn=token_stats, budget_mb=mb)
        cases[f"ce-{mode}"] = ModeCase(f"ce-{mode}", "ce", "ours", 1, _ce(mb), fn=token_stats, budget_mb=mb)
        cases[f"distill-{mode}"] = ModeCase(f"distill-{mode}", "distill", "ours", 2, _distill(mb),
                                            fn=distillation_loss, budget_mb=mb, note="JSD beta 0.5, token mean")
    cases["ce-liger"] = Case("ce-liger", "ce", "liger", 1, _liger_flce,
                             note="Liger fused linear CE: CE (-logp) only, no entropy")
    return cases


GPU_CASES = _build()

# Which importable baseline each implementation needs (the env job probes these on the machine itself).
PROBES = {
    "trl": "from trl.kernels.chunked_divergence import ChunkedDivergenceFunction\n"
           "from trl.kernels.chunked_logprob import ChunkedLogProbFunction",
    "liger": "from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss\n"
             "from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss",
    "cce": "from cut_cross_entropy import linear_cross_entropy",
    "grpo": "import datasets\nfrom trl import GRPOTrainer",
}


def case_job(section, name, shape, dtype, variant=None, mode=None, timeout=90.0, predict_n=None) -> dict:
    """One case at one shape; ``variant`` names the cost model's variant for its prediction (None: no model),
    ``predict_n`` the rows the model counts (the unmasked ones, for implementations that skip masked rows)."""
    case = GPU_CASES[name]
    model = {"ours": "ours", "eager": "eager", "trl": "trl", "liger": "liger"}.get(case.impl)
    n, h, v = shape
    return dict(kind="case", section=section, case=name, impl=mode or case.impl, n=n, h=h, v=v, dtype=dtype,
                variant=variant, model=model if variant else None, budget_mb=MODES.get(mode),
                predict_n=predict_n or n, timeout=timeout, needs=case.impl if case.impl in PROBES else None)


def head_to_head(shape, dtype) -> list:
    """Two contexts sharing the head: forward KL, JSD (the core op and the fused losses), forward KL + clip."""
    jobs = []
    for variant, core, extra in (("forward_kl", "core-forward_kl", ["trl", "eager"]),
                                 ("jsd", "core-jsd", ["trl"]),
                                 ("forward_kl-clip", "core-forward_kl-clip", ["eager"])):
        jobs += [case_job("two-context", f"{core}-{m}", shape, dtype, variant, mode=m) for m in MODES]
        jobs += [case_job("two-context", f"{core}-{impl}", shape, dtype, variant) for impl in extra]
        if variant == "jsd":
            jobs += [case_job("two-context", f"distill-{m}", shape, dtype, variant, mode=m) for m in MODES]
            jobs += [case_job("two-context", "distill-liger", shape, dtype, variant),  # compiled chunked JSD
                     case_job("two-context", "core-jsd-eager", shape, dtype, variant)]
    return jobs


def plan(settings: dict, smoke: bool) -> list:
    """Every job of the session, most important first."""
    dtype = settings["dtype"]
    first, second = settings["shapes"]
    n = first[0]
    jobs = [dict(kind="env", section="environment", timeout=120.0, probes=PROBES)]
    jobs += head_to_head(first, dtype) + head_to_head(second, dtype)
    compile_s = 60.0 if smoke else 180.0
    jobs += [case_job("two-context", f"core-{v}-compile", first, dtype, None, timeout=compile_s)
             for v in ("forward_kl", "jsd", "forward_kl-clip")]
    jobs.append(dict(kind="check", section="accuracy", shape=list(settings["check"]), rows=settings["check_rows"],
                     dtype=dtype, timeout=90.0))
    jobs += [case_job("masked", "mask0-lean", first, dtype, "reverse_kl", mode="lean")]
    jobs += [case_job("masked", f"mask50-{m}", first, dtype, "reverse_kl", mode=m, predict_n=n // 2) for m in MODES]
    jobs += [case_job("masked", "mask50-trl", first, dtype, "reverse_kl", predict_n=n // 2),
             case_job("masked", "mask50-eager", first, dtype, "reverse_kl")]  # eager computes every row
    jobs += [case_job("one-context", f"ce-{m}", first, dtype, "ce", mode=m) for m in MODES]
    jobs += [case_job("one-context", f"ce-{impl}", first, dtype, "ce" if impl in ("trl", "eager") else None)
             for impl in ("trl", "liger", "cce", "eager")]
    jobs.append(case_job("one-context", "ce-compile", first, dtype, None, timeout=compile_s))
    device = "cpu" if smoke else "cuda"
    for loss in ("fused", "eager"):
        argv = ["-m", "benchmarks.trainer_step", "--child", "--loss", loss, "--device", device,
                *settings["opsd"]]
        jobs.append(dict(kind="command", section="opsd-step", label=f"OPSD step, {loss} loss", argv=argv,
                         parse="json", timeout=180.0, needs=None))
    for variant in ("trl", "pydistill"):
        argv = ["-m", "benchmarks.trl_step", "--variant", variant, "--device", device, *settings["grpo"]]
        jobs.append(dict(kind="command", section="grpo-step", label=f"GRPOTrainer step, {variant}", argv=argv,
                         parse="result", timeout=180.0, needs="grpo"))
    argv = ["-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", *settings["tests"]]
    jobs.append(dict(kind="command", section="native-tests", label="native tests", argv=argv, parse="pytest",
                     timeout=300.0, needs=None))
    return jobs


def predict(job: dict, rates: Optional[dict]) -> dict:
    """The cost model's time and extra memory for a case job, from the rates measured on this machine."""
    if not job.get("variant") or not job.get("model") or not rates:
        return {}
    fn = cost_model.IMPLS[job["model"]]
    n, h, v = job["predict_n"], job["h"], job["v"]
    try:
        if job["model"] == "ours" and job.get("budget_mb"):
            r = fn(n, h, v, job["variant"], budget_mb=job["budget_mb"])
        else:
            r = fn(n, h, v, job["variant"])
    except Exception as exc:  # noqa: BLE001 - a model that cannot count this case says why, the case still runs
        return dict(predicted_status=f"cost model failed: {type(exc).__name__}: {str(exc)[:120]}")
    if "flops" not in r:
        return dict(predicted_status=r.get("status"))
    ms = r["flops"] / (rates["matmul_tflops"] * 1e12) * 1e3 + r["bytes"] / (rates["bandwidth_tbs"] * 1e12) * 1e3
    return dict(predicted_ms=ms, predicted_extra_mb=r["extra_mb"])


REAL = dict(shapes=[(8192, 4096, 151936), (8192, 4096, 128256)], check=(8192, 4096, 151936), check_rows=64,
            dtype="bfloat16",
            tests=["tests/test_token_stats.py", "tests/test_token_stats_regressions.py",
                   "tests/test_triton_token_stats.py", "tests/test_losses.py"],
            opsd=["--model", "random-qwen2.5-0.5b", "--layers", "24", "--batch", "32", "--cap-gb", "60",
                  "--completion-len", "256", "--repeats", "2"],
            grpo=["--model", "qwen2.5-0.5b", "--layers", "24", "--completion-length", "1024", "--generations", "16",
                  "--warmup", "1", "--steps", "2"])
SMOKE = dict(shapes=[(64, 32, 512), (64, 32, 384)], check=(96, 32, 700), check_rows=8, dtype="float32",
             tests=["tests/test_token_stats_regressions.py::test_entropy_never_negative_on_peaked_rows"],
             opsd=["--model", "tiny", "--batch", "2", "--completion-len", "8", "--prompt-len", "8",
                   "--teacher-prompt-len", "12", "--repeats", "1", "--cap-gb", "0"],
             grpo=["--layers", "1", "--completion-length", "8", "--generations", "2", "--warmup", "1", "--steps", "1"])

if __name__ == "__main__":  # the plan, one job a line
    for job in plan(SMOKE if "--smoke" in sys.argv else REAL, "--smoke" in sys.argv):
        print(job.get("case") or job.get("label") or job["kind"], job.get("n", ""), job.get("v", ""))
