"""The run folder: one run at a time (a lock file), no silent reuse of a previous run's folder, and the
metrics log cut back to the checkpoint a run resumes from.

A folder is *marked as a run* by its lock file, which every run writes before anything else. A marked folder
*holds a run* when it has a ``latest`` pointer, a ``checkpoint-*`` folder, ``metrics.jsonl`` or ExGRPO's
``sft/`` stage folder. Other files (e.g. ExGRPO's EI cache, which is meant to be reused) do not count.
``--overwrite`` deletes only the names a run writes (:data:`RUN_FILES`, checkpoints, temporary folders) and only
in a marked folder; an unmarked folder that holds such names is the user's and is refused, never cleared.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile

LOCK = ".pydistill.lock"  # also the mark of a run folder (written by every run, since run folders exist)
RUN_FILES = ("latest", "metrics.jsonl", "sft_metrics.jsonl", "sft", "tensorboard", "summary.json")

# Locks this process holds: path -> [file object, count]. Re-entrant within a process (tests build several
# trainers on one folder); what it stops is a second process.
_held: dict = {}


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock."""


def _is_run_entry(entry: str) -> bool:
    """A name that a run writes, and that :func:`clear` or ``clean_stale`` may delete."""
    return entry in RUN_FILES or entry.startswith(("checkpoint-", ".tmp-", ".trash-"))


def is_marked(output_dir: str) -> bool:
    return os.path.isfile(os.path.join(output_dir, LOCK))


def holds_run(output_dir: str) -> bool:
    return os.path.isdir(output_dir) and is_marked(output_dir) and bool(_held_run_entries(output_dir))


def _held_run_entries(output_dir: str) -> list:
    return sorted(entry for entry in os.listdir(output_dir)
                  if entry in ("latest", "metrics.jsonl", "sft") or entry.startswith("checkpoint-"))


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
    """Refuse a folder that holds a run unless resuming or overwriting, and an unmarked folder holding names a
    run writes whatever the flags (read-only: every process can call it). Call it before :func:`acquire`,
    which marks the folder."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir!r} is a file, not a folder (expected a run folder to create or "
                         "reuse)")
    if not os.path.isdir(output_dir):
        return
    if not is_marked(output_dir):
        # The user's own files under names a run writes: a run would mix with them, --overwrite delete them.
        found = sorted(entry for entry in os.listdir(output_dir) if _is_run_entry(entry))
        if found:
            raise ValueError(f"output_dir {output_dir!r} holds {', '.join(found)} but no pydistill run (no {LOCK}); "
                             "pydistill neither reuses nor deletes files it did not write: choose another output_dir")
        return
    held = _held_run_entries(output_dir)
    if held and not (resume or overwrite):
        raise ValueError(f"output_dir {output_dir!r} already holds a run ({', '.join(held[:4])}); pass "
                         "--resume true to continue it or --overwrite true to replace it")


def clear(output_dir: str):
    """Remove a previous run's checkpoints, pointer and logs (``--overwrite``). Call with the lock held, after
    :func:`check_reusable` (which refuses an unmarked folder that holds any of them)."""
    if not os.path.isdir(output_dir):
        return
    for entry in os.listdir(output_dir):
        path = os.path.join(output_dir, entry)
        if _is_run_entry(entry):
            # a link (e.g. to another run's checkpoint) goes, never what it points at
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


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


def claim(config, accelerator):
    """Check the run folder on every process (so that all of them stop on a bad one), then take its lock and tidy
    it on the main one. Returns the lock (None on the other processes), for :func:`release`."""
    from .checkpoint import clean_stale

    check_reusable(config.output_dir, config.resume, config.overwrite)
    accelerator.wait_for_everyone()
    lock = None
    if accelerator.is_main_process:
        lock = acquire(config.output_dir)
        try:
            if config.overwrite:
                clear(config.output_dir)
            clean_stale(config.output_dir)
        except BaseException:
            release(lock)
            raise
    accelerator.wait_for_everyone()
    return lock
