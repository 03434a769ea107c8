"""The GPU session in one command: environment, native tests, real-scale check, sweep, masking, trainer steps.

    python -m benchmarks.gpu --out gpu-results          # on one H100/H200: ~9 minutes, JSON + markdown + PNG
    python -m benchmarks.gpu --smoke --out /tmp/smoke   # the same code path on the CPU at tiny shapes
                                                        # (torch.compile with dynamo's "eager" backend there)

Sections run in order of what a short GPU lease must not miss, each under what is left of ``--budget-s``;
a section or case that does not fit, fails, is not installed or runs out of memory is recorded as such:
1. environment: GPU, driver, versions, a measured bf16 matmul rate and device-to-device copy bandwidth;
2. the core-op and loss tests natively (Triton-marked included), fail-fast;
3. one real-scale case (N=8192, H=4096, V=151936, bf16): outputs and dH rows of a subset of rows against the
   float64 reference, dW against the torch folds;
4. the sweep, forward + backward in bf16 — ours (Triton folds) vs eager vs torch.compile vs TRL's chunked
   kernels vs Liger vs CCE — each time beside the cost model's prediction from the rates measured in (1);
5. masked rows 0 / 50 / 75 %;
6. OPSD trainer steps on a randomly initialised Qwen2.5-0.5B-shaped model, fused vs eager loss: tokens/s and
   the largest batch under a memory cap;
7. a GRPO step on the same model through TRL's GRPOTrainer: TRL's default head vs ``pydistill.integrations.trl``.
Everything lands in ``--out``: ``gpu.json`` (all records), ``gpu.md`` (tables), ``sweep.png``, ``tests.log``, and the
step benchmarks' own folders ``trainer-step/`` and ``trl-step/``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import cost_model
from benchmarks.cases import CASES, make_inputs
from benchmarks.measure import device_name, is_oom, matmul_gflops, measure_case, versions

ROOT = Path(__file__).resolve().parent.parent
REAL = dict(sweep_shapes=[(8192, 4096, 151936), (8192, 4096, 128256), (2048, 4096, 151936), (2048, 4096, 128256)],
            check=(8192, 4096, 151936), check_rows=64, mask_shape=(8192, 4096, 151936), dtype="bfloat16",
            tests=["tests/test_token_stats.py", "tests/test_token_stats_regressions.py",
                   "tests/test_triton_token_stats.py", "tests/test_losses.py"],
            trainer=["--model", "random-qwen2.5-0.5b", "--layers", "24", "--start-batch", "8", "--max-batch", "128",
                     "--cap-gb", "60", "--completion-len", "256", "--repeats", "2"],
            grpo=["--model", "qwen2.5-0.5b", "--layers", "24", "--completion-length", "1024", "--generations", "16",
                  "--rounds", "1"])
SMOKE = dict(sweep_shapes=[(64, 32, 512)], check=(96, 32, 700), check_rows=8, mask_shape=(64, 32, 512),
             dtype="float32", tests=["tests/test_token_stats_regressions.py::test_entropy_never_negative_on_peaked_rows"],
             trainer=["--model", "tiny", "--max-batch", "2", "--completion-len", "8", "--prompt-len", "8",
                      "--teacher-prompt-len", "12", "--repeats", "1", "--cap-gb", "0"],
            grpo=["--layers", "1", "--completion-length", "8", "--generations", "2", "--steps", "1", "--rounds", "1"])
# (variant of the cost model, case names by implementation); ours is Triton on CUDA, the torch folds elsewhere
SWEEP = [
    ("ce", {"ours": "ce-{ours}", "eager": "ce-eager", "trl": "ce-trl", "cce": "ce-cce"}),
    ("forward_kl", {"ours": "core-forward_kl-{ours}", "eager": "core-forward_kl-eager", "trl": "core-forward_kl-trl"}),
    ("reverse_kl", {"ours": "core-reverse_kl-{ours}", "eager": "core-reverse_kl-eager", "trl": "core-reverse_kl-trl",
                    "compile": "core-reverse_kl-compile"}),
    ("jsd", {"ours": "core-jsd-{ours}", "eager": "core-jsd-eager", "trl": "core-jsd-trl",
             "ours-loss": "distill-ours", "liger": "distill-liger"}),
    ("forward_kl-clip", {"ours": "core-forward_kl-clip-{ours}", "eager": "core-forward_kl-clip-eager"}),
    ("grpo", {"ours-loss": "grpo-ours", "eager": "grpo-eager", "liger": "grpo-liger"}),
]
MODEL_IMPL = {"ours": "ours", "eager": "eager", "trl": "trl", "liger": "liger"}


class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)


def environment(device: str, smoke: bool) -> dict:
    """Device, versions, and the two rates the cost model needs, measured here."""
    env = dict(device=device, device_name=device_name(device), date=datetime.date.today().isoformat(), **versions())
    for module in ("transformers", "trl"):  # measure.versions() has torch, triton, liger_kernel and cce
        try:
            env[module] = getattr(__import__(module), "__version__", "installed")
        except ImportError:
            env[module] = None
    if device == "cuda":
        env["driver"] = _driver()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    size = 512 if smoke else 8192
    dtype = torch.float32 if smoke else torch.bfloat16
    env["matmul_tflops"] = matmul_gflops(size, size, size, dtype, device) / 1e3
    src = torch.empty(2 ** (20 if smoke else 29), device=device, dtype=torch.float32)  # 2 GiB on the GPU
    dst = torch.empty_like(src)
    env["bandwidth_tbs"] = 2 * src.numel() * 4 / (_bench(lambda: dst.copy_(src), device) / 1e3) / 1e12
    return env


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _bench(fn, device) -> float:
    """Median milliseconds: do_bench on CUDA, a few wall-clock runs elsewhere."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[1]


