"""The GPU session in one command: every finished case is on disk at once, the most important ones first.

    make gpu GPU_OUT=$OUT                               # on one H100/H200, through the device tool (README, GPU)
    python -m benchmarks.gpu --out gpu-results          # the same without the installs
    python -m benchmarks.gpu --smoke --out /tmp/smoke   # the same code path on the CPU at tiny shapes

The jobs (:mod:`benchmarks.gpu_plan`), in order: the environment (GPU, versions, a measured bf16 matmul rate and
copy bandwidth, which baselines import); two contexts sharing the head at N=8192, H=4096, V=151936 then 128256,
bf16, forward + backward of forward KL, JSD and forward KL + clip: pydistill lean (256 MB) and fast (4096 MB),
TRL's chunked functions, Liger's compiled chunked JSD, eager, then torch.compile; accuracy against float64;
50 % masked rows; one context (logp + entropy; Liger's fused linear CE and CCE compute the CE alone); an OPSD
step on a Qwen2.5-0.5B-shaped model, fused vs eager loss; a GRPOTrainer step, TRL's own head vs pydistill's;
the native Triton tests. Every case sits beside the cost model's prediction from the measured rates.

Case and accuracy jobs run in one worker process (:mod:`benchmarks.gpu_worker`); a job that crashes or hangs
it is recorded with the reason and a fresh worker takes the next job. No job starts after ``--budget-s``
seconds from ``--t0`` (``make gpu`` passes the moment it started, installs included) and none runs past
``--hard-s``. Each finished job is appended to ``gpu.jsonl`` (flushed and synced) and ``gpu.md`` is rewritten
whole, so a run killed at any point leaves every job it finished. Files in ``--out``: gpu.jsonl, gpu.md,
worker.log (the worker's stderr), tests.log and, at the end, sweep.png: five of the device tool's eight.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.gpu_plan import REAL, SMOKE, plan

ROOT = Path(__file__).resolve().parent.parent
WORKER_JOBS = ("env", "case", "check")
INTERNAL = ("probes", "argv", "parse", "timeout", "rates", "needs", "model", "predict_n")  # not worth a column


try:  # loaded here: a forked child must not dlopen while another thread may hold the loader's lock
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def _die_with_parent():
    """Children get SIGKILL when the session dies, so a killed session leaves no process holding the GPU."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class Session:
    def __init__(self, out: Path, smoke: bool, t0: float, budget_s: float, hard_s: float, command: str):
        self.out, self.smoke, self.command = out, smoke, command
        self.t0, self.budget_s, self.hard_s = t0, budget_s, hard_s
        self.device = "cpu" if smoke else "cuda"
        self.records, self.env, self.worker = [], {}, None
        self.worker_cmd = [sys.executable, "-m", "benchmarks.gpu_worker", "--device", self.device,
                           "--compile-backend", "eager" if smoke else "inductor"] + (["--smoke"] if smoke else [])
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "gpu.jsonl", "a")

    def elapsed(self) -> float:
        return time.time() - self.t0

    # -- results: appended and synced one by one, the markdown rewritten whole after each
    def add(self, job: dict, result: dict):
        record = {k: v for k, v in job.items() if k not in INTERNAL}
        record.update(result, t_s=round(self.elapsed(), 1))
        if job["kind"] == "env" and "environment" in result:
            self.env = result["environment"]
        self.records.append(record)
        self.jsonl.write(json.dumps(record, default=str) + "\n")
        self.jsonl.flush()
        os.fsync(self.jsonl.fileno())
        try:
            tmp = self.out / "gpu.md.tmp"
            tmp.write_text(markdown(self.records, self.command))
            os.replace(tmp, self.out / "gpu.md")  # a kill mid-write leaves the previous complete file
        except Exception as exc:  # noqa: BLE001 - the table is a view of gpu.jsonl: never worth the session
            print(f"gpu.md not rewritten: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        keys = ("case", "label", "n", "v", "status", "ms", "predicted_ms", "extra_mb", "t_s")
        print(json.dumps({k: record[k] for k in keys if record.get(k) is not None}, default=str), flush=True)

    # -- the worker process
    def _start_worker(self):
        log = open(self.out / "worker.log", "a")
        proc = subprocess.Popen(self.worker_cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                text=True, env=_child_env(), start_new_session=True, preexec_fn=_die_with_parent)
        lines = queue.Queue()

        def read():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)
        threading.Thread(target=read, daemon=True).start()
        self.worker = (proc, lines)

    def stop_worker(self):
        if self.worker:
            proc, _ = self.worker
            try:
                proc.stdin.close()  # the worker ends at the end of its input
                proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                _kill(proc)
            self.worker = None

    def ask_worker(self, job: dict, timeout: float) -> dict:
        if self.worker is None or self.worker[0].poll() is not None:
            self._start_worker()
        proc, lines = self.worker
        try:
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
        except OSError:
            pass  # it died before reading the job: the end of its output says so below
        deadline = time.time() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                _kill(proc)
                self.worker = None
                return dict(status=f"timeout: no result after {timeout:.0f} s; the worker was stopped")
            if line is None:
                code = proc.wait()
                self.worker = None
                return dict(status=f"failed: the worker died (exit {code}) during this job; "
                                   f"worker.log ends: {_tail(self.out / 'worker.log')}")
            if line.startswith("RECORD "):
                return json.loads(line[7:])

    # -- a child process of its own (step benchmarks, the native tests)
    def run_command(self, job: dict, timeout: float) -> dict:
        self.stop_worker()  # its cached GPU memory would be missing from the step benchmarks
        cmd = [sys.executable, *job["argv"]]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_child_env(), start_new_session=True, preexec_fn=_die_with_parent)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            stdout, stderr = proc.communicate()
            if job["parse"] == "pytest":
                (self.out / "tests.log").write_text(stdout + stderr)
            return dict(status=f"timeout: stopped after {timeout:.0f} s", command=" ".join(job["argv"]))
        return parse_output(job, proc.returncode, stdout, stderr, self.out)

    def run_job(self, job: dict) -> dict:
        if self.elapsed() > self.budget_s:
            return dict(status=f"not run: time budget ({self.budget_s:.0f} s) spent")
        imports = self.env.get("imports", {})
        if job.get("needs") and imports.get(job["needs"], "ok") != "ok":
            reason = imports[job["needs"]]
            return dict(status=("not run: " if reason.startswith("not installed") else "skipped: ") + reason)
        left = self.hard_s - self.elapsed()
        if left < 5:  # too little left to measure anything
            return dict(status="not run: time budget spent")
        timeout = min(job["timeout"], left)
        if job["kind"] in WORKER_JOBS:
            rates = {k: self.env[k] for k in ("matmul_tflops", "bandwidth_tbs") if k in self.env}
            return self.ask_worker(dict(job, rates=rates if len(rates) == 2 else None), timeout)
        return self.run_command(job, timeout)


