"""Benchmark: the exact scheduler against an OR-Tools LP solve of the same instances, same run.

Main case (the foundation issue's target): G=64 GPUs, E=256 experts, top-8, 8192 tokens per GPU,
2 redundant slots per GPU, placement by the EPLB-style greedy from 16 micro-batches of history,
instances = the next micro-batches of the same drifting workload. Then a scaling table over G.

Run: python scripts/bench_scheduler.py [--instances N] [--repeat N] [--max-gpus G]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from megatron_microep.planning.eplb import eplb_placement
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.scheduler import route_loads, schedule
from megatron_microep.planning.scheduler_reference import lp_min_max_load, lp_min_remote_tokens
from megatron_microep.planning.workloads import expert_loads, generate

HISTORY = 16
TOKENS_PER_GPU = 8192
TOPK = 8
REDUNDANT_SLOTS = 2


def median_seconds(solve, repeat):
    solve()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        solve()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(num_gpus, num_experts, workload, instances, repeat, seed, locality):
    trace = generate(workload, HISTORY + instances, num_gpus, num_experts, TOKENS_PER_GPU, TOPK, seed)
    placement = eplb_placement(expert_loads(trace[:HISTORY]), num_gpus, REDUNDANT_SLOTS)
    static = Placement.contiguous(num_experts, num_gpus)
    rows = []
    for tokens in trace[HISTORY:]:
        result = schedule(tokens, placement)
        lp = lp_min_max_load(tokens, placement)
        if result.max_load != lp.optimum:
            raise SystemExit(f"MISMATCH: fast {result.max_load} vs LP {lp.optimum} at G={num_gpus}")
        mean = tokens.sum() / num_gpus
        extra_remote = (
            result.remote_tokens - lp_min_remote_tokens(tokens, placement, result.max_load)
            if locality
            else float("nan")
        )
        rows.append(
            {
                "fast": median_seconds(lambda: schedule(tokens, placement), repeat),
                # The aggregated routing alone answers what the LP answers (per-copy quotas, no per-source split).
                "route": median_seconds(lambda: route_loads(tokens.sum(axis=0), placement), repeat),
                "lp_total": lp.build_seconds + lp.solve_seconds,
                "lp_solve": lp.solve_seconds,
                "before": schedule(tokens, static).max_load / mean,
                "after": result.max_load / mean,
                "extra_remote": extra_remote / tokens.sum(),
            }
        )
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=8, help="micro-batches timed per case")
    parser.add_argument("--repeat", type=int, default=200, help="solves per instance for the median")
    parser.add_argument("--max-gpus", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}")

    print(
        f"\nTarget case: G=64, E=256, top-{TOPK}, {TOKENS_PER_GPU} tokens/GPU, R={REDUNDANT_SLOTS}, "
        f"EPLB-style placement from {HISTORY} micro-batches; median over {args.instances} instances"
    )
    print(
        f"{'workload':<18}{'fast us':>9}{'LP ms':>8}{'GLOP ms':>9}{'x LP':>7}{'x GLOP':>8}"
        f"{'max/mean static':>17}{'after':>7}{'extra remote':>14}"
    )
    for workload in ("lognormal_drift", "zipf_drift", "rotating_hotspot", "bursty", "dsv3_derived"):
        r = run_case(64, 256, workload, args.instances, args.repeat, args.seed, locality=True)
        print(
            f"{workload:<18}{r['fast'] * 1e6:>9.1f}{r['lp_total'] * 1e3:>8.2f}{r['lp_solve'] * 1e3:>9.2f}"
            f"{r['lp_total'] / r['fast']:>7.0f}{r['lp_solve'] / r['fast']:>8.0f}"
            f"{r['before']:>17.3f}{r['after']:>7.3f}{r['extra_remote']:>13.3%}"
        )

    print(f"\nScaling (lognormal_drift, E = max(256, G), R={REDUNDANT_SLOTS}; median over {args.instances} instances)")
    print(
        f"{'G':>6}{'E':>6}{'fast us':>11}{'route us':>10}{'LP ms':>9}{'GLOP ms':>9}{'x LP':>7}{'x GLOP':>8}"
        f"{'route x GLOP':>14}{'static':>8}{'after':>7}"
    )
    num_gpus = 8
    while num_gpus <= args.max_gpus:
        num_experts = max(256, num_gpus)
        repeat = max(5, args.repeat * 64 // num_gpus)
        r = run_case(num_gpus, num_experts, "lognormal_drift", args.instances, repeat, args.seed, locality=False)
        print(
            f"{num_gpus:>6}{num_experts:>6}{r['fast'] * 1e6:>11.1f}{r['route'] * 1e6:>10.1f}{r['lp_total'] * 1e3:>9.2f}"
            f"{r['lp_solve'] * 1e3:>9.2f}{r['lp_total'] / r['fast']:>7.0f}{r['lp_solve'] / r['fast']:>8.0f}"
            f"{r['lp_solve'] / r['route']:>14.0f}{r['before']:>8.3f}{r['after']:>7.3f}"
        )
        num_gpus *= 2


if __name__ == "__main__":
    main()
