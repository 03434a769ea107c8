"""The run folder: one run at a time (a lock file), no silent reuse of a previous run's folder, and the
metrics log cut back to the checkpoint a run resumes from.

A folder *holds a run* when it has a ``latest`` pointer, a ``checkpoint-*`` folder, ``metrics.jsonl`` or
ExGRPO's ``sft/`` stage folder. Other files (e.g. ExGRPO's EI cache, which is meant to be reused) do not count.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile

LOCK = ".pydistill.lock"
RUN_FILES = ("latest", "metrics.jsonl", "sft_metrics.jsonl", "sft", "tensorboard", "summary.json")

# Locks this process holds: path -> [file object, count]. Re-entrant within a process (tests build several
# trainers on one folder); what it stops is a second process.
_held: dict = {}


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock."""


def holds_run(output_dir: str) -> bool:
    if not os.path.isdir(output_dir):
        return False
    return any(entry in ("latest", "metrics.jsonl", "sft") or entry.startswith("checkpoint-")
               for entry in os.listdir(output_dir))


def acquire(output_dir: str):
    """Take ``output_dir``'s lock (created if needed); one line naming the folder if another process has it."""
    os.makedirs(output_dir, exist_ok=True)
    key = os.path.realpath(output_dir)
    if key in _held:
        _held[key][1] += 1
        return key
    handle = open(os.path.join(output_dir, LOCK), "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderBusy(f"output_dir {output_dir!r} is in use by {owner} (lock file {LOCK}); two runs "
                            "cannot share a run folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    _held[key] = [handle, 1]
    return key


def release(key):
    """Give back one hold of a lock taken with :func:`acquire` (the file lock goes with the last one)."""
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _held[key]
        fcntl.flock(entry[0].fileno(), fcntl.LOCK_UN)
        entry[0].close()


def check_reusable(output_dir: str, resume: bool, overwrite: bool):
    """Refuse a folder that holds a run unless resuming or overwriting (read-only: every process can call it)."""
    if holds_run(output_dir) and not (resume or overwrite):
        raise ValueError(f"output_dir {output_dir!r} already holds a run (checkpoints or metrics.jsonl); pass "
                         "--resume true to continue it or --overwrite true to replace it")


def clear(output_dir: str):
    """Remove a previous run's checkpoints, pointer and logs (``--overwrite``). Call with the lock held."""
    if not os.path.isdir(output_dir):
        return
    for entry in os.listdir(output_dir):
        path = os.path.join(output_dir, entry)
        if entry in RUN_FILES or entry.startswith(("checkpoint-", ".tmp-", ".trash-")):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def truncate_metrics(path: str, step: int):
    """Keep the records of ``path`` (JSONL) up to ``step``: a resumed run logs the later steps again. A line
    cut short by a kill is dropped too. Atomic (a kill here leaves the old file)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line.rstrip("\n"))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
