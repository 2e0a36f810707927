"""Benchmark: the replica placement planner against the EPLB-style greedy, same histories, same run.

Main case (the foundation issue's target): E=256 experts, G=64 GPUs, R=2 redundant slots per GPU (one
extra case R=1),
top-8, 4096 tokens per GPU, 16 history micro-batches; the planner's time limit is 10 s. Each plan is
scored by the exact scheduler's max load / mean on the history it was planned from and on the next
16 micro-batches of the same workload (held out: what the plan meets in training). Workloads:
  drifting             lognormal_drift (slow AR(1) drift + per-micro-batch noise)
  rotating             rotating_hotspot, a 16-expert block 3x hotter, one step per micro-batch: the
                       history covers the whole cycle, so the mean is flat but every micro-batch is skewed
  rotating-unseen      rotating_hotspot defaults (moves every 4 micro-batches): held-out positions never
                       appear in the history
  bursty               bursty (random 8-expert bursts 10x in 30% of micro-batches)
  dsv3-derived         derived from recorded DeepSeek-V3 loads: the layer of median skew, synthetic
                       drift and noise
  dsv3-derived-skewed  the same from the recording's most skewed layer
  dsv3-derived-skewed-R1  the same with one redundant slot per GPU (with two, both plans are perfect)
Columns: static = contiguous EP without replicas; eplb-even = EPLB-style placement with EPLB's even
split over copies; eplb = the same placement with the exact scheduler; plan = the planner with the exact
scheduler; ratio = plan / eplb (below 1 is better).

Run: python scripts/bench_planner.py [--time-limit S] [--seed N] [--workloads a,b]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from megatron_microep.planning.eplb import eplb_placement, even_split_gpu_loads
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.planner import plan_placement
from megatron_microep.planning.scheduler import optimal_max_load
from megatron_microep.planning.workloads import expert_loads, generate, load_dsv3_expert_loads

NUM_EXPERTS = 256
NUM_GPUS = 64
REDUNDANT_SLOTS = 2
TOPK = 8
TOKENS_PER_GPU = 4096
HISTORY = 16
HELD_OUT = 16


def _dsv3_layer(quantile: float) -> dict:
    """The recorded (scenario, MoE layer) whose hottest-expert / mean skew sits at ``quantile``."""
    loads, names = load_dsv3_expert_loads()
    skew = (loads.max(axis=2) / loads.mean(axis=2)).ravel()
    index = int(np.argsort(skew, kind="stable")[round(quantile * (skew.size - 1))])
    scenario, layer = np.unravel_index(index, loads.shape[:2])
    return dict(scenario=names[scenario], layer=int(layer))


# label -> (generator, its parameters, redundant slots per GPU)
WORKLOADS = {
    "drifting": ("lognormal_drift", lambda: {}, REDUNDANT_SLOTS),
    "rotating": ("rotating_hotspot", lambda: dict(hot_width=16, period=1, hot_factor=3.0), REDUNDANT_SLOTS),
    "rotating-unseen": ("rotating_hotspot", lambda: {}, REDUNDANT_SLOTS),
    "bursty": ("bursty", lambda: {}, REDUNDANT_SLOTS),
    "dsv3-derived": ("dsv3_derived", lambda: _dsv3_layer(0.5), REDUNDANT_SLOTS),
    "dsv3-derived-skewed": ("dsv3_derived", lambda: _dsv3_layer(1.0), REDUNDANT_SLOTS),
    "dsv3-derived-skewed-R1": ("dsv3_derived", lambda: _dsv3_layer(1.0), 1),
}


def max_over_mean(loads: np.ndarray, placement: Placement) -> float:
    """Mean over micro-batches of the exact scheduler's max GPU load / mean GPU load; loads int [M, E]."""
    return float(np.mean([optimal_max_load(row, placement) / (row.sum() / NUM_GPUS) for row in loads]))


