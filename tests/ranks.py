"""Run a test worker as several CPU processes (gloo, through the torch environment variables accelerate reads).

A rank that fails stops its peers at once (they would wait on it in a collective until the timeout), with its own
error in the failure. A run past the timeout has every live rank's Python stacks dumped (faulthandler, on
SIGABRT) into the failure: a hang names where each rank waits. Output goes to files, never pipes, so a chatty rank
cannot block on a full pipe while its peer waits for it."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A gloo process sometimes aborts in C++ teardown at interpreter exit ("terminate called without an active
# exception", SIGABRT) after its work is done, more often on a loaded machine; workers leave through
# finish_worker, which skips that teardown.
TEARDOWN_ABORT = "terminate called without an active exception"


def finish_worker():
    """A worker's last call: wait for every rank, shut the process group down, and exit at once, without Python's
    teardown. Destroying the trainer's objects after the group is gone (DDP's reducer, the group's threads) sometimes
    aborted, and once in 60 two-process runs hung: rank 0 had exited, rank 1 never returned from main()."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(**extra) -> dict:
    """This environment without any torch.distributed variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.update(extra)
    return env


class RankHang(AssertionError):
    """The ranks outlived the timeout; the message holds their stacks."""


def _launch(module, args, world, env_extra, logs):
    port = str(free_port())
    procs = []
    for rank, log in enumerate(logs):
        env = rank_env(**env_extra) if world == 1 else rank_env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env_extra)
        rank_args = [arg.replace("{rank}", str(rank)) for arg in args]
        procs.append(subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", module, *rank_args], cwd=ROOT,
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _read(log) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")


def _stop(procs, dump: bool):
    """Stop every live rank; with ``dump`` first have faulthandler print its stacks (SIGABRT)."""
    live = [p for p in procs if p.poll() is None]
    if dump:
        for p in live:
            p.send_signal(signal.SIGABRT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(p.poll() is None for p in live):
            time.sleep(0.1)
    for p in live:
        if p.poll() is None:
            p.kill()
        p.wait()


def _attempt(module, args, world, env_extra, timeout):
    """One launch; returns [(returncode, output)] per rank, or raises RankHang."""
    with tempfile.TemporaryDirectory() as folder:
        logs = [open(os.path.join(folder, f"rank{r}.log"), "w+b") for r in range(world)]
        try:
            procs = _launch(module, args, world, env_extra, logs)
            deadline = time.monotonic() + timeout
            try:
                while [p.poll() for p in procs].count(None):  # every rank polled: any() would stop at the first
                    failed = [p for p in procs if p.returncode not in (None, 0, -signal.SIGABRT)]
                    if failed or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
            finally:
                hung = any(p.poll() is None for p in procs) and time.monotonic() > deadline
                _stop(procs, dump=hung)
            results = [(p.returncode, _read(log)) for p, log in zip(procs, logs)]
            if hung:
                raise RankHang(f"python -m {module} as {world} processes outlived {timeout} s; their stacks:\n" +
                               "\n".join(f"--- rank {r} (exit {code}) ---\n{out[-6000:]}"
                                         for r, (code, out) in enumerate(results)))
            return results
        finally:
            for log in logs:
                log.close()


def run_ranks(module: str, args: list, world: int, timeout: float = 240, env: dict | None = None):
    """Run ``python -m module *args`` as ``world`` processes (one plain process when ``world`` is 1) and assert
    that every rank exits 0; ``{rank}`` in an argument becomes the process's rank. A gloo teardown abort after the
    work, or a hang, is repeated once (a hang with a warning holding the stacks, so that it stays visible); a
    second one fails (a hang with the stacks). A repeated worker must start its run folder afresh."""
    for attempt in (1, 2):
        try:
            results = _attempt(module, args, world, env or {}, timeout)
        except RankHang as hang:
            if attempt == 2:
                raise
            warnings.warn(str(hang)[-12000:])
            continue
        if attempt == 1 and world > 1 and any(code == -signal.SIGABRT and TEARDOWN_ABORT in out
                                               for code, out in results):
            continue
        # the rank that failed first, not a peer this module killed after it
        failed = sorted((code == -signal.SIGKILL, rank, code, out) for rank, (code, out) in enumerate(results) if code)
        for _, rank, code, out in failed[:1]:
            raise AssertionError(f"rank {rank} of python -m {module} exited {code}:\n{out[-3000:]}")
        return
