"""Trace simulator benchmarks: replay speed, the 1024-GPU scale run, and the policy table per workload.

Prints figures for docs/benchmarks.md ("## Simulator"):

1. replay: a 64-GPU x 256-expert x 4-layer x 48-micro-batch trace through every policy (target < 180 s),
   against the time of only reading the same trace from disk (the baseline measured in this run).
2. scale: a 1024-GPU x 256-expert x 8-layer x 100-micro-batch trace written to a .mept file, then
   streamed through every policy; wall time and peak resident memory against the size the whole
   trace would take in memory. With 4 GPUs per expert, a quarter of the GPUs hold a home expert; the
   others serve replicas only. microep places replicas with ``planner=eplb`` here: at 1024 GPUs one
   exact evaluation of one sample costs about 25 ms, so the OR-Tools planner cannot search within its
   0.5 s limit (it overruns to about 2 s per layer and re-plan and triples the replay time).
3. tables: every policy on several skewed and drifting workloads (and two controls) with 2 redundant
   slots per GPU, 8 GPUs per node; markdown tables with the summary columns.
4. tail: microep's max/mean p99 per seed and pooled over seeds 0-5 on the three skewed, drifting
   workloads of the target (p99 <= 1.10): one seed's p99 is its 2nd-3rd worst of 176 micro-batches
   and layers, so the pooled figure estimates the same tail from 1056.
5. forecast: microep's planner scoring the history plus forecast samples with bursts (the default)
   against forecast samples without bursts (``forecast_burst=0``) and the history alone
   (``forecast_samples=0``, the baseline), max/mean over three seeds per workload.
6. burst: the policy tables of part 3 on the bursty, drifting, DeepSeek-V3-derived and LAER-derived
   workloads (and rotating_hotspot) with two more rows, microep with ``BURST_SLOTS`` burst slots per
   GPU (planning/burst.py), inside the home node (the default) and anywhere; and, since those slots
   are memory the other policies do not get, ultraep and llep again with ``2 + BURST_SLOTS``
   redundant slots (the same copies per GPU) against the same ideal.

7. replicas: microep on the three drifting workloads with the runtime's default of replicas anywhere
   and with replicas inside their home node, replica upkeep and wall-time parts printed apart.

Usage: python scripts/bench_simulator.py [--parts replay,scale,tables,tail,forecast,burst,replicas] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

from megatron_microep.planning.policies import POLICIES, Layout, make_policy
from megatron_microep.simulator import resolve_policy_params, simulate
from megatron_microep.simulator.cost import CostModel
from megatron_microep.simulator.engine import Simulation
from megatron_microep.simulator.report import explain_wins, markdown_table, parts_table, summarize
from megatron_microep.simulator.traces import NativeTraceWriter, open_trace

TABLE_WORKLOADS = (
    "lognormal_drift",
    "zipf_drift",
    "dsv3_derived",
    "rotating_hotspot",
    "bursty",
    "megatron_w6",
    "balanced",
)


BURST_WORKLOADS = ("bursty", "laer_derived", "lognormal_drift", "zipf_drift", "dsv3_derived", "rotating_hotspot")
BURST_SLOTS = 2


def table_shape(quick: bool) -> str:
    """The 64-GPU trace shape of the replay, table, tail and forecast parts (smaller with --quick)."""
    if quick:
        return "gpus=64,experts=256,layers=1,micro_batches=16,tokens=4096,topk=8"
    return "gpus=64,experts=256,layers=4,micro_batches=48,tokens=4096,topk=8"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_trace(spec: str, path: Path) -> tuple[int, float]:
    info, records = open_trace(spec)
    path.unlink(missing_ok=True)  # the native format appends: a trace left by an earlier run would be extended
    started = time.perf_counter()
    count = 0
    with NativeTraceWriter(path, info.num_gpus, info.num_experts, meta=info.meta) as writer:
        for r in records:
            writer.write(r.step, r.micro_batch, r.layer, r.tokens)
            count += 1
    return count, time.perf_counter() - started


def read_only(path: Path) -> float:
    started = time.perf_counter()
    _, records = open_trace(str(path))
    for _ in records:
        pass
    return time.perf_counter() - started


def replay(out: Path, quick: bool) -> None:
    shape = table_shape(quick)
    trace = out / "replay.mept"
    count, gen_s = write_trace(f"gen:lognormal_drift:{shape}", trace)
    base = read_only(trace)
    started = time.perf_counter()
    result = simulate(str(trace), list(POLICIES), 2, 8, out / "replay_report", CostModel())
    seconds = time.perf_counter() - started
    print(f"## replay: {shape}, all {len(POLICIES)} policies")
    print(
        f"records {count}; generate+write {gen_s:.1f} s; read-only pass {base:.2f} s; "
        f"replay with report {seconds:.1f} s ({seconds / base:.0f}x the read-only pass; target < 180 s)"
    )
    print(markdown_table(result.rows))
    print()


def scale(out: Path, quick: bool) -> None:
    micro_batches, layers = (100, 8) if not quick else (8, 1)
    spec = f"gen:lognormal_drift:gpus=1024,experts=256,layers={layers},micro_batches={micro_batches},tokens=4096,topk=8"
    trace = out / "scale.mept"
    rss_before = peak_rss_mb()
    count, gen_s = write_trace(spec, trace)
    rss_gen = peak_rss_mb()
    base = read_only(trace)
    full_gb = count * 1024 * 256 * 8 / 1e9
    started = time.perf_counter()
    result = simulate(
        str(trace),
        list(POLICIES),
        2,
        8,
        out / "scale_report",
        CostModel(),
        policy_params={"microep": {"planner": "eplb"}},
    )
    seconds = time.perf_counter() - started
    print(f"## scale: 1024 GPUs x 256 experts x {layers} layers x {micro_batches} micro-batches, all policies")
    print(
        f"records {count}; trace file {trace.stat().st_size / 1e6:.0f} MB (whole trace as int64 arrays: "
        f"{full_gb:.2f} GB); generate+write {gen_s:.1f} s (peak RSS {rss_gen:.0f} MB, {rss_before:.0f} MB before)"
    )
    print(
        f"read-only pass {base:.1f} s; replay with report {seconds:.1f} s ({seconds / base:.0f}x the read-only "
        f"pass); peak RSS after replay {peak_rss_mb():.0f} MB"
    )
    print(markdown_table(result.rows))
    print()


def tables(out: Path, quick: bool) -> None:
    shape = table_shape(quick)
    for workload in TABLE_WORKLOADS:
        started = time.perf_counter()
        result = simulate(
            f"gen:{workload}:{shape}", list(POLICIES), 2, 8, out / f"table_{workload}", CostModel(), plots=False
        )
        print(f"### {workload} ({shape}; {time.perf_counter() - started:.0f} s)")
        print(markdown_table(result.rows))
        notes = (out / f"table_{workload}" / "report.md").read_text().split("## Where another policy wins")
        if len(notes) > 1:
            print("\nWhere another policy wins:" + notes[1].split("##")[0].rstrip())
        print()


def tail(out: Path, quick: bool) -> None:
    seeds = (0,) if quick else tuple(range(6))
    shape = table_shape(quick)
    print(f"## tail: microep max/mean, {shape}, R=2, seeds {list(seeds)}")
    print(
        "| workload | "
        + " | ".join(f"p99 seed {s}" for s in seeds)
        + " | pooled mean | pooled p95 | pooled p99 | max |"
    )
    print("|---|" + "---:|" * (len(seeds) + 4))
    for workload in TABLE_WORKLOADS[:3]:
        pooled, per_seed = [], []
        for seed in seeds:
            info, records = open_trace(f"gen:{workload}:{shape},seed={seed}")
            layout = Layout(info.num_gpus, info.num_experts, 2, 8)
            ratios = Simulation(layout, [make_policy("microep", layout)], CostModel()).run(records)[0].ratios
            per_seed.append(np.percentile(ratios, 99))
            pooled += ratios
        print(
            f"| {workload} | " + " | ".join(f"{p:.3f}" for p in per_seed) + f" | {np.mean(pooled):.4f} | "
            f"{np.percentile(pooled, 95):.4f} | {np.percentile(pooled, 99):.4f} | {np.max(pooled):.4f} |"
        )
    print()


def forecast(out: Path, quick: bool) -> None:
    seeds = (0,) if quick else (0, 1, 2)
    shape = table_shape(quick)
    print(f"## forecast: microep planner input, {shape}, seeds {list(seeds)}")
    print("| workload | planner input | max/mean mean | p95 | p99 | max |")
    print("|---|---|---:|---:|---:|---:|")
    for workload in TABLE_WORKLOADS[:5]:
        for label, params in (
            ("history + 32 forecast samples with bursts (default)", {}),
            ("history + 32 forecast samples, no bursts", {"forecast_burst": 0.0}),
            ("history only", {"forecast_samples": 0}),
        ):
            ratios = []
            for seed in seeds:
                info, records = open_trace(f"gen:{workload}:{shape},seed={seed}")
                layout = Layout(info.num_gpus, info.num_experts, 2, 8)
                policy = make_policy("microep", layout, **params)
                ratios += Simulation(layout, [policy], CostModel()).run(records)[0].ratios
            print(
                f"| {workload} | {label} | {np.mean(ratios):.4f} | {np.percentile(ratios, 95):.4f} | "
                f"{np.percentile(ratios, 99):.4f} | {np.max(ratios):.4f} |"
            )
    print()


def burst(out: Path, quick: bool) -> None:
    shape = table_shape(quick)
    label = f"microep, burst_slots={BURST_SLOTS}"
    variants = {label: {}, f"{label}, any node": {"burst_node_confined": False}}
    for workload in BURST_WORKLOADS:
        started = time.perf_counter()
        info, records = open_trace(f"gen:{workload}:{shape}")
        cost = CostModel()
        layout = Layout(info.num_gpus, info.num_experts, 2, 8)
        names = list(POLICIES)
        params = resolve_policy_params(names, {}, cost)
        policies = [make_policy(n, layout, **params[n]) for n in names]
        at = names.index("microep") + 1
        for i, extra in enumerate(variants.values()):
            policies.insert(at + i, make_policy("microep", layout, burst_slots=BURST_SLOTS, **extra))
        results = Simulation(layout, policies, cost).run(records)
        for i, name in enumerate(variants):
            results[at + i].name = name
        rows = summarize(results)
        print(f"### {workload} with burst slots ({shape}; {time.perf_counter() - started:.0f} s)")
        print(markdown_table(rows))
        print()
        print(parts_table(rows))
        # The planner's wall time beyond the modeled step (``planner`` above) swings with the load of a
        # shared machine; the same planner runs in every microep row, so show the share without it too.
        ideal_step = next(r.modeled_step_time for r in rows if r.policy == "ideal")
        print("\n| policy | share of ideal | without exposed planner time |\n|---|---:|---:|")
        for r in rows:
            without = ideal_step / (r.modeled_step_time - r.parts_per_step["planner"])
            print(f"| {r.policy} | {r.share_of_ideal:.1%} | {without:.1%} |")
        notes = explain_wins(rows, focus=label)
        if notes:
            print("\nWhere another policy wins:\n" + "\n".join(f"- {n}" for n in notes))
        wide = Layout(info.num_gpus, info.num_experts, 2 + BURST_SLOTS, 8)
        _, records = open_trace(f"gen:{workload}:{shape}")
        same_memory = Simulation(wide, [make_policy(n, wide) for n in ("ultraep", "llep", "ideal")], cost).run(records)
        print(f"\nultraep and llep with {2 + BURST_SLOTS} redundant slots (the copies per GPU of {label}):\n")
        print(markdown_table(summarize(same_memory)))
        print()
        sys.stdout.flush()


def replicas(out: Path, quick: bool) -> None:
    """microep with the runtime's defaults (replicas anywhere) and with replicas kept in their home
    expert's node (``--microep-gpus-per-node 8``) on the three drifting workloads, replica upkeep charged as
    the runtime moves it (one refresh and one fp32 gradient return per replica and step, straight
    from the home GPU). Wall-time parts (planner, per-micro-batch decision) are printed apart: they
    are measured on this machine and grow with its load."""
    shape = table_shape(quick)
    print(f"## replicas: microep, replicas anywhere (default) or in the home node; {shape}, R=2, 8 GPUs per node")
    print(
        "| workload | replicas | max/mean mean | max/mean p99 | replica upkeep (ms/step) | planner + decision "
        "(ms/step) | modeled step (ms) | share of ideal |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for workload in TABLE_WORKLOADS[:3]:
        for label, confined in (("anywhere (default)", False), ("home node", True)):
            result = simulate(
                f"gen:{workload}:{shape}",
                ["microep"],
                2,
                8,
                out / f"replicas_{workload}_{'node' if confined else 'anywhere'}",
                CostModel(),
                policy_params={"microep": {"node_confined": confined}},
                plots=False,
            )
            row = next(r for r in result.rows if r.policy == "microep")
            parts = row.parts_per_step
            print(
                f"| {workload} | {label} | {row.max_over_mean_mean:.3f} | {row.max_over_mean_p99:.3f} | "
                f"{1e3 * parts['replica_sync']:.1f} | {1e3 * (parts['planner'] + parts['decision']):.1f} | "
                f"{1e3 * row.modeled_step_time:.2f} | {100 * row.share_of_ideal:.1f}% |"
            )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="replay,scale,tables,tail,forecast,burst,replicas")
    parser.add_argument("--out", default="runs/bench_simulator")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script itself")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# bench_simulator ({time.strftime('%Y-%m-%d')}, python {sys.version.split()[0]}, numpy {np.__version__})\n")
    parts = {
        "replay": replay,
        "scale": scale,
        "tables": tables,
        "tail": tail,
        "forecast": forecast,
        "burst": burst,
        "replicas": replicas,
    }
    for name in args.parts.split(","):
        if name not in parts:
            parser.error(f"unknown part {name!r}; choose from {', '.join(parts)}")
        parts[name](out, args.quick)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
