"""The GPU session's worker: runs the in-process jobs of :mod:`benchmarks.gpu_plan`, one JSON line in, one out.

    python -m benchmarks.gpu_worker --device cuda      # started and fed by python -m benchmarks.gpu

Reads a job per line on stdin and answers ``RECORD <json>`` on its own protocol channel (the original stdout);
everything libraries print goes to stderr, so it cannot be mistaken for a record. Exits at the end of stdin.
The session runs the jobs here, in one process, so that CUDA starts once; a job that kills the process (a
sticky CUDA error, a segfault) or hangs costs only that job: the session records why and starts a new worker.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback

import torch

from benchmarks.gpu_plan import GPU_CASES, predict
from benchmarks.measure import device_name, is_oom, matmul_gflops, measure_case, versions


def _bench_ms(fn, device) -> float:
    """Median milliseconds: do_bench on CUDA, the middle of three wall-clock runs elsewhere."""
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


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def probe(statements: dict) -> dict:
    """Each baseline's imports, tried here: "ok", or why it fails (a baseline that does not import is skipped)."""
    out = {}
    for name, code in statements.items():
        try:
            exec(compile(code, f"<probe {name}>", "exec"), {})  # noqa: S102 - fixed import statements of the plan
            out[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - an ImportError, or any error a package raises while importing
            missing = isinstance(exc, ModuleNotFoundError) and exc.name and "." not in exc.name
            out[name] = ("not installed: " if missing else "does not import: ") + f"{type(exc).__name__}: {exc}"[:300]
    return out


def environment(job: dict, device: str, smoke: bool) -> dict:
    """Device, versions, and the two rates the cost model needs, measured here; then the baselines' imports."""
    env = dict(device=device, device_name=device_name(device), date=datetime.date.today().isoformat(), **versions(),
               python=sys.version.split()[0])
    if device == "cuda":
        env["driver"] = _driver()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    size = 512 if smoke else 8192
    env["matmul_tflops"] = matmul_gflops(size, size, size, torch.float32 if smoke else torch.bfloat16, device) / 1e3
    src = torch.empty(2 ** (20 if smoke else 29), device=device, dtype=torch.float32)  # 2 GiB on the GPU
    dst = torch.empty_like(src)
    env["bandwidth_tbs"] = 2 * src.numel() * 4 / (_bench_ms(lambda: dst.copy_(src), device) / 1e3) / 1e12
    del src, dst
    env["imports"] = probe(job.get("probes", {}))
    for module in ("transformers", "trl", "datasets", "accelerate"):
        mod = sys.modules.get(module)
        env[module] = getattr(mod, "__version__", None) if mod else None
    return dict(status="ok", environment=env)


def run_case(job: dict, device: str, compile_backend: str) -> dict:
    case = GPU_CASES[job["case"]]
    out = dict(note=case.note, backend=case.backend(device), **predict(job, job.get("rates")))
    reason = case.unavailable(device)
    if reason:
        return dict(out, status=reason)
    try:
        out.update(measure_case(case, job["n"], job["h"], job["v"], getattr(torch, job["dtype"]), device,
                                repeats=3, input_sets=1, compile_backend=compile_backend))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a record
        out["status"] = "OOM" if is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    if out.get("status") == "ok" and job.get("rates"):
        out["matmul_pct"] = 100 * out["gflops"] / (job["rates"]["matmul_tflops"] * 1e3)
    return out


def real_scale_check(job: dict, device: str) -> dict:
    """Outputs and dH rows of ``rows`` rows vs float64; dW vs the torch folds (both over all rows)."""
    from benchmarks.cases import make_inputs
    from pydistill import token_stats

    n, h, v = job["shape"]
    rows, dtype = job["rows"], getattr(torch, job["dtype"])
    x = make_inputs(n, h, v, dtype, device)  # the sweep's inputs (teacher context = student + noise)
    opts = dict(targets=x.targets, teacher_hidden=x.teacher, divergence="forward_kl", clip=0.05)
    fused = "triton" if device == "cuda" else "torch"
    results = {}
    for impl in (fused, "torch"):
        out = token_stats(x.hidden, x.weight, impl=impl, **opts)
        (out.logp.sum() + out.entropy.sum() + out.divergence.sum()).backward()
        results[impl] = ([o.detach().double() for o in out], x.hidden.grad.double(), x.weight.grad.double())
        x.hidden.grad.zero_()
        x.weight.grad.zero_()
    pick = torch.linspace(0, n - 1, rows, device=device).long()
    h64 = x.hidden.detach()[pick].double().requires_grad_()
    ref = token_stats(h64, x.weight.detach().double(), targets=x.targets[pick], teacher_hidden=x.teacher[pick].double(),
                      divergence="forward_kl", clip=0.05, impl="eager")
    (ref.logp.sum() + ref.entropy.sum() + ref.divergence.sum()).backward()
    outs, d_hidden, d_weight = results[fused]
    rel = lambda a, b: ((a - b).norm() / (b.norm() + 1e-30)).item()  # noqa: E731
    record = dict(impl=fused, **{f"{name}_rel_err": rel(o[pick], r.detach())
                                 for name, o, r in zip(("logp", "entropy", "divergence"), outs, ref)},
                  d_hidden_rel_err=rel(d_hidden[pick], h64.grad),
                  d_weight_vs_torch_rel_err=rel(d_weight, results["torch"][2]))
    tolerance = 2e-2 if dtype != torch.float32 else 1e-4
    errors = [k for k, e in record.items() if k.endswith("_err") and not e <= tolerance]
    record["status"] = "ok" if not errors else f"failed: {', '.join(errors)} above {tolerance}"
    return record


def run(job: dict, device: str, smoke: bool, compile_backend: str) -> dict:
    try:
        if job["kind"] == "env":
            return environment(job, device, smoke)
        if job["kind"] == "case":
            return run_case(job, device, compile_backend)
        if job["kind"] == "check":
            return real_scale_check(job, device)
        return dict(status=f"failed: the worker runs no {job['kind']!r} job")
    except Exception as exc:  # noqa: BLE001 - one job's failure is its record, the worker goes on
        traceback.print_exc()
        return dict(status="OOM" if is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_worker", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--smoke", action="store_true", help="tiny environment measurements (the CPU rehearsal)")
    p.add_argument("--compile-backend", default="inductor")
    args = p.parse_args(argv)
    channel = os.fdopen(os.dup(1), "w")  # records only; whatever else is printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        started = time.perf_counter()
        record = run(job, args.device, args.smoke, args.compile_backend)
        record["job_s"] = round(time.perf_counter() - started, 2)
        channel.write("RECORD " + json.dumps(record, default=str) + "\n")
        channel.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