def run_all(session: Session, jobs: list):
    """Every job in order, each recorded as it ends."""
    try:
        for job in jobs:
            try:
                result = session.run_job(job)
            except Exception as exc:  # noqa: BLE001 - a fault of the session itself costs one job, not the rest
                result = dict(status=f"failed: the session raised {type(exc).__name__}: {str(exc)[:300]}")
            session.add(job, result)
    finally:
        session.stop_worker()


def _tail(path: Path, chars: int = 400) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def parse_output(job: dict, code: int, stdout: str, stderr: str, out: Path) -> dict:
    """A command job's record: trainer_step's JSON line, trl_step's RESULT line, or pytest's summary."""
    if job["parse"] == "pytest":
        (out / "tests.log").write_text(stdout + stderr)
        summary = [line for line in stdout.splitlines() if " passed" in line or " failed" in line or " error" in line]
        return dict(status="ok" if code == 0 else f"failed (exit {code}): see tests.log",
                    summary=summary[-1] if summary else stdout[-300:], command="python " + " ".join(job["argv"]))
    prefix = "RESULT " if job["parse"] == "result" else "{"
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    if code == 0 and lines:
        record = json.loads(lines[-1][len("RESULT "):] if prefix == "RESULT " else lines[-1])
        record.pop("model", None)
        return dict(record, status=record.get("status", "ok"))
    return dict(status=f"failed (exit {code}): {stderr.strip()[-300:]}")


