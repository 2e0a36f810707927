"""Benchmark: how much a re-plan slows the training thread, planner in a thread vs in a planner process.

Several CPU ranks (gloo, one process each, like training processes) each time a batch of small
torch ops on their main thread (8 elementwise ops on a 256-element tensor and one call that
releases the GIL: the host work of a training step and its waits, a CUDA sync or a collective)
while every layer of the model re-plans: a 64-GPU x 256-expert replica plan
(lognormal drift, 16 history micro-batches + 32 forecast samples, R=2, OR-Tools, ``--time-limit``
seconds), ``--layers`` layers.

  thread   the former design: rank 0 plans every layer, each in a Python thread of the training
           process (the scheduler's numba kernels now release the GIL; the rest of the planner is
           Python and holds it)
  process  this design (``runtime.replan``): layer i is planned by rank (i - 1) mod ranks, in that
           rank's planner process (``runtime.planner_pool``)

Slowdown = op time while the plans run over op time in the windows just before and after them,
on the same rank: the mean, the median and the 99th percentile, each against the baseline's. Each
design runs ``--repeats`` times, interleaved; the table shows every rank's figures pooled over the
repeats. Figures depend on the machine's free cores: print them with the load (``os.getloadavg``).

Run: python scripts/bench_planner_interference.py [--ranks 2] [--layers 2] [--time-limit 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time

import numpy as np

PLAN_GPUS, PLAN_EXPERTS, PLAN_SLOTS = 64, 256, 2
BASELINE_S = 0.6
SETTLE_S = 0.3  # after the plans start, before timing (the process design's submit and send)


def _ops(seconds: float) -> np.ndarray:
    import torch

    x = torch.ones(256)
    times = []
    end = time.perf_counter() + seconds
    while True:
        started = time.perf_counter()
        for _ in range(8):
            x = (x * 1.0001 + 1.0).clamp(max=1e6)
        time.sleep(0)  # releases the GIL, as the step's waits do (a CUDA sync, a collective)
        done = time.perf_counter()
        times.append(done - started)
        if done > end:
            return np.array(times)


def _planner(time_limit_s: float):
    from megatron_microep.planning.plan import HistoryPlanner, PlannerSettings, PlanTarget
    from megatron_microep.planning.workloads import generate

    window = generate("lognormal_drift", 16, PLAN_GPUS, PLAN_EXPERTS, 4096 * PLAN_GPUS, 8, 0).sum(axis=1)
    settings = PlannerSettings("ortools", time_limit_s, 0.0, None, 32, 4, 3.0, True)
    return HistoryPlanner(PlanTarget("replicas", PLAN_GPUS, PLAN_SLOTS), settings), window


def _rank(rank: int, world_size: int, layers: int, time_limit_s: float, repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_microep.runtime.planner_pool import planner_process

    torch.set_num_threads(1)
    planner, window = _planner(time_limit_s)
    mine = [layer for layer in range(1, layers + 1) if (layer - 1) % world_size == rank]
    process = planner_process()
    if mine:  # start the planner process and load its kernels before anything is timed
        process.wait(process.submit(planner, (window[:2], None, 0.1), 0.1))
    planner(window[:2], None, 0.1)  # the same warm-up for the in-process planner
    window_s = time_limit_s - SETTLE_S - 0.3
    out = {"thread": {"base": [], "plan": []}, "process": {"base": [], "plan": []}}
    for _ in range(repeats):
        for design in ("thread", "process"):
            dist.barrier()
            before = _ops(BASELINE_S)
            dist.barrier()
            if design == "thread":
                running = [
                    threading.Thread(target=planner, args=(window, None, time_limit_s))
                    for _ in (range(layers) if rank == 0 else ())
                ]
                for thread in running:
                    thread.start()
            else:
                jobs = [process.submit(planner, (window, None, time_limit_s), time_limit_s) for _ in mine]
            time.sleep(SETTLE_S)
            during = _ops(window_s)
            if design == "thread":
                for thread in running:
                    thread.join()
            else:
                for job in jobs:
                    process.wait(job)
                    job.result()
            dist.barrier()
            after = _ops(BASELINE_S)
            out[design]["base"].append(np.concatenate([before, after]))
            out[design]["plan"].append(during)
    return {design: {k: np.concatenate(v) for k, v in parts.items()} for design, parts in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from megatron_microep.glue.distributed import spawn_gloo

    load = os.getloadavg()
    print(
        f"{time.strftime('%Y-%m-%d')} {platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the start"
    )
    print(
        f"{args.ranks} ranks, {args.layers} layers re-planned at once, each a {PLAN_GPUS}-GPU x {PLAN_EXPERTS}-expert "
        f"plan of {args.time_limit:.1f} s, {args.repeats} repeats"
    )
    results = spawn_gloo(_rank, args.ranks, args.layers, args.time_limit, args.repeats, timeout_s=1800)
    print(f"{'design':<8} {'rank':>4} {'layers planned':>14} {'mean':>7} {'median':>7} {'p99':>7} {'ops':>8}")
    for design in ("thread", "process"):
        for rank, res in enumerate(results):
            base, plan = res[design]["base"], res[design]["plan"]
            planned = args.layers if design == "thread" and rank == 0 else 0
            if design == "process":
                planned = sum(1 for layer in range(args.layers) if layer % args.ranks == rank)
            mean = plan.mean() / base.mean()
            median = np.median(plan) / np.median(base)
            p99 = np.percentile(plan, 99) / np.percentile(base, 99)
            print(f"{design:<8} {rank:>4} {planned:>14} {mean:>6.2f}x {median:>6.2f}x {p99:>6.2f}x {len(plan):>8}")
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end")


if __name__ == "__main__":
    main()
