"""spawn_gloo: results in rank order, and failures that name the rank instead of hanging."""

import os
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
