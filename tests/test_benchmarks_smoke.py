"""The benchmark sweep runs end to end on a tiny shape and writes its JSON, table and plot."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_sweep_smoke(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--shapes", "cpu-small", "--n", "64", "--repeats", "1",
                           "--cases", "core-eager", "core-chunked", "mask50-chunked", "core-triton", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    status = {r["case"]: r["status"] for r in data["records"]}
    assert status["core-eager"] == status["core-chunked"] == status["mask50-chunked"] == "ok"
    assert status["core-triton"] in ("ok", "not run: needs CUDA")
    ok = [r for r in data["records"] if r["status"] == "ok"]
    assert all(r["ms"] > 0 and r["gflops"] > 0 for r in ok)
    table = (out / "results.md").read_text()
    assert "| core-chunked | 64 | 576 | 8192 |" in table and "torch" in table
    assert (out / "results.png").stat().st_size > 1000
