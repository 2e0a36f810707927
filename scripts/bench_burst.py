"""Burst copies (planning/burst.py): decision time at the target size and the gap to the best choice.

Prints figures for docs/benchmarks.md ("## Burst copies"):

1. time: G=64 GPUs, E=256 experts, top-8, 8192 tokens per GPU, R=2 redundant slots (EPLB-style
   placement from 16 micro-batches of history), D=2 burst slots per GPU, nodes of 8, steps of 4
   micro-batches (copies held across a step). Per micro-batch, the median CPU time of ``--repeat``
   calls of ``plan_burst`` against that of ``scheduler.schedule`` on the same counts and persistent
   placement (the normal path, the baseline of the same run): the time added, and max/mean
   before (the schedule) and after (the plan).
2. gap: fresh random small instances (4-8 GPUs, 1-3 experts per GPU, a few replicas, nodes of half
   the GPUs or none, 1-2 burst slots, some copies already held), tolerance 1: the plan's max load
   against the optimum over every admissible choice of copies (``burst_reference.min_max_load``,
   a MIP), and its copies against the fewest that reach the same max load.

Usage: python scripts/bench_burst.py [--parts time,gap] [--repeat N] [--instances N] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

from megatron_microep.planning.burst import NO_COPIES, plan_burst, with_copies
from megatron_microep.planning.burst_reference import admissible_copies, fewest_copies, min_max_load
from megatron_microep.planning.eplb import eplb_placement
from megatron_microep.planning.placement import Placement, home_gpu
from megatron_microep.planning.scheduler import schedule
from megatron_microep.planning.workloads import expert_loads, generate

GPUS, EXPERTS, TOPK, TOKENS, REDUNDANT, SLOTS, NODE, PER_STEP, HISTORY = 64, 256, 8, 8192, 2, 2, 8, 4, 16
TIME_WORKLOADS = ("bursty", "laer_derived", "lognormal_drift", "dsv3_derived")


def median_us(call, repeat: int) -> float:
    """Median CPU time of ``call`` (the thread's: what it costs on a core of its own, without the
    preemption a shared machine adds to wall time), in microseconds."""
    call()
    times = []
    for _ in range(repeat):
        started = time.thread_time()
        call()
        times.append(time.thread_time() - started)
    return 1e6 * statistics.median(times)


def time_part(repeat: int, micro_batches: int, seed: int) -> None:
    print(
        f"## time: G={GPUS}, E={EXPERTS}, top-{TOPK}, {TOKENS} tokens/GPU, R={REDUNDANT} (EPLB-style placement from "
        f"{HISTORY} micro-batches), D={SLOTS} burst slots, nodes of {NODE}, {PER_STEP} micro-batches per step, "
        f"{micro_batches} micro-batches per workload, seed {seed}; median of {repeat} calls per micro-batch"
    )
    print(
        "| workload | tolerance | micro-batches with new copies | new copies per such micro-batch | max/mean before "
        "| max/mean after | schedule us (median CPU) | added us: mean | p50 | p90 | p99 | max "
        "| added us on micro-batches with new copies: mean | p90 | max | mean / schedule us |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workload in TIME_WORKLOADS:
        trace = generate(workload, HISTORY + micro_batches, GPUS, EXPERTS, TOKENS, TOPK, seed)
        placement = eplb_placement(expert_loads(trace[:HISTORY]), GPUS, REDUNDANT)
        for tolerance in (1.0, 1.02, 1.05):
            added, base_us, before, after, new_counts, bursting = [], [], [], [], [], []
            held = NO_COPIES
            for m, tokens in enumerate(trace[HISTORY:]):
                if m % PER_STEP == 0:
                    held = NO_COPIES
                mean = tokens.sum() / GPUS
                plan = plan_burst(tokens, placement, held, SLOTS, NODE, tolerance)
                base = median_us(lambda t=tokens: schedule(t, placement), repeat)
                burst = median_us(lambda t=tokens, h=held: plan_burst(t, placement, h, SLOTS, NODE, tolerance), repeat)
                added.append(burst - base)
                base_us.append(base)
                before.append(schedule(tokens, placement).max_load / mean)
                after.append(plan.schedule.max_load / mean)
                new_counts.append(len(plan.pushes))
                bursting.append(len(plan.pushes) > 0)
                held = plan.copies
            added, bursting = np.asarray(added), np.asarray(bursting)
            busy = added[bursting]
            print(
                f"| {workload} | {tolerance:.2f} | {bursting.mean():.0%} | "
                f"{np.mean(np.asarray(new_counts)[bursting]) if bursting.any() else 0:.1f} | "
                f"{np.mean(before):.3f} | {np.mean(after):.3f} | {statistics.median(base_us):.0f} | {added.mean():.0f} | "
                f"{np.percentile(added, 50):.0f} | {np.percentile(added, 90):.0f} | {np.percentile(added, 99):.0f} | "
                f"{added.max():.0f} | {busy.mean() if len(busy) else 0:.0f} | "
                f"{np.percentile(busy, 90) if len(busy) else 0:.0f} | {busy.max(initial=0):.0f} | "
                f"{busy.mean() / statistics.median(base_us) if len(busy) else 0:.2f} |"
            )
            sys.stdout.flush()
    print()


def random_instance(rng: np.random.Generator):
    num_gpus = int(rng.choice([4, 6, 8]))
    num_experts = num_gpus * int(rng.integers(1, 4))
    lists = [[home_gpu(e, num_experts, num_gpus)] for e in range(num_experts)]
    for g in range(num_gpus):
        if rng.random() < 0.5:
            e = int(rng.integers(num_experts))
            if g not in lists[e]:
                lists[e].append(g)
    weights = rng.lognormal(0.0, 1.5, num_experts)
    tokens = np.stack(
        [rng.multinomial(int(rng.integers(20, 400)), weights / weights.sum()) for _ in range(num_gpus)]
    ).astype(np.int64)
    placement = Placement.from_lists(lists, num_gpus)
    node_size = int(rng.choice([0, num_gpus // 2])) or None
    slots = int(rng.integers(1, 3))
    candidates = admissible_copies(placement, NO_COPIES, slots, node_size)
    rng.shuffle(candidates)
    held, per_gpu = [], np.zeros(num_gpus, dtype=int)
    for e, g in candidates[: int(rng.integers(0, 3))]:
        if per_gpu[g] < slots:
            held.append((e, g))
            per_gpu[g] += 1
    return tokens, placement, np.asarray(held, dtype=np.int64).reshape(-1, 2), slots, node_size


def gap_part(instances: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ratios, extra_copies, no_copy = [], [], []
    started = time.perf_counter()
    for _ in range(instances):
        tokens, placement, held, slots, node_size = random_instance(rng)
        plan = plan_burst(tokens, placement, held, slots, node_size, 1.0)
        best, _ = min_max_load(tokens, placement, held, slots, node_size)
        got = plan.schedule.max_load
        ratios.append(got / best)
        no_copy.append(schedule(tokens, with_copies(placement, held)).max_load / best)
        fewest = fewest_copies(tokens, placement, got, held, slots, node_size)
        extra_copies.append(len(plan.pushes) - fewest)
    ratios, extra_copies = np.asarray(ratios), np.asarray(extra_copies)
    print(
        f"## gap: {instances} random instances, seed {seed} (4-8 GPUs, 1-3 experts per GPU, 1-2 burst slots, "
        f"tolerance 1; {time.perf_counter() - started:.0f} s)"
    )
    print("| plan max load / best over all copy choices | value |")
    print("|---|---:|")
    print(f"| optimal (ratio 1) | {np.mean(ratios <= 1 + 1e-12):.1%} of instances |")
    print(f"| mean | {ratios.mean():.4f} |")
    print(f"| p99 | {np.percentile(ratios, 99):.4f} |")
    print(f"| max | {ratios.max():.4f} |")
    print(f"| no new copy (held only) / best: mean | {np.mean(no_copy):.3f} |")
    print(
        f"| new copies beyond the fewest reaching the plan's max load: mean | {extra_copies.mean():.2f} "
        f"(0 in {np.mean(extra_copies == 0):.0%}, max {extra_copies.max()}) |"
    )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="time,gap")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--micro-batches", type=int, default=32)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--seed", type=int, default=None, help="default: fresh, printed")
    args = parser.parse_args()
    seed = int(np.random.SeedSequence().entropy % 2**31) if args.seed is None else args.seed
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"# bench_burst ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"python {sys.version.split()[0]}, load average {load})\n"
    )
    for name in args.parts.split(","):
        if name == "time":
            time_part(args.repeat, args.micro_batches, seed)
        elif name == "gap":
            gap_part(args.instances, seed)
        else:
            parser.error(f"unknown part {name!r}; choose from time, gap")


if __name__ == "__main__":
    main()