def native_tests(tests, out_dir: Path, clock: Clock) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=max(30, int(min(clock.left(), 240))))
    except subprocess.TimeoutExpired as exc:
        (out_dir / "tests.log").write_text(str(exc.stdout or ""))
        return dict(status="timeout", command=" ".join(cmd[2:]))
    (out_dir / "tests.log").write_text(done.stdout + done.stderr)
    summary = [line for line in done.stdout.splitlines() if " passed" in line or " failed" in line]
    return dict(status="ok" if done.returncode == 0 else f"failed (exit {done.returncode})",
                summary=summary[-1] if summary else done.stdout[-300:], command="pytest " + " ".join(cmd[6:]))


def real_scale_check(shape, rows: int, device: str, dtype) -> dict:
    """Outputs and dH rows of ``rows`` rows vs float64; dW vs the torch folds (both over all rows)."""
    from pydistill import token_stats

    n, h, v = shape
    x = make_inputs(n, h, v, dtype, device)  # the sweep's inputs (teacher context = student + noise)
    hidden, weight, teacher, targets = x.hidden, x.weight, x.teacher, x.targets
    opts = dict(targets=targets, teacher_hidden=teacher, divergence="forward_kl", clip=0.05)
    fused = "triton" if device == "cuda" else "torch"
    results = {}
    for impl in (fused, "torch"):
        out = token_stats(hidden, weight, impl=impl, **opts)
        (out.logp.sum() + out.entropy.sum() + out.divergence.sum()).backward()
        results[impl] = ([o.detach().double() for o in out], hidden.grad.double(), weight.grad.double())
        hidden.grad.zero_()
        weight.grad.zero_()
    pick = torch.linspace(0, n - 1, rows, device=device).long()
    h64 = hidden.detach()[pick].double().requires_grad_()
    ref = token_stats(h64, weight.detach().double(), targets=targets[pick], teacher_hidden=teacher[pick].double(),
                      divergence="forward_kl", clip=0.05, impl="reference")
    (ref.logp.sum() + ref.entropy.sum() + ref.divergence.sum()).backward()
    outs, d_hidden, d_weight = results[fused]
    rel = lambda a, b: ((a - b).norm() / (b.norm() + 1e-30)).item()  # noqa: E731
    record = dict(shape=list(shape), rows_checked=rows, impl=fused,
                  **{f"{name}_rel_err": rel(o[pick], r.detach()) for name, o, r in zip(("logp", "entropy", "divergence"), outs, ref)},
                  d_hidden_rel_err=rel(d_hidden[pick], h64.grad), d_weight_rel_err_vs_torch=rel(d_weight, results["torch"][2]))
    tolerance = 2e-2 if dtype != torch.float32 else 1e-4
    record["status"] = "ok" if all(v <= tolerance for k, v in record.items() if k.endswith("_err")) else \
        f"failed: an error above {tolerance}"
    return record


