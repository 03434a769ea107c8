"""Sweep: each (case, shape, dtype) in a fresh process; writes results.json, results.md and results.png."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.cases import CASES, SHAPES
from benchmarks.report import markdown_table, plot

DEFAULT_CASES = ["core-eager", "core-chunked", "core-chunked-jsd-clip", "core-triton", "mask0-chunked",
                 "mask25-chunked", "mask50-chunked", "mask75-chunked"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument("--shapes", nargs="+", default=["smollm2"], choices=sorted(SHAPES))
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=sorted(CASES))
    p.add_argument("--dtypes", nargs="+", default=["float32"])
    p.add_argument("--n", type=int, help="override N of every shape")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    records = []
    for shape in args.shapes:
        n, h, v = SHAPES[shape]
        n = args.n or n
        for dtype in args.dtypes:
            for case in args.cases:
                cmd = [sys.executable, "-m", "benchmarks.measure", case, "--n", str(n), "--h", str(h), "--v", str(v),
                       "--dtype", dtype, "--repeats", str(args.repeats)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                if done.returncode != 0 or not lines:
                    status = "OOM" if done.returncode in (-9, 137) else f"failed: {done.stderr.strip()[-200:]}"
                    record = dict(case=case, n=n, h=h, v=v, dtype=dtype, status=status)
                else:
                    record = json.loads(lines[-1])
                records.append(record)
                print(json.dumps(record), flush=True)
    date = time.strftime("%Y-%m-%d")
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(date=date, command=command, records=records), f, indent=2)
    table = markdown_table(records, date, command)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    plot(records, os.path.join(args.out, "results.png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
