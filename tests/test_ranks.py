"""tests.ranks, the multi-process runner the distributed tests stand on: a failing rank is reported at once with
its own error, and a hang fails with every rank's stacks instead of an empty timeout."""
import os

import pytest

from tests.ranks import ROOT, RankHang, run_ranks

WORKER = '''
import os, sys, time

def wait_for_peer():
    time.sleep(60)

if __name__ == "__main__":
    rank = int(os.environ.get("RANK", "0"))
    if sys.argv[1] == "fail" and rank == 1:
        print("rank 1 cannot go on", flush=True)
        sys.exit(3)
    wait_for_peer()
'''


@pytest.fixture
def worker_env(tmp_path):
    (tmp_path / "ranks_probe_worker.py").write_text(WORKER)
    return dict(PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]))


def test_a_failing_rank_stops_its_peer_and_is_named(worker_env):
    with pytest.raises(AssertionError, match=r"rank 1 of python -m ranks_probe_worker exited 3:\n.*cannot go on"):
        run_ranks("ranks_probe_worker", ["fail"], 2, timeout=50, env=worker_env)  # rank 0 alone would sleep 60 s


def test_a_hang_is_tried_twice_and_fails_with_the_stacks(worker_env):
    with pytest.warns(UserWarning, match="outlived 2 s"), pytest.raises(RankHang) as hang:
        run_ranks("ranks_probe_worker", ["hang"], 2, timeout=2, env=worker_env)
    for rank in (0, 1):
        assert f"--- rank {rank} " in str(hang.value)
    assert "in wait_for_peer" in str(hang.value)  # faulthandler's stack of the waiting rank