def sweep(shapes, dtype_name, device, env, clock: Clock, masks_shape, reserve_s: float,
          compile_backend: str = "inductor") -> list:
    """Every SWEEP case at every shape, then the masked cases; each record carries the model's prediction."""
    ours = "triton" if device == "cuda" else "torch"
    jobs = [(shape, variant, impl, name.format(ours=ours)) for shape in shapes for variant, cases in SWEEP
            for impl, name in cases.items() if not (impl == "compile" and shape != shapes[0])]
    jobs += [(masks_shape, "mask", f"{p}%", f"mask{p}-{ours}") for p in (0, 50, 75)]
    jobs += [(masks_shape, "mask", "trl 50%", "mask50-trl"), (masks_shape, "mask", "eager", "mask0-eager")]
    records = []
    for shape, variant, impl, name in jobs:
        n, h, v = shape
        record = dict(case=name, variant=variant, impl=impl, n=n, h=h, v=v, dtype=dtype_name)
        case = CASES[name]
        reason = case.unavailable(device)
        if reason:
            record["status"] = reason
        elif clock.left() < reserve_s:
            record["status"] = "not run: time budget"
        else:
            try:
                record.update(measure_case(case, n, h, v, getattr(torch, dtype_name), device, repeats=3,
                                           input_sets=1, compile_backend=compile_backend))
            except Exception as exc:  # noqa: BLE001 - every failure becomes a record
                record["status"] = "OOM" if is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            if device == "cuda":
                torch.cuda.empty_cache()
        model_impl = MODEL_IMPL.get(impl)
        if model_impl and variant in cost_model.VARIANTS:
            predicted = next(r for r in cost_model.predict(n, h, v, variant, env["matmul_tflops"], env["bandwidth_tbs"])
                             if r["impl"] == model_impl)
            record["predicted_ms"] = predicted.get("ms")
        if record.get("status") == "ok":
            record["matmul_pct"] = 100 * record["gflops"] / (env["matmul_tflops"] * 1e3)
        records.append(record)
        print(json.dumps({k: record.get(k) for k in ("case", "n", "v", "status", "ms", "predicted_ms", "extra_mb")}),
              flush=True)
    return records


