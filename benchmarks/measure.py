"""Run one case in this process and print a JSON record: median time and extra peak memory.

CPU: wall-clock median over repeats; memory = peak RSS (ru_maxrss) of this fresh process minus the RSS after
inputs and gradients exist, i.e. what the op itself needed at its peak. CUDA: triton.testing.do_bench median and
torch.cuda.max_memory_allocated above the inputs and gradients.
"""
from __future__ import annotations

import argparse
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


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def matmul_gflops(n, width, vocab, dtype, device, repeats=3) -> float:
    a = torch.randn(n, width, device=device, dtype=dtype)
    b = torch.randn(width, min(vocab, 16384), device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n * width * b.shape[1] / statistics.median(times) / 1e9


def main(argv=None):
    from benchmarks.cases import CASES, make_inputs

    p = argparse.ArgumentParser()
    p.add_argument("case")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--h", type=int, required=True)
    p.add_argument("--v", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    record = dict(case=args.case, n=args.n, h=args.h, v=args.v, dtype=args.dtype, device=device_name(args.device),
                  torch=torch.__version__)
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        record["triton"] = None
    if args.case.endswith("-triton") and args.device != "cuda":
        record.update(status="not run: needs CUDA")
        print(json.dumps(record))
        return 0
    try:
        inputs = make_inputs(args.n, args.h, args.v, dtype, args.device)
        step = CASES[args.case](*inputs)
        if args.device == "cuda":
            import triton.testing

            step()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ms = triton.testing.do_bench(step, warmup=3, rep=max(20, args.repeats))
            extra = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        else:
            base = rss_mb()
            step()  # warm-up, also sets the peak
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            ms = statistics.median(times) * 1e3
            extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        flops = 12 * args.n * args.h * args.v  # two contexts, forward + backward
        record.update(status="ok", ms=ms, extra_mb=extra, gflops=flops / (ms / 1e3) / 1e9,
                      matmul_gflops=matmul_gflops(args.n, args.h, args.v, dtype, args.device))
    except torch.OutOfMemoryError:
        record.update(status="OOM")
    except MemoryError:
        record.update(status="OOM")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
