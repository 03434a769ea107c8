"""Compile every Triton kernel the library can launch for NVIDIA GPUs, without one, and read ptxas's report.

``python -m pydistill.kernels.compile_check [--arch 80 90] [--json FILE]`` builds PTX with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for each configuration in
:func:`pydistill.kernels.folds.launch_configurations`, assembles it with ``ptxas -v`` (sm_80, sm_90a) and prints
registers and spill bytes per kernel; it exits 1 when any kernel spills. It must run without
``TRITON_INTERPRET=1`` (the interpreter replaces kernels by Python functions); it removes that variable and
re-executes itself when it is set.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = {80: "sm_80", 90: "sm_90a"}


def find_ptxas(ptx: str, gpu: str):
    """The first ptxas (the wheel's, its newer sibling, then PATH's) that accepts this PTX, or None."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    candidates = [bin_dir / "ptxas", bin_dir / "ptxas-blackwell"]
    on_path = [Path(p) / "ptxas" for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    for exe in [c for c in candidates + on_path if c.is_file()]:
        report = _assemble(exe, ptx, gpu)
        if report is not None:
            return exe
    return None


def _assemble(exe: Path, ptx: str, gpu: str):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([str(exe), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    return done.stderr + done.stdout if done.returncode == 0 else None


def _parse(report: str):
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return dict(registers=int(registers.group(1)) if registers else None,
                spill_stores=int(spills.group(1)) if spills else 0, spill_loads=int(spills.group(2)) if spills else 0)


def compile_all(archs=(80, 90)):
    """One record per (kernel, configuration, arch): registers and spill bytes, or why it could not be read."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import folds

    records, ptxas = [], {}
    for kernel, signature, constexprs in folds.launch_configurations():
        sig = dict(signature)
        sig.update({name: "constexpr" for name in constexprs})
        for arch in archs:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32), options=dict(num_warps=folds.NUM_WARPS))
            ptx, gpu = compiled.asm["ptx"], ARCHS[arch]
            if gpu not in ptxas:
                ptxas[gpu] = find_ptxas(ptx, gpu)
            record = dict(kernel=kernel.__name__, config={k: v for k, v in constexprs.items()},
                          out=signature.get("out_ptr", ""), arch=gpu, num_warps=folds.NUM_WARPS)
            report = _assemble(ptxas[gpu], ptx, gpu) if ptxas[gpu] else None
            if report is None:
                record["error"] = "no ptxas accepted the PTX"
            else:
                record.update(_parse(report), ptxas=ptxas[gpu].name)
            records.append(record)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCHS))
    parser.add_argument("--json", help="write the records to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "pydistill.kernels.compile_check", *(argv or sys.argv[1:])],
                               env=env)
    records = compile_all(tuple(args.arch))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    bad = 0
    for r in records:
        config = " ".join(f"{k}={v}" for k, v in r["config"].items() if k != "BLOCK")
        config += f" out={r['out']}" if r["out"] else ""
        if "error" in r:
            print(f"{r['arch']:7} {r['kernel']:26} {config:45} {r['error']}")
            continue
        bad += r["spill_stores"] > 0 or r["spill_loads"] > 0
        print(f"{r['arch']:7} {r['kernel']:26} {config:45} {r['registers']:4} registers  "
              f"{r['spill_stores']} B spill stores  {r['spill_loads']} B spill loads")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
