"""spawn_gloo: results in rank order, failures that name the rank instead of hanging, and no process
left behind."""

import os
import subprocess
import time

import pytest
import torch
import torch.distributed as dist

from megatron_microep.glue.distributed import RankFailedError, spawn_gloo


def _sum_of_ranks(rank, world_size, offset):
    value = torch.tensor([float(rank + offset)])
    dist.all_reduce(value)
    return rank, world_size, value.item(), os.environ["CUDA_VISIBLE_DEVICES"]


def _rank_one_raises(rank, world_size):
    if rank == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()  # rank 0 would wait forever for rank 1 without failure propagation


def _rank_one_exits_hard(rank, world_size):
    if rank == 1:
        os._exit(3)
    dist.barrier()


def _rank_one_sleeps(rank, world_size):
    if rank == 1:
        time.sleep(600)
    return rank


def test_results_come_back_in_rank_order():
    results = spawn_gloo(_sum_of_ranks, 3, 10, timeout_s=120)
    assert results == [(r, 3, 33.0, "") for r in range(3)]


def test_exception_names_rank_and_carries_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        spawn_gloo(_rank_one_raises, 2, timeout_s=120)
    message = str(info.value)
    assert "rank 1 of 2 failed" in message
    assert "ValueError: deliberate failure on rank one" in message
    assert "_rank_one_raises" in message  # the traceback, not just the message
    assert time.monotonic() - start < 60


def test_hard_exit_is_reported_without_waiting_for_timeout():
    start = time.monotonic()
    with pytest.raises(RankFailedError, match="rank 1 of 2 exited with code 3"):
        spawn_gloo(_rank_one_exits_hard, 2, timeout_s=120)
    assert time.monotonic() - start < 60


def test_timeout_names_unfinished_ranks():
    with pytest.raises(RankFailedError, match=r"timed out after 15 s; ranks \[1\] of 2"):
        spawn_gloo(_rank_one_sleeps, 2, timeout_s=15)


def _start_time(pid):
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), or None if it is
    gone or a zombie; with the pid it names one process even if the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return None if fields[0] in "ZX" else fields[19]


def _helper_then(rank, world_size, pid_dir, outcome):
    # A helper process the rank never stops, as Megatron's checkpoint writer's Manager when its rank dies.
    helper = subprocess.Popen(["sleep", "600"])
    with open(os.path.join(pid_dir, f"rank{rank}"), "w") as f:
        f.write(f"{helper.pid} {_start_time(helper.pid)}")
    if rank == 1 and outcome == "exit":
        os._exit(3)
    if rank == 1 and outcome == "timeout":
        time.sleep(600)
    dist.barrier()
    return rank


@pytest.mark.parametrize("outcome", ["return", "exit", "timeout"])
def test_no_process_survives_the_run(outcome, tmp_path):
    """Every helper process a rank started is gone once spawn_gloo returns or raises (checked by pid
    and start time in /proc), whether the ranks return, one exits hard, or the run times out."""
    if outcome == "return":
        assert spawn_gloo(_helper_then, 2, str(tmp_path), outcome, timeout_s=120) == [0, 1]
    else:
        with pytest.raises(RankFailedError):
            spawn_gloo(_helper_then, 2, str(tmp_path), outcome, timeout_s=120 if outcome == "exit" else 20)
    helpers = [(tmp_path / f"rank{rank}").read_text().split() for rank in range(2)]
    deadline = time.monotonic() + 10  # a killed process is gone once init has reaped it
    while time.monotonic() < deadline and any(_start_time(pid) == start for pid, start in helpers):
        time.sleep(0.1)
    survivors = [pid for pid, start in helpers if _start_time(pid) == start]
    assert not survivors, f"helper processes {survivors} outlived spawn_gloo ({outcome})"