def even_split_max_over_mean(loads: np.ndarray, placement: Placement) -> float:
    return float(np.mean([even_split_gpu_loads(row, placement).max() / (row.sum() / NUM_GPUS) for row in loads]))


def run_case(label: str, seed: int, time_limit: float) -> dict:
    name, params, slots = WORKLOADS[label]
    params = params()
    trace = generate(name, HISTORY + HELD_OUT, NUM_GPUS, NUM_EXPERTS, TOKENS_PER_GPU, TOPK, seed, **params)
    loads = expert_loads(trace)
    history, held_out = loads[:HISTORY], loads[HISTORY:]

    started = time.perf_counter()
    eplb = eplb_placement(history, NUM_GPUS, slots)
    eplb_seconds = time.perf_counter() - started
    started = time.perf_counter()
    plan = plan_placement(history, NUM_GPUS, slots, time_limit_s=time_limit)
    plan_seconds = time.perf_counter() - started
    static = Placement.contiguous(NUM_EXPERTS, NUM_GPUS)

    row = {
        "label": label,
        "params": params,
        "plan_seconds": plan_seconds,
        "eplb_seconds": eplb_seconds,
        "source": plan.source,
        "solver": plan.solver_status,
        "gap": plan.gap,
        "bound": plan.bound / plan.expected_mean,
    }
    for split, part in (("hist", history), ("held", held_out)):
        row[f"static_{split}"] = max_over_mean(part, static)
        row[f"even_{split}"] = even_split_max_over_mean(part, eplb)
        row[f"eplb_{split}"] = max_over_mean(part, eplb)
        row[f"plan_{split}"] = max_over_mean(part, plan.placement)
    assert abs(row["plan_hist"] - float(np.mean(plan.per_sample_max / (history.sum(axis=1) / NUM_GPUS)))) < 1e-9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from {', '.join(WORKLOADS)}"
    )
    args = parser.parse_args()
    labels = args.workloads.split(",")
    unknown = [label for label in labels if label not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {unknown[0]!r}")

    plan_placement(np.ones((2, 8), dtype=np.int64), 4, 1, time_limit_s=0.5)  # compile the scheduler once
    print(
        f"# placement planner, E={NUM_EXPERTS} G={NUM_GPUS} R={REDUNDANT_SLOTS} top-{TOPK} "
        f"{TOKENS_PER_GPU} tokens/GPU, {HISTORY} history + {HELD_OUT} held-out micro-batches, "
        f"time limit {args.time_limit:g} s, seed {args.seed}; {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}"
    )
    print("max/mean = exact scheduler's max GPU load / mean, averaged over micro-batches; ratio = plan / eplb")
    header = "| workload | split | static | eplb-even | eplb | plan | ratio |"
    rows = []
    for label in labels:
        rows.append(run_case(label, args.seed, args.time_limit))
    print()
    print(header)
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for split, name in (("hist", "history"), ("held", "held-out")):
            print(
                f"| {r['label']} | {name} | {r[f'static_{split}']:.3f} | {r[f'even_{split}']:.3f} | "
                f"{r[f'eplb_{split}']:.3f} | {r[f'plan_{split}']:.3f} | {r[f'plan_{split}'] / r[f'eplb_{split}']:.3f} |"
            )
    print()
    print("| workload | plan seconds | eplb seconds | plan from | CP-SAT | proven bound (x mean) | gap |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['label']} | {r['plan_seconds']:.2f} | {r['eplb_seconds']:.3f} | {r['source']} | {r['solver']} | "
            f"{r['bound']:.3f} | {r['gap']:.2%} |"
        )
    for r in rows:
        if r["params"]:
            print(f"# {r['label']}: {r['params']}")
    worst = max(r["plan_seconds"] for r in rows)
    print(
        f"\nslowest plan {worst:.2f} s (target <= {args.time_limit:g} s): {'OK' if worst <= args.time_limit else 'OVER'}"
    )


if __name__ == "__main__":
    main()
