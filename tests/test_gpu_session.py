"""`python -m benchmarks.gpu --smoke`: the GPU session's code path on the CPU at tiny shapes, so the command a
short GPU lease depends on cannot rot before a GPU appears; killed part-way, it must keep what it finished."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks.gpu import Session, run_all
from benchmarks.gpu_plan import MODES, REAL, SMOKE, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUSES = ("ok", "not run", "skipped", "OOM", "failed", "timeout")


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _smoke(out):
    return subprocess.Popen([sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_killed_session_keeps_every_finished_case(tmp_path):
    """The device tool returns only what is under $OUT when a command is killed: finished cases must be there."""
    out = tmp_path / "gpu"
    proc = _smoke(out)
    deadline = time.time() + 150
    done = []
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "gpu.jsonl").exists():
                done = [r for r in _records(out / "gpu.jsonl") if r["kind"] == "case" and r["status"] == "ok"]
                if len(done) >= 8:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as the device tool's time limit kills: no chance to clean up
        proc.wait()
    assert len(done) >= 8, "no finished cases within the time allowed"
    records = _records(out / "gpu.jsonl")  # every line is a whole record
    assert records[0]["kind"] == "env" and records[0]["environment"]["matmul_tflops"] > 0
    assert records[-1]["kind"] != "end"  # killed part-way, not finished
    text = (out / "gpu.md").read_text()
    for r in [r for r in records if r["kind"] == "case"][:-1]:  # the kill may fall between the two writes
        assert f"| {r['case']} | {r['n']} | {r['h']} | {r['v']} | {r['impl']} |" in text
    assert "| core-forward_kl-lean | 64 | 32 | 512 | lean |" in text


def test_gpu_session_smoke_runs_every_job(tmp_path):
    out = tmp_path / "gpu"
    proc = _smoke(out)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    records = _records(out / "gpu.jsonl")
    assert len(records) == len(plan(SMOKE, True)) + 1 and records[-1]["kind"] == "end"
    for r in records:  # every job is a record: measured, or why not
        assert r["status"].startswith(STATUSES), r
    env = records[0]["environment"]
    assert env["matmul_tflops"] > 0 and env["bandwidth_tbs"] > 0 and env["imports"]["trl"] == "ok"
    by_case = {(r["case"], r["v"]): r for r in records if r["kind"] == "case"}
    for mode in MODES:
        for variant in ("forward_kl", "jsd", "forward_kl-clip"):
            r = by_case[(f"core-{variant}-{mode}", 512)]
            assert r["status"] == "ok" and r["ms"] > 0 and r["predicted_ms"] > 0, r
    assert by_case[("core-jsd-trl", 384)]["status"] == "ok" and by_case[("ce-compile", 512)]["status"] == "ok"
    assert by_case[("mask50-lean", 512)]["predicted_ms"] < by_case[("mask0-lean", 512)]["predicted_ms"]
    check = next(r for r in records if r["kind"] == "check")
    assert check["status"] == "ok" and check["d_weight_vs_torch_rel_err"] < 1e-4, check
    steps = {r["label"]: r for r in records if r["kind"] == "command"}
    for label in ("OPSD step, fused loss", "OPSD step, eager loss", "GRPOTrainer step, trl",
                  "GRPOTrainer step, pydistill", "native tests"):
        assert steps[label]["status"] == "ok", steps[label]
    assert "passed" in steps["native tests"]["summary"]
    text = (out / "gpu.md").read_text()
    assert "| core-forward_kl-fast | 64 | 32 | 512 | fast |" in text and "- OPSD step, fused loss: ok" in text
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)  # the device tool's limits
    assert (out / "sweep.png").stat().st_size > 1000 and (out / "tests.log").exists()


FAKE_WORKER = """
import json, os, sys, time
for line in sys.stdin:
    job = json.loads(line)
    if job["case"] == "crash":
        print("CUDA error: an illegal memory access", file=sys.stderr, flush=True)
        os._exit(3)
    if job["case"] == "hang":
        time.sleep(60)
    print("a library's chatter on stdout")
    print("RECORD " + json.dumps(dict(status="ok", ran=job["case"], pid=os.getpid())), flush=True)
"""


def test_a_crashing_or_hanging_job_costs_only_itself(tmp_path):
    session = Session(tmp_path, smoke=True, t0=time.time(), budget_s=120, hard_s=180, command="test")
    session.worker_cmd = [sys.executable, "-c", FAKE_WORKER]
    jobs = [dict(kind="case", section="s", case=name, timeout=3.0) for name in ("a", "crash", "b", "hang", "c")]
    broken = dict(kind="command", section="s", label="a command job without its argv", timeout=3.0)
    run_all(session, jobs[:4] + [broken] + jobs[4:])
    assert session.worker is None  # run_all stops it
    session.env = dict(imports=dict(liger="does not import: ImportError: triton 3.6 lacks tl.foo",
                                    cce="not installed: ModuleNotFoundError: No module named 'cut_cross_entropy'"))
    run_all(session, [dict(kind="case", section="s", case=name, timeout=3.0, needs=name) for name in ("liger", "cce")])
    session.budget_s = 0
    run_all(session, [dict(kind="case", section="s", case="late", timeout=3.0)])
    records = _records(tmp_path / "gpu.jsonl")
    status = {r.get("case"): r["status"] for r in records}
    assert [r.get("ran") for r in records[:6]] == ["a", None, "b", None, None, "c"]
    assert records[4]["status"] == "failed: the session raised KeyError: 'argv'"
    assert status["crash"].startswith("failed: the worker died (exit 3)") and "illegal memory access" in status["crash"]
    assert status["hang"].startswith("timeout: no result after 3 s")
    assert len({records[i]["pid"] for i in (0, 2, 5)}) == 3  # a fresh worker after each lost one
    assert status["liger"] == "skipped: does not import: ImportError: triton 3.6 lacks tl.foo"
    assert status["cce"].startswith("not run: not installed")
    assert status["late"].startswith("not run: time budget")


def test_the_plan_puts_the_head_to_head_first_and_the_native_tests_last():
    jobs = plan(REAL, False)
    assert jobs[0]["kind"] == "env"
    first = jobs[1:15]  # the first shape's 14 cases
    assert all(j["kind"] == "case" and (j["n"], j["h"], j["v"]) == (8192, 4096, 151936) for j in first)
    assert {j["impl"] for j in first} >= {"lean", "fast", "trl", "eager", "liger"}
    assert [j["budget_mb"] for j in first[:2]] == [256.0, 4096.0]
    assert jobs[-1]["label"] == "native tests"
    sections = [j["section"] for j in jobs]
    order = ["two-context", "accuracy", "masked", "one-context", "opsd-step", "grpo-step", "native-tests"]
    assert [s for s in dict.fromkeys(sections) if s != "environment"] == order


@pytest.mark.parametrize("smoke", [True, False])
def test_every_planned_case_exists(smoke):
    from benchmarks.gpu_plan import GPU_CASES

    for job in plan(SMOKE if smoke else REAL, smoke):
        assert job["kind"] != "case" or job["case"] in GPU_CASES