def _fmt(value, spec=".2f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def markdown(records: list, command: str) -> str:
    env = next((r["environment"] for r in records if r.get("kind") == "env" and "environment" in r), {})
    lines = [f"# GPU session — {env.get('device_name', '?')}, {env.get('date', '?')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}, "
             f"trl {env.get('trl')}, liger-kernel {env.get('liger_kernel')}, cut-cross-entropy {env.get('cce')}, "
             f"Python {env.get('python')}; driver {env.get('driver', '-')}.",
             f"Measured: matmul {_fmt(env.get('matmul_tflops'), '.4g')} TFLOP/s, copy bandwidth "
             f"{_fmt(env.get('bandwidth_tbs'), '.3g')} TB/s. Imports: "
             + "; ".join(f"{k} {v}" for k, v in env.get("imports", {}).items()) + ".",
             f"Command: `{command}`. {len(records)} jobs recorded (this file is rewritten after each).", ""]
    cases = [r for r in records if r.get("kind") == "case"]
    for section in dict.fromkeys(r["section"] for r in cases):
        lines += [f"## {section}", "",
                  "| case | N | H | V | impl | time (ms) | predicted (ms) | extra memory (MB) | predicted extra (MB) "
                  "| % of matmul rate | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in cases if r["section"] == section):
            lines.append(f"| {r['case']} | {r.get('n')} | {r.get('h')} | {r.get('v')} | {r.get('impl')} | "
                         f"{_fmt(r.get('ms'))} | {_fmt(r.get('predicted_ms'))} | {_fmt(r.get('extra_mb'), '.0f')} | "
                         f"{_fmt(r.get('predicted_extra_mb'), '.0f')} | {_fmt(r.get('matmul_pct'), '.0f')} | "
                         f"{r.get('status')} |")
        lines.append("")
    for r in records:
        if r.get("kind") == "check":
            errs = ", ".join(f"{k} {v:.2e}" for k, v in r.items() if k.endswith("_err"))
            lines += [f"Accuracy at {r.get('shape')} ({r.get('rows')} rows vs float64): {r.get('status')}; {errs}", ""]
        elif r.get("kind") == "command" and r["section"] == "native-tests":
            lines += [f"Native tests: {r.get('status')} — {r.get('summary', '')}", ""]
        elif r.get("kind") == "command":
            detail = ""
            if r.get("status") == "ok":
                rate = f", {r['tokens_per_s']:.0f} tokens/s" if r.get("tokens_per_s") else ""
                detail = (f": {r.get('tokens')} tokens, step {_fmt(r.get('step_s'))} s{rate}, "
                          f"peak {_fmt(r.get('peak_mb'), '.0f')} MB (+{_fmt(r.get('extra_mb'), '.0f')} MB)")
            lines.append(f"- {r['label']}: {r.get('status')}{detail}")
    return "\n".join(lines) + "\n"


def plot(records, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("kind") == "case" and r.get("status") == "ok"]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(10, 4 + 0.18 * len(ok)))
    ax.barh(range(len(ok)), [r["ms"] for r in ok], color="tab:blue", label="measured")
    ax.scatter([r.get("predicted_ms") or 0 for r in ok], range(len(ok)), color="tab:red", marker="|", s=200,
               label="cost model")
    ax.set_yticks(range(len(ok)), [f"{r['case']} N={r['n']} V={r['v']}" for r in ok], fontsize=7)
    ax.set_xlabel("ms (forward + backward)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu.jsonl, gpu.md, worker.log, tests.log, sweep.png")
    p.add_argument("--smoke", action="store_true", help="the same jobs on the CPU at tiny shapes")
    p.add_argument("--t0", type=float, help="the session's start, seconds since the epoch (default: now)")
    p.add_argument("--budget-s", type=float, default=480.0, help="no job starts after this many seconds from --t0")
    p.add_argument("--hard-s", type=float, default=570.0, help="no job runs past this many seconds from --t0")
    args = p.parse_args(argv)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():  # asks the driver; creates no CUDA context in this process
            raise SystemExit("python -m benchmarks.gpu needs a CUDA device (use --smoke on the CPU)")
    session = Session(Path(args.out), args.smoke, args.t0 or time.time(), args.budget_s, args.hard_s,
                      "python -m benchmarks.gpu " + " ".join(argv))
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # runs run_all's finally: no worker outlives us
    run_all(session, plan(SMOKE if args.smoke else REAL, args.smoke))
    session.add(dict(kind="end", section="end"), dict(status="ok", wall_s=round(session.elapsed(), 1)))
    plot(session.records, session.out / "sweep.png")
    print(markdown(session.records, session.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