def trainer_steps(args_list, out_dir: Path, device: str, clock: Clock, module: str = "trainer_step",
                  reserve_s: float = 0.0) -> dict:
    """One of the step benchmarks in a subprocess under what is left of the budget (less ``reserve_s`` kept for
    what follows); its results.json's records."""
    folder = out_dir / module.replace("_", "-")
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--device", device, "--out", str(folder), *args_list]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if clock.left() - reserve_s < 30:
        return dict(status="not run: time budget")
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=max(30, int(clock.left() - reserve_s - 10)))
    except subprocess.TimeoutExpired:
        return dict(status="timeout: ran out of the time budget", command=" ".join(cmd[2:]))
    path = folder / "results.json"
    if done.returncode != 0 or not path.exists():
        return dict(status=f"failed (exit {done.returncode}): {done.stderr[-300:]}", command=" ".join(cmd[2:]))
    data = json.loads(path.read_text())
    return dict(status="ok", command=" ".join(cmd[2:]), stops=data.get("stops", {}), records=data["records"])


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# GPU session — {env['device_name']}, {env['date']}", "",
             f"torch {env['torch']}, triton {env.get('triton')}, transformers {env.get('transformers')}, "
             f"trl {env.get('trl')}, liger-kernel {env.get('liger_kernel')}, cut-cross-entropy "
             f"{env.get('cce')}; driver {env.get('driver', '-')}.",
             f"Measured: matmul {env['matmul_tflops']:.1f} TFLOP/s, copy bandwidth {env['bandwidth_tbs']:.2f} TB/s.",
             f"Command: `{result['command']}` ({result['wall_s']:.0f} s).", "",
             f"Tests: {result['tests'].get('status')} — {result['tests'].get('summary', '')}", "",
             "Real-scale check: " + json.dumps(result["check"]), "",
             "| case | N | H | V | impl | time (ms) | predicted (ms) | extra memory (MB) | % of matmul rate | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["sweep"]:
        ms = f"{r['ms']:.2f}" if r.get("ms") is not None else ""
        pred = f"{r['predicted_ms']:.2f}" if r.get("predicted_ms") is not None else ""
        extra = f"{r['extra_mb']:.0f}" if r.get("extra_mb") is not None else ""
        pct = f"{r['matmul_pct']:.0f}%" if r.get("matmul_pct") is not None else ""
        lines.append(f"| {r['case']} | {r['n']} | {r['h']} | {r['v']} | {r['impl']} | {ms} | {pred} | {extra} | "
                     f"{pct} | {r.get('status')} |")
    steps = result["trainer"]
    lines += ["", f"Trainer steps: {steps.get('status')} {json.dumps(steps.get('stops', {}))}"]
    for r in steps.get("records", []):
        lines.append(f"- {r['loss']} batch {r['batch']}: {r.get('status')}"
                     + (f", {r['tokens_per_s']:.0f} tokens/s, peak {r['peak_mb']:.0f} MB" if r.get("status") == "ok" else ""))
    grpo = result["grpo"]
    lines += ["", f"GRPO step through TRL's GRPOTrainer: {grpo.get('status')}"]
    for r in grpo.get("records", []):
        lines.append(f"- {r['variant']}: {r.get('status')}" + (
            f", {r['tokens']} tokens, step {r['step_s']:.2f} s, peak {r['peak_mb']:.0f} MB (+{r['extra_mb']:.0f} MB)"
            if r.get("status") == "ok" else ""))
    return "\n".join(lines) + "\n"


def plot(records, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(10, 4 + 0.18 * len(ok)))
    labels = [f"{r['case']} N={r['n']} V={r['v']}" for r in ok]
    ax.barh(range(len(ok)), [r["ms"] for r in ok], color="tab:blue", label="measured")
    ax.scatter([r.get("predicted_ms") or 0 for r in ok], range(len(ok)), color="tab:red", marker="|", s=200,
               label="cost model")
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.set_xlabel("ms (forward + backward)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu.json, gpu.md, sweep.png, tests.log")
    p.add_argument("--smoke", action="store_true", help="the same sections on the CPU at tiny shapes")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new work after this many seconds")
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("python -m benchmarks.gpu needs a CUDA device (use --smoke on the CPU)")
    settings = SMOKE if args.smoke else REAL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget_s)
    result = dict(command="python -m benchmarks.gpu " + " ".join(argv), environment=environment(device, args.smoke))
    result["tests"] = dict(status="skipped (--skip-tests)") if args.skip_tests else native_tests(settings["tests"], out, clock)
    if result["tests"]["status"].startswith("failed"):
        print("native tests failed: see tests.log; benchmarks still run", flush=True)
    dtype = getattr(torch, settings["dtype"])
    try:
        result["check"] = real_scale_check(settings["check"], settings["check_rows"], device, dtype)
    except Exception as exc:  # noqa: BLE001
        result["check"] = dict(status="OOM" if is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:200]}")
    if device == "cuda":
        torch.cuda.empty_cache()
    result["sweep"] = sweep(settings["sweep_shapes"], settings["dtype"], device, result["environment"], clock,
                            settings["mask_shape"], reserve_s=0.0 if args.smoke else 180.0,
                            compile_backend="eager" if args.smoke else "inductor")
    result["trainer"] = trainer_steps(settings["trainer"], out, device, clock, reserve_s=0.0 if args.smoke else 70.0)
    result["grpo"] = trainer_steps(settings["grpo"], out, device, clock, module="trl_step")
    result["wall_s"] = time.perf_counter() - clock.start
    (out / "gpu.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu.md").write_text(markdown(result))
    plot(result["sweep"], out / "sweep.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
