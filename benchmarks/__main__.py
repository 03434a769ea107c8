"""Sweep: each (case, shape, N, dtype) in a fresh process; writes results.json, results.md and results.png.

    python -m benchmarks                       # CPU: SmolLM2 shape (576 x 49152) at N=512, float32
    python -m benchmarks --quick               # a minute-scale check of every family at N=256
    python -m benchmarks --shapes smollm2 llama3-8b qwen --n 2048 8192 --dtypes bfloat16 float32   # CUDA

A case that cannot run here (Triton without CUDA, Liger or CCE not installed) is recorded with status
"not run: <reason>"; one that runs out of memory (or past ``--cap-gb`` on the CPU) is recorded as "OOM".
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks.cases import CASES, CPU_DEFAULT, CPU_N, CUDA_DEFAULT, QUICK, QUICK_N, SHAPES, select
from benchmarks.measure import base_record, device_name, versions
from benchmarks.report import write_outputs


def default_cap_gb() -> float:
    """80% of the machine's memory: a CPU baseline past it fails as OOM instead of swapping or being killed."""
    try:
        with open("/proc/meminfo") as f:
            total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        return round(0.8 * total_kb / 2 ** 20, 1)
    except (OSError, StopIteration):
        return 0.0


def child_env(memory: bool = True) -> dict:
    """The environment of a case process. ``memory``: freed blocks of 128 KiB or more go back to the OS at once,
    so the process's RSS follows its live tensors. CPU timing runs leave it out: it turns every large temporary
    into a fresh mmap, which slows down (and so misreports) code that allocates many of them."""
    env = dict(os.environ)
    if memory:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("TRITON_INTERPRET", None)  # benchmarks time real kernels, never the interpreter
    return env


def run_case(case_name, n, h, v, dtype, device, args) -> dict:
    case = CASES[case_name]
    reason = case.unavailable(device)
    if reason:  # recorded without starting a process
        return dict(base_record(case, n, h, v, dtype, device), status=reason, cap_gb=args.cap_gb)
    cmd = [sys.executable, "-m", "benchmarks.measure", case_name, "--n", str(n), "--h", str(h), "--v", str(v),
           "--dtype", dtype, "--device", device, "--repeats", str(args.repeats),
           "--input-sets", str(args.input_sets)]
    if args.cap_gb and device != "cuda":
        cmd += ["--cap-gb", str(args.cap_gb)]
    record = _run_child(cmd, case, n, h, v, dtype, device, args, memory=device == "cuda")
    if device != "cuda" and record.get("status") == "ok":  # CPU: memory from a second, fresh process
        memory = _run_child(cmd + ["--memory-only"], case, n, h, v, dtype, device, args, memory=True)
        record["extra_mb"] = memory["extra_mb"] if memory.get("status") == "ok" else float("nan")
        record["memory_status"] = memory.get("status")
    return record


def _run_child(cmd, case, n, h, v, dtype, device, args, memory: bool) -> dict:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=child_env(memory))
    except subprocess.TimeoutExpired:
        return dict(base_record(case, n, h, v, dtype, device), status=f"timeout after {args.timeout} s",
                    cap_gb=args.cap_gb)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    # killed by the kernel's OOM killer (SIGKILL) or an abort inside an allocator: out of memory
    oom = done.returncode in (-9, 137) or "out of memory" in done.stderr.lower() \
        or "can't allocate memory" in done.stderr.lower()
    status = "OOM" if oom else f"failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"
    return dict(base_record(case, n, h, v, dtype, device), status=status, cap_gb=args.cap_gb)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["smollm2"], choices=sorted(SHAPES),
                   help="(H, V) pairs of real models; N comes from --n or the shape's default")
    p.add_argument("--n", type=int, nargs="+", help="token counts N (default: the shape's, smaller on the CPU)")
    p.add_argument("--cases", nargs="+", help="case names, families (core ce distill grpo mask) or 'all' "
                                              "(default: a device-dependent list)")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on the CPU, bfloat16 and float32 on CUDA")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, help="CPU: timed steps per case after a warm-up (default 2)")
    p.add_argument("--input-sets", type=int, help="input sets per case (default: 3 on CUDA, 1 on the CPU)")
    p.add_argument("--cap-gb", type=float, help="CPU: address-space cap of each case process "
                                                "(default: 80%% of the machine's memory; 0: none)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per case before it is recorded as timeout")
    p.add_argument("--quick", action="store_true", help=f"a short check: N={QUICK_N}, one repeat, a few cases")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if args.cases is None:
        args.cases = QUICK if args.quick else (CUDA_DEFAULT if cuda else CPU_DEFAULT)
    args.cases = select(args.cases)
    args.dtypes = args.dtypes or (["bfloat16", "float32"] if cuda else ["float32"])
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.input_sets = args.input_sets or (3 if cuda and not args.quick else 1)
    if args.cap_gb is None:
        args.cap_gb = None if cuda else default_cap_gb()
    args.cap_gb = args.cap_gb or None
    return args


def shape_ns(shape, args):
    if args.n:
        return args.n
    if args.quick:
        return [QUICK_N]
    return [SHAPES[shape][0] if args.device == "cuda" else CPU_N[shape]]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        for name, case in CASES.items():
            print(f"{name:32s} {case.family:8s} {case.impl:8s} contexts={case.contexts} {case.note}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    records = []
    for shape in args.shapes:
        _, h, v = SHAPES[shape]
        for n in shape_ns(shape, args):
            for dtype in args.dtypes:
                for case in args.cases:
                    record = run_case(case, n, h, v, dtype, args.device, args)
                    record["shape"] = shape
                    records.append(record)
                    shown = {k: record.get(k) for k in ("case", "shape", "n", "dtype", "status", "ms", "extra_mb")}
                    print(json.dumps(shown), flush=True)
    results = dict(kind="ops", date=datetime.date.today().isoformat(), command="python -m benchmarks " + " ".join(argv),
                   device=args.device, device_name=device_name(args.device), cap_gb=args.cap_gb,
                   repeats=args.repeats, input_sets=args.input_sets,
                   wall_s=round(time.perf_counter() - started, 1), **versions(), records=records)
    paths = write_outputs(results, args.out)
    print(open(paths["md"]).read())
    print(f"wrote {', '.join(paths.values())} in {results['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
