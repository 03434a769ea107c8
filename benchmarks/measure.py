"""Run one case in this (fresh) process and print one JSON record: median time and extra peak memory.

CUDA: ``triton.testing.do_bench`` median (it warms up, then repeats for ``rep`` ms) on each of several input
sets, the median over sets reported; extra memory = ``torch.cuda.max_memory_allocated`` during one step
minus the memory allocated by the inputs and their gradients (measured apart from do_bench, whose cache
flush buffer would otherwise count).
CPU: wall-clock median over ``repeats`` steps after one warm-up step; extra memory = peak RSS of the timed
steps (the kernel's peak mark is reset after the warm-up) minus the RSS once inputs, gradients and the
warm-up's one-time buffers exist. On the CPU the sweep measures the two apart: time in a process with the
default allocator, memory (``--memory-only``) in a second process with ``MALLOC_MMAP_THRESHOLD_`` set so that
glibc hands freed blocks back at once and RSS follows the live tensors (that setting makes every large
temporary a fresh mmap, which would slow down, and so misreport, the code that allocates many of them). ``--cap-gb`` sets RLIMIT_AS so that a baseline
too large for the machine fails here, cleanly, and is recorded as OOM.

Achieved GFLOP/s use the case's FLOP count (12 N H V for two contexts, 6 N H V for one, over unmasked rows)
and sit next to a plain [N, H] x [H, V'] matmul's rate measured in this same process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import sys
import time

import torch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def peak_rss_mb() -> float:
    """Peak RSS since the process started or since the last :func:`reset_peak_rss`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return (platform.processor() or "cpu") + f" ({torch.get_num_threads()} threads)"


def versions() -> dict:
    out = dict(torch=torch.__version__)
    for module, key in (("triton", "triton"), ("liger_kernel", "liger_kernel"), ("cut_cross_entropy", "cce")):
        try:
            mod = __import__(module)
            out[key] = getattr(mod, "__version__", "installed")
        except ImportError:
            out[key] = None
    return out


def save_run(result: dict, module: str, argv, started: float, out=None) -> dict:
    """Stamp ``result`` with its wall time and the command that made it (``python -m <module> ...``) and write it
    to ``out`` as JSON when given; returns ``result``."""
    result.update(seconds=round(time.time() - started, 1),
                  command=f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:]))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "cannot allocate memory" in text)


def set_memory_cap(cap_gb) -> None:
    """Cap this process's address space (CPU) so that allocations past it fail with an OOM error."""
    if cap_gb:
        limit = int(cap_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(n, width, vocab, dtype, device, repeats=3) -> float:
    """A plain [N, H] x [H, min(V, 16384)] matmul in the case's dtype: the machine's reference rate."""
    cols = min(vocab, 16384)
    a = torch.randn(n, width, device=device).to(dtype)
    b = torch.randn(width, cols, device=device).to(dtype)
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    else:
        a @ b
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1e3
    return 2 * n * width * cols / (ms / 1e3) / 1e9


def measure_case(case, n, h, v, dtype, device, repeats=3, input_sets=1, compile_backend="inductor",
                 memory_only=False) -> dict:
    """Time and extra memory of one case (status "ok"); raises what the case raises (OOM included).
    ``memory_only`` (CPU): one step after the warm-up, extra memory only."""
    from benchmarks.cases import make_inputs

    times, extras, first_ms = [], [], None
    for seed in range(input_sets):
        inputs = make_inputs(n, h, v, dtype, device, seed=seed)
        step = case.build(inputs, compile_backend)
        _sync(device)
        if device == "cuda":
            import triton.testing

            t = time.perf_counter()
            step()  # warm-up (compiles, autotunes)
            _sync(device)
            first_ms = first_ms if first_ms is not None else (time.perf_counter() - t) * 1e3
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            _sync(device)
            extras.append((torch.cuda.max_memory_allocated() - base) / 2 ** 20)
            times.append(triton.testing.do_bench(step, warmup=25, rep=max(100, 20 * repeats), return_mode="median"))
        else:
            base = rss_mb()
            t = time.perf_counter()
            step()  # warm-up: compiles, loads kernels, sizes the thread pools' buffers
            first_ms = first_ms if first_ms is not None else (time.perf_counter() - t) * 1e3
            if reset_peak_rss():  # measure the peak of the timed steps above what is resident after warm-up
                base = rss_mb()
            if memory_only:
                step()
                extras.append(peak_rss_mb() - base)
                del step, inputs
                continue
            for _ in range(repeats):
                t = time.perf_counter()
                step()
                times.append((time.perf_counter() - t) * 1e3)
            extras.append(peak_rss_mb() - base)
        del step, inputs
        if device == "cuda":
            torch.cuda.empty_cache()
    if memory_only:
        return dict(status="ok", extra_mb=max(extras))
    ms = statistics.median(times)
    flops = case.flops(n, h, v)
    return dict(status="ok", ms=ms, ms_min=min(times), ms_max=max(times), first_ms=first_ms,
                extra_mb=max(extras), flops=flops, gflops=flops / (ms / 1e3) / 1e9,
                matmul_gflops=matmul_gflops(n, h, v, dtype, device))


def base_record(case, n, h, v, dtype_name, device) -> dict:
    return dict(case=case.name, family=case.family, impl=case.impl, backend=case.backend(device),
                baseline=case.baseline, rival=case.rival, note=case.note, n=n, h=h, v=v, dtype=dtype_name,
                device=device, device_name=device_name(device), flops=case.flops(n, h, v),
                time=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **versions())


def main(argv=None):
    from benchmarks.cases import CASES

    p = argparse.ArgumentParser(prog="python -m benchmarks.measure")
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--h", type=int, required=True)
    p.add_argument("--v", type=int, required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="CPU: timed steps after one warm-up")
    p.add_argument("--input-sets", type=int, default=1, help="independent input sets (median over them)")
    p.add_argument("--cap-gb", type=float, default=None, help="CPU: RLIMIT_AS cap of this process, in GiB")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--memory-only", action="store_true", help="CPU: extra memory of one step, no timing")
    args = p.parse_args(argv)
    case = CASES[args.case]
    record = base_record(case, args.n, args.h, args.v, args.dtype, args.device)
    record["cap_gb"] = args.cap_gb
    reason = case.unavailable(args.device)
    if reason:
        record["status"] = reason
    else:
        if args.device != "cuda":
            set_memory_cap(args.cap_gb)
        try:
            record.update(measure_case(case, args.n, args.h, args.v, getattr(torch, args.dtype), args.device,
                                       repeats=args.repeats, input_sets=args.input_sets,
                                       compile_backend=args.compile_backend,
                                       memory_only=args.memory_only and args.device != "cuda"))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a record, never a dropped case
            record["status"] = "OOM" if is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
