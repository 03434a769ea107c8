"""`python -m benchmarks.gpu --smoke`: the GPU session's code path on the CPU at tiny shapes, so the command a
short GPU lease depends on cannot rot before a GPU appears."""
import json
import os
import subprocess
import sys

from benchmarks.gpu import SWEEP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_session_smoke_writes_every_section(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "gpu.json").read_text())
    env_record = result["environment"]
    assert env_record["matmul_tflops"] > 0 and env_record["bandwidth_tbs"] > 0
    assert result["tests"]["status"] == "ok" and "passed" in result["tests"]["summary"]
    assert result["check"]["status"] == "ok", result["check"]
    names = {r["case"] for r in result["sweep"]}
    assert {name.format(ours="torch") for _, cases in SWEEP for name in cases.values()} <= names
    assert {"mask0-torch", "mask50-torch", "mask75-torch", "mask50-trl", "mask0-eager"} <= names
    for r in result["sweep"]:  # every case is a record: measured, or why not
        assert r["status"] == "ok" or r["status"].startswith(("not run", "OOM", "failed")), r
    ours = next(r for r in result["sweep"] if r["case"] == "core-reverse_kl-torch")
    assert ours["status"] == "ok" and ours["predicted_ms"] > 0 and ours["ms"] > 0
    assert result["trainer"]["status"] == "ok" and {r["loss"] for r in result["trainer"]["records"]} == {"fused", "eager"}
    text = (out / "gpu.md").read_text()
    assert "| core-reverse_kl-torch | 64 | 32 | 512 | ours |" in text and "Trainer steps: ok" in text
    assert (out / "sweep.png").stat().st_size > 1000 and (out / "tests.log").exists()
