"""Does FSEP pay for burst copies? The simulator's ``microep_fsep`` with and without burst slots.

Prints, per workload, the policy table (max/mean, share of ideal, bytes moved, time parts) of MicroEP
over FSEP (``planning/policies/microep_fsep.py``: the runtime's FSEP planner, the exact scheduler)
without burst slots (the baseline, measured in the same run) and with ``--burst-slots`` D, under the
``keep`` memory policy's charges (``--memory-policy regather`` for the other), against ideal. The cost
model charges the burst copies as the runtime moves them (simulator/cost.py ``record_cost``): one
gather of their shards from every GPU, issued after the count read beside the dispatch all-to-all
(the pair's excess over the dispatch alone exposed), their gradient returned with the layout's
(hidden behind the backward as far as it is), under ``regather`` a second on-demand gather in the
backward (exposed). 2 redundant slots per GPU (C = E/G + 2), 8 GPUs per node, DeepSeek-V3-shaped experts.

Usage: python scripts/bench_fsep_burst.py [--quick] [--burst-slots D] [--memory-policy keep|regather]
       [--workloads bursty,lognormal_drift,...] [--tokens N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from megatron_microep.planning.policies import Layout, make_policy
from megatron_microep.planning.policies.microep_fsep import MicroEpFsepParams, MicroEpFsepPolicy
from megatron_microep.simulator.cost import FSEP_MEMORY_POLICY_CHARGES, CostModel
from megatron_microep.simulator.engine import Simulation
from megatron_microep.simulator.report import markdown_table, parts_table, summarize
from megatron_microep.simulator.traces import open_trace

WORKLOADS = ("bursty", "laer_derived", "lognormal_drift", "zipf_drift", "dsv3_derived")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 layer x 16 micro-batches instead of 4 x 48")
    parser.add_argument("--burst-slots", type=int, default=2)
    parser.add_argument("--memory-policy", choices=sorted(FSEP_MEMORY_POLICY_CHARGES), default="keep")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per GPU and micro-batch")
    args = parser.parse_args()
    layers, micro_batches = (1, 16) if args.quick else (4, 48)
    shape = f"gpus=64,experts=256,layers={layers},micro_batches={micro_batches},tokens={args.tokens},topk=8"
    cost = dataclasses.replace(CostModel(), **FSEP_MEMORY_POLICY_CHARGES[args.memory_policy])
    print(f"## FSEP burst copies: {shape}; R=2, 8 GPUs per node; memory policy {args.memory_policy}")
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}\n")
    for workload in args.workloads.split(","):
        started = time.perf_counter()
        info, records = open_trace(f"gen:{workload}:{shape}")
        layout = Layout(info.num_gpus, info.num_experts, 2, 8)
        policies = [
            MicroEpFsepPolicy(layout, MicroEpFsepParams()),
            MicroEpFsepPolicy(layout, MicroEpFsepParams(burst_slots=args.burst_slots)),
            make_policy("ideal", layout),
        ]
        results = Simulation(layout, policies, cost).run(records)
        results[1].name = f"microep_fsep, burst_slots={args.burst_slots}"
        rows = summarize(results)
        print(f"### {workload} ({time.perf_counter() - started:.0f} s)")
        print(markdown_table(rows))
        print()
        print(parts_table(rows))
        base, burst = rows[0], rows[1]

        # The planner's wall time (the same planner in both rows) swings with the load of a shared
        # machine; the ratio without it is the one the burst copies decide.
        def step(row):
            return row.modeled_step_time - row.parts_per_step["planner"]

        print(
            f"\nburst / no burst: modeled step {burst.modeled_step_time / base.modeled_step_time:.3f}, "
            f"without exposed planner time {step(burst) / step(base):.3f}; share of ideal "
            f"{base.share_of_ideal:.1%} -> {burst.share_of_ideal:.1%}; fsep part per step "
            f"{1e3 * base.parts_per_step['fsep']:.2f} -> {1e3 * burst.parts_per_step['fsep']:.2f} ms\n"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
