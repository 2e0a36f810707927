"""Multi-process CPU runs with the gloo backend, and megatron parallel state on top of them.

``spawn_gloo`` is what the multi-rank tests and the embedded CPU training run launch ranks with;
``init_megatron_parallel`` is what each rank calls first when it needs megatron-core's process
groups and RNG trackers on CPU.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


class RankFailedError(RuntimeError):
    """A rank of a ``spawn_gloo`` run raised, died, or the run timed out."""


def _free_loopback_port() -> int:
    # The port is released before the ranks bind it; a collision is possible but rare,
    # and surfaces as a rank failure rather than a hang (the store has a timeout).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(fn, rank, world_size, port, timeout_s, threads_per_rank, results, args):
    # A process group of its own, which every helper process the rank starts joins, so the launcher
    # can end them all (see _signal_rank); spawn_gloo also sets it from the parent, whichever comes first.
    _own_process_group(0)
    # Hide accelerators: these are CPU ranks, and the CPU harness refuses to run beside CUDA.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        # gloo otherwise picks the interface the hostname resolves to, which may not be loopback.
        GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
    )
    # Several ranks share few cores: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(threads_per_rank)
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        # Plain pickle bytes: the queue's pickler would share tensors by file descriptor, which
        # dies with this process before the parent reads it.
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - everything, incl. SystemExit, goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_gloo(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads_per_rank: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh CPU processes joined by gloo.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function), and so must its return
    values; they come back as a list in rank order. The default process group is initialised
    (gloo, TCP store on a free 127.0.0.1 port) before ``fn`` runs and destroyed after. GPUs are
    hidden from the ranks (``CUDA_VISIBLE_DEVICES=""``).

    Raises ``RankFailedError`` with the failing rank's traceback as soon as any rank raises or
    dies, and after ``timeout_s`` seconds if some rank has not finished; the other ranks are
    terminated in both cases, so a broken collective never hangs the caller. Each rank leads a process
    group of its own; whatever processes are left in it when ``spawn_gloo`` returns or raises are ended.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_loopback_port()
    procs = [
        ctx.Process(
            target=_rank_entry,
            args=(fn, rank, world_size, port, timeout_s, threads_per_rank, results, args),
            name=f"gloo-rank-{rank}",
            # Not daemonic, so a rank may start helper processes of its own (DataLoader workers,
            # megatron's checkpoint writer); the finally below ends every rank in any case.
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
        _own_process_group(proc.pid)
    finished = False
    try:
        values = _collect(procs, results, world_size, timeout_s)
        finished = True
        return values
    finally:
        if finished:
            # Every rank reported: let them exit by themselves (their own cleanup included).
            for proc in procs:
                proc.join(timeout=_EXIT_GRACE_S)
        # Every rank and whatever it started and left behind (a rank killed or exiting hard never
        # stops its helpers, e.g. the multiprocessing Manager of Megatron's checkpoint writer).
        for proc in procs:
            _signal_rank(proc, signal.SIGTERM)
        for proc in procs:
            proc.join(timeout=10)
            _signal_rank(proc, signal.SIGKILL)
            proc.join()
        results.close()


def _own_process_group(pid: int) -> None:
    """Make ``pid`` (0: this process) the leader of a new process group."""
    try:
        os.setpgid(pid, 0)
    except (PermissionError, ProcessLookupError):
        pass  # the rank already runs its own code (it sets the group itself) or has exited


def _signal_rank(proc, signum: int) -> None:
    """Send ``signum`` to the rank, if alive, and to every process left in its process group."""
    if proc.is_alive():
        os.kill(proc.pid, signum)
    try:
        # The group's id cannot be reused while any process is in it, even after the rank is reaped.
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass  # nothing left in the group


# How long ranks that reported a result get to exit by themselves before they are terminated.
_EXIT_GRACE_S = 30.0
# After the first failure, how long to keep listening: the other ranks' reports (often a gloo
# "connection closed" caused by the first one) help tell cause from consequence.
_FAILURE_GRACE_S = 3.0


def _collect(procs, results, world_size: int, timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    values: list[Any | None] = [None] * world_size
    pending = set(range(world_size))
    failures = {}  # rank -> description
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            rank, ok, payload = results.get(timeout=min(remaining, 0.2))
        except queue.Empty:
            # A rank that died without reporting (segfault, OOM kill, os._exit) never will; once
            # it has exited, its report would already be in the queue if it had sent one.
            for rank in sorted(pending):
                if procs[rank].exitcode is not None and results.empty():
                    failures[rank] = (
                        f"rank {rank} of {world_size} exited with code {procs[rank].exitcode} "
                        "without reporting a result"
                    )
                    pending.discard(rank)
                    deadline = min(deadline, time.monotonic() + _FAILURE_GRACE_S)
            continue
        pending.discard(rank)
        if ok:
            values[rank] = pickle.loads(payload)
        else:
            failures[rank] = f"rank {rank} of {world_size} failed:\n{payload}"
            deadline = min(deadline, time.monotonic() + _FAILURE_GRACE_S)
    if failures:
        raise RankFailedError("spawn_gloo: " + "\n".join(failures[r] for r in sorted(failures)))
    if pending:
        raise RankFailedError(
            f"spawn_gloo: timed out after {timeout_s:.0f} s; ranks {sorted(pending)} of {world_size} did not finish"
        )
    return values


def init_megatron_parallel(
    tensor_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int = 1,
    seed: int = 1234,
    context_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
):
    """Set up megatron-core's parallel state and RNG trackers on CPU; return the ProcessGroupCollection.

    Call inside a rank whose default process group is initialised (e.g. from a ``spawn_gloo``
    function). Applies ``enable_cpu_megatron()`` first. Seeds the CPU generator with ``seed`` and
    megatron's RNG trackers (data-parallel, tensor-parallel and expert-parallel states) as
    ``model_parallel_cuda_manual_seed(seed)`` does on GPU, so expert weights differ across EP ranks
    exactly as in a GPU run.
    """
    from megatron_microep.glue.cpu import enable_cpu_megatron

    enable_cpu_megatron()
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        raise RuntimeError(
            "init_megatron_parallel: torch.distributed is not initialised; run inside spawn_gloo "
            "or call torch.distributed.init_process_group('gloo', ...) first"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        context_parallel_size=context_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()
