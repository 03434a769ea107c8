"""SIGKILL a tiny training run at random moments (inside checkpoint saves included) again and again; every
resume must work and the final weights must equal an uninterrupted run's bit for bit."""
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pydistill.trainers.checkpoint import latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_STEPS = 6
KILLS = 24


def _start(run_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "tests.kill_worker", str(run_dir), str(MAX_STEPS)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"a run exited with {process.returncode}:\n{err[-3000:]}"
    return out


def _kill_at(process, rng):
    """Half the kills right after a save starts (within its slowed writes), half at a random moment."""
    if rng.random() < 0.5:
        time.sleep(rng.uniform(0.5, 8.0))
    else:
        wanted = rng.randint(1, 3)
        seen = 0
        while seen < wanted:
            line = process.stdout.readline()
            if not line:  # the run ended first
                break
            seen += line.startswith("save ")
        time.sleep(rng.uniform(0.0, 0.15))
    process.kill()
    process.wait()


def _final_weights(run_dir):
    path = latest_checkpoint(str(run_dir))
    assert path.endswith(f"checkpoint-{MAX_STEPS}")
    return load_file(os.path.join(path, "weights.safetensors")), load_file(os.path.join(path, "teacher.safetensors"))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_exact(tmp_path):
    reference_dir = tmp_path / "reference"
    _finish(_start(reference_dir))
    reference, reference_teacher = _final_weights(reference_dir)

    rng = random.Random(1234)
    run_dir = tmp_path / "killed"
    kills = inside_save = finished = 0
    seen = set()
    while True:
        process = _start(run_dir)
        if kills >= KILLS:
            _finish(process)
            break
        _kill_at(process, rng)
        if process.returncode == 0:  # finished before the kill: start over so that the kills keep coming
            assert latest_checkpoint(str(run_dir)).endswith(f"checkpoint-{MAX_STEPS}")
            finished += 1
            os.rename(run_dir, tmp_path / f"finished-{finished}")
            continue
        assert process.returncode == -9, process.stderr.read()[-3000:]
        kills += 1
        leftovers = {e for e in os.listdir(run_dir) if e.startswith((".tmp-checkpoint", ".trash"))} \
            if os.path.isdir(run_dir) else set()
        inside_save += bool(leftovers - seen)  # a new half-written checkpoint: this kill hit a save
        seen |= leftovers
        # whatever the moment, the folder names a complete checkpoint (or none yet)
        if os.path.exists(run_dir / "latest"):
            state = json.load(open(os.path.join(latest_checkpoint(str(run_dir)), "trainer_state.json")))
            assert 0 <= state["step"] <= MAX_STEPS
    print(f"{KILLS} kills, {inside_save} inside a checkpoint save")
    assert inside_save >= 3, f"only {inside_save} of {KILLS} kills landed inside a save"
    weights, teacher = _final_weights(run_dir)
    assert weights.keys() == reference.keys()
    for name in reference:
        assert torch.equal(weights[name], reference[name]), name
    for name in reference_teacher:
        assert torch.equal(teacher[name], reference_teacher[name]), name
    steps = [r["step"] for r in map(json.loads, open(run_dir / "metrics.jsonl"))]
    assert steps == list(range(1, MAX_STEPS + 1))  # no duplicated or missing steps after the kills
    assert not [e for e in os.listdir(run_dir) if e.startswith((".tmp", ".trash")) or e.endswith(".next")]
    # a finished run resumed again changes nothing and re-saves nothing
    before = os.stat(os.path.join(latest_checkpoint(str(run_dir)), "weights.safetensors")).st_mtime_ns
    _finish(_start(run_dir))
    assert os.stat(os.path.join(latest_checkpoint(str(run_dir)), "weights.safetensors")).st_mtime_ns == before
