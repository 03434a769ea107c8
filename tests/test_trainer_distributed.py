"""Two CPU processes (gloo, through accelerate) agree with one process on the same global batch."""
import os
import socket
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **extra)
    return env


def test_two_processes_match_one(tmp_path):
    single = tmp_path / "single.pt"
    subprocess.run([sys.executable, "-m", "tests.ddp_worker", str(single), str(tmp_path / "s")], cwd=ROOT,
                   env=_env(), check=True, timeout=300)
    port = str(_free_port())
    double = tmp_path / "double.pt"
    procs = [subprocess.Popen([sys.executable, "-m", "tests.ddp_worker", str(double), str(tmp_path / "d")], cwd=ROOT,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    one, two = torch.load(single), torch.load(double)
    assert one["world"] == 1 and two["world"] == 2
    scale = max(v.abs().max().item() for v in one["state"].values())
    assert scale > 1e-4  # a real gradient
    for name, value in one["state"].items():
        torch.testing.assert_close(two["state"][name], value, atol=1e-5 * scale, rtol=1e-4)
