#!/usr/bin/env python
"""MicroEP's per-micro-batch dispatch cost: host time per layer forward, and a whole layer on CPU ranks.

``host`` (default): one rank's host work per MoE layer forward at EP 8, 64 and 256 (256 experts,
top-8, 8192 tokens per rank; every rank's counts are rows of a synthetic 64-rank count matrix from
``planning.workloads`` (lognormal_drift, repeated for EP 256), the placement is EPLB-style from 16
earlier micro-batches with R = 2 replica slots per rank (R = 0 at EP 256: one expert per rank, and
replica mode needs R < experts per rank), and rank 0's routing map has exactly those counts).
Printed per EP size, medians over repeats, in microseconds:
- MicroEP: solve (``schedule_quotas``: the schedule without every source's pieces), this rank's plan
  (``rank_tables``), their sum (the target: <= 100 us at EP 64, <= 300 us at EP 256), and on the
  side the device work the GPU would run asynchronously (pair ordering by top-k + sort, index
  maps), timed on CPU;
- the old path on the same input (``schedule`` with every source's pieces, then the numpy plan of
  every rank with the full index maps, ``source_slot_counts`` + ``rank_plan`` + the inverse
  permutation, which is the tests' reference);
- Megatron's alltoall dispatcher on the same routing map: ``dispatch_preprocess`` (counts, split
  sizes, permutation with hidden size 1) and the split sizes' host copy before its all-to-all.
Absolute times depend on the machine's load: the script prints the 1-minute load average, and ratios
against the old path measured in the same run.

``layer``: EP CPU ranks (gloo) each build Megatron's stock MoELayer (alltoall dispatcher) and a
MicroEPMoELayer with the same weights, routing skewed with a Zipf-shaped router expert bias (sigmoid
router) over a seeded permutation of experts. The MicroEP layer records routing history for
``--warmup-steps`` steps, re-plans its placement with the chosen planner (in its background thread)
and adopts it; then both layers run ``--iters`` forward+backward passes on the same inputs, timed per
micro-batch (the slowest rank counts, as in a collective). Printed (medians over iterations): stock
and MicroEP layer time, the scheduling overhead (count exchange + solve + this rank's tables, also per
phase) and its share of the MicroEP layer time, GPU max/mean load before (stock placement) and after
(MicroEP schedule), remote tokens and replica tokens, and host reads per layer forward and backward
for both layers (``runtime.audit``). On an oversubscribed CPU the ranks share cores, so layer
times measure total work, not the slowest GPU: the balance figures are the ones to read for speed-ups.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

EXPERTS, TOPK, TOKENS, HISTORY = 256, 8, 8192, 16


# --- host -------------------------------------------------------------------------------------------


def _median_us(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def _routing_map(counts_row: np.ndarray, seed: int) -> torch.Tensor:
    """bool [TOKENS, E] with exactly TOPK experts per token and column sums ``counts_row``: the
    pairs, listed by expert, fill a [TOPK, TOKENS] grid row by row (no expert exceeds TOKENS, so
    no token gets one twice); tokens are then shuffled."""
    experts = np.repeat(np.arange(counts_row.size), counts_row).reshape(TOPK, TOKENS)
    routing_map = torch.zeros(TOKENS, counts_row.size, dtype=torch.bool)
    routing_map[torch.arange(TOKENS).repeat(TOPK), torch.from_numpy(experts.reshape(-1))] = True
    return routing_map[torch.from_numpy(np.random.default_rng(seed).permutation(TOKENS))]


def _case(ep: int, seed: int):
    from megatron_microep.planning.eplb import eplb_placement
    from megatron_microep.planning.placement import Placement
    from megatron_microep.planning.workloads import expert_loads, generate
    from megatron_microep.runtime.layout import PhysicalLayout

    trace = generate("lognormal_drift", HISTORY + 1, 64, EXPERTS, TOKENS, TOPK, seed)[:, np.arange(ep) % 64]
    redundant = 2 if EXPERTS // ep > 2 else 0
    placement = eplb_placement(expert_loads(trace[:HISTORY]), ep, redundant) if redundant else None
    placement = placement or Placement.contiguous(EXPERTS, ep)
    layout = PhysicalLayout.build(placement, EXPERTS // ep, redundant)
    counts = np.ascontiguousarray(trace[HISTORY][None])  # [T=1, G, E]
    return layout, counts, _routing_map(counts[0, 0], seed)


def _megatron_alltoall(ep: int, counts: np.ndarray, routing_map: torch.Tensor):
    """Megatron's alltoall dispatcher for EP rank 0 of ``ep`` (fake process group, the count all-gather
    answered with ``counts``): a function running its dispatch preprocessing for ``routing_map``."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_microep.glue.cpu import enable_cpu_megatron

    enable_cpu_megatron()
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import token_dispatcher
    from megatron.core.transformer.transformer_config import TransformerConfig

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ep)
    single = dist.new_group([0])
    pg = ProcessGroupCollection(ep=dist.group.WORLD, expt_tp=single, tp_ep=dist.group.WORLD, tp=single)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=1,
        num_moe_experts=EXPERTS,
        moe_router_topk=TOPK,
        expert_model_parallel_size=ep,
        moe_token_dispatcher_type="alltoall",
    )
    n = EXPERTS // ep
    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher(n, list(range(n)), config, pg_collection=pg)
    gathered = torch.from_numpy(counts.reshape(-1, EXPERTS))
    token_dispatcher.gather_from_sequence_parallel_region = lambda tensor, group=None, **kw: gathered
    hidden = torch.zeros(TOKENS, 1)
    probs = routing_map.float()

    def run():
        dispatcher.dispatch_preprocess(hidden, routing_map, probs)
        dispatcher._maybe_dtoh_and_synchronize("before_ep_alltoall")

    return run


def host_part(args) -> dict:
    from megatron_microep.planning.scheduler import schedule, schedule_quotas
    from megatron_microep.runtime import dispatch
    from megatron_microep.runtime.routing import rank_plan, rank_tables, source_slot_counts

    torch.set_num_threads(1)
    rows = []
    for ep in args.ep:
        layout, counts, routing_map = _case(ep, args.seed)
        full = schedule(counts.sum(axis=0), layout.placement)  # with every source's pieces, for the old plan
        sched = schedule_quotas(counts.sum(axis=0), layout.placement)
        tables = rank_tables(counts, sched, layout, 0, 0)
        order = dispatch.order_pairs(routing_map, TOPK)

        def old_plan():
            plan = rank_plan(source_slot_counts(counts, full, layout), layout, 0, 0)
            inverse = np.empty_like(plan.to_slot_major)
            inverse[plan.to_slot_major] = np.arange(plan.to_slot_major.size)

        def old_maps():
            pairs = routing_map.t().nonzero()
            plan = rank_plan(source_slot_counts(counts, full, layout), layout, 0, 0)
            send = torch.from_numpy(plan.send_pairs)
            pairs[:, 1].index_select(0, send), pairs[:, 0].index_select(0, send)

        row = {
            "ep": ep,
            "redundant_slots": layout.redundant_slots,
            "replicas": layout.placement.num_slots - layout.placement.num_experts,
            "solve_us": _median_us(lambda: schedule_quotas(counts.sum(axis=0), layout.placement), args.repeat),
            "old_solve_us": _median_us(lambda: schedule(counts.sum(axis=0), layout.placement), args.repeat),
            "plan_us": _median_us(lambda: rank_tables(counts, sched, layout, 0, 0), args.repeat),
            "pair_order_us": _median_us(lambda: dispatch.order_pairs(routing_map, TOPK), args.repeat_device),
            "index_maps_us": _median_us(lambda: dispatch.build_index_maps(order, tables, EXPERTS), args.repeat_device),
            "old_plan_us": _median_us(old_plan, args.repeat_device),
            "old_maps_us": _median_us(old_maps, args.repeat_device),
        }
        row["host_us"] = row["solve_us"] + row["plan_us"]
        row["old_host_us"] = row["old_solve_us"] + row["old_plan_us"]
        row["megatron_preprocess_us"] = _median_us(_megatron_alltoall(ep, counts, routing_map), args.repeat_device)
        rows.append(row)
    return {"rows": rows}


def _print_host(result, args) -> None:
    print(
        f"MicroEP host work per layer forward, one rank: {EXPERTS} experts, top-{TOPK}, {TOKENS} tokens per "
        f"rank; medians (us) of {args.repeat} solves/plans, {args.repeat_device} of the rest"
    )
    print(
        f"{'EP':>4} {'R':>2} {'replicas':>8} {'solve':>8} {'plan':>8} {'solve+plan':>11} {'old solve':>9} "
        f"{'old plan':>9} {'old/new':>8} | {'pair order':>10} {'index maps':>10} {'old maps':>9} | {'Megatron a2a':>12}"
    )
    for r in result["rows"]:
        print(
            f"{r['ep']:>4} {r['redundant_slots']:>2} {r['replicas']:>8} {r['solve_us']:>8.1f} {r['plan_us']:>8.1f} "
            f"{r['host_us']:>11.1f} {r['old_solve_us']:>9.1f} {r['old_plan_us']:>9.1f} "
            f"{r['old_host_us'] / r['host_us']:>8.1f} | "
            f"{r['pair_order_us']:>10.1f} {r['index_maps_us']:>10.1f} {r['old_maps_us']:>9.1f} | "
            f"{r['megatron_preprocess_us']:>12.1f}"
        )
    print(
        "  solve+plan is host work; pair order and index maps are device work (asynchronous on a GPU, "
        "timed here on CPU); old maps = nonzero + plan + gathers; Megatron a2a = dispatch_preprocess + split-size "
        "host copy"
    )


# --- layer ------------------------------------------------------------------------------------------


def _layer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ep", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank per micro-batch")
    p.add_argument("--redundant-slots", type=int, default=1)
    p.add_argument("--planner", choices=("ortools", "greedy"), default="ortools")
    p.add_argument("--planner-time-limit-s", type=float, default=5.0)
    p.add_argument("--skew", type=float, default=1.2, help="Zipf exponent of the router expert bias")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per warm-up step")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", type=str, default=None, help="also write the figures to this file")


def _layers(args, pg):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_microep.glue.compat import swap_moe_mlp
    from megatron_microep.glue.config import MicroEPConfig, attach_microep_config
    from megatron_microep.glue.layer import MicroEPMoELayer

    def config(dispatcher):
        return TransformerConfig(
            num_layers=1,
            hidden_size=args.hidden,
            num_attention_heads=4,
            ffn_hidden_size=args.ffn,
            moe_ffn_hidden_size=args.ffn,
            num_moe_experts=args.experts,
            moe_router_topk=args.topk,
            moe_token_dispatcher_type=dispatcher,
            expert_model_parallel_size=args.ep,
            add_bias_linear=False,
            use_cpu_initialization=True,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=0.0,
            moe_router_load_balancing_type="none",
        )

    spec = get_moe_module_spec(use_te=False, num_experts=args.experts, moe_grouped_gemm=False)
    micro_config = config("microep")
    attach_microep_config(
        micro_config,
        MicroEPConfig(
            redundant_slots=args.redundant_slots,
            replan_interval=args.warmup_steps,
            replan_lag=1,
            planner=args.planner,
            planner_time_limit_s=args.planner_time_limit_s,
            history_window=args.warmup_steps,
        ),
    )

    def build(s, c):
        return (
            build_module(s, config=c, pg_collection=pg) if isinstance(s, ModuleSpec) else s(config=c, pg_collection=pg)
        )

    stock = build(spec, config("alltoall"))
    micro = build(swap_moe_mlp(spec, MicroEPMoELayer), micro_config)
    rng = np.random.default_rng(args.seed)
    popularity = 1.0 / np.arange(1, args.experts + 1) ** args.skew
    bias = torch.tensor(0.8 * popularity[rng.permutation(args.experts)] / popularity[0], dtype=torch.float32)
    with torch.no_grad():
        stock.router.expert_bias.copy_(bias)
    micro.load_state_dict(stock.state_dict(), strict=True)
    return stock, micro


def _timed(layer, x, upstream):
    import torch.distributed as dist

    x = x.clone().requires_grad_(True)
    dist.barrier()
    start = time.perf_counter()
    out, _ = layer(x)
    (out * upstream).sum().backward()
    elapsed = time.perf_counter() - start
    layer.zero_grad(set_to_none=True)
    return elapsed


def _host_reads(layer, x, upstream):
    """Host reads in one forward and one backward of ``layer`` (see runtime.audit)."""
    from megatron_microep.glue import cpu
    from megatron_microep.runtime.audit import HostReads
    from megatron_microep.runtime.dispatch import CountExchange

    def counter():
        syncs = [(cpu._CpuEvent, "synchronize"), (torch.cuda, "synchronize")]
        return HostReads(boundaries=[(CountExchange, "wait")], syncs=syncs)

    x = x.clone().requires_grad_(True)
    with counter() as forward:
        out, _ = layer(x)
    with counter() as backward:
        (out * upstream).sum().backward()
    layer.zero_grad(set_to_none=True)
    return {
        "forward": {"boundary": forward.boundary, "reads": dict(forward.reads)},
        "backward": {"boundary": backward.boundary, "reads": dict(backward.reads)},
    }


def _rank(rank, world_size, args):
    import torch.distributed as dist

    from megatron_microep.glue.distributed import init_megatron_parallel
    from megatron_microep.glue.layer import set_training_step

    pg = init_megatron_parallel(expert_model_parallel_size=args.ep, seed=args.seed)
    stock, micro = _layers(args, pg)
    stock.train()
    micro.train()
    gen = torch.Generator().manual_seed(args.seed + rank)

    def batch():
        return (
            torch.randn(args.tokens, 1, args.hidden, generator=gen),
            torch.randn(args.tokens, 1, args.hidden, generator=gen),
        )

    # Warm-up: history for the planner (also compiles the scheduler), then planning and adoption.
    for step in range(1, args.warmup_steps + 1):
        set_training_step(step)
        for _ in range(args.micro_batches):
            _timed(micro, *batch())
    set_training_step(args.warmup_steps + 1)  # the planner starts on this step's first forward
    _timed(micro, *batch())
    set_training_step(args.warmup_steps + 2)  # ... and its placement is adopted here
    _timed(micro, *batch())
    _timed(stock, *batch())
    micro.telemetry.drain()
    replicas = micro.layout.placement.num_slots - micro.layout.placement.num_experts
    reads = {name: _host_reads(layer, *batch()) for name, layer in (("stock", stock), ("microep", micro))}
    micro.telemetry.drain()

    rows = []
    for _ in range(args.iters):
        x, upstream = batch()
        t_stock = _timed(stock, x, upstream)
        t_micro = _timed(micro, x, upstream)
        (s,) = micro.telemetry.drain()
        rows.append(
            [
                t_stock,
                t_micro,
                s.scheduling_ms / 1e3,
                s.gather_ms / 1e3,
                s.solve_ms / 1e3,
                s.split_ms / 1e3,
                s.max_before,
                s.mean_before,
                s.max_after,
                s.mean_after,
                s.remote_before,
                s.remote_after,
                s.replica_tokens,
            ]
        )
    local = torch.tensor(rows, dtype=torch.float64)
    worst = local.clone()
    dist.all_reduce(worst[:, :6], op=dist.ReduceOp.MAX)  # the slowest rank sets a collective's pace

    # In the layer the count gather also waits for the last rank to arrive; alone, after a barrier,
    # it shows the collective's own latency.
    from megatron_microep.runtime.collectives import all_gather_rows

    counts = torch.zeros(args.experts + 2, dtype=torch.int64)
    alone = []
    for _ in range(20):
        dist.barrier()
        start = time.perf_counter()
        all_gather_rows(counts, pg.tp_ep)
        alone.append(time.perf_counter() - start)
    alone = torch.tensor([statistics.median(alone)], dtype=torch.float64)
    dist.all_reduce(alone, op=dist.ReduceOp.MAX)
    return {
        "rows": worst.tolist(),
        "replicas": replicas,
        "placement": micro.layout.placement.to_lists(),
        "gather_alone_s": float(alone[0]),
        "host_reads": reads,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = p.add_subparsers(dest="part")
    host = parts.add_parser("host", help="one rank's host work per layer forward at several EP sizes (default)")
    host.add_argument("--ep", type=int, nargs="+", default=[8, 64, 256])
    host.add_argument("--repeat", type=int, default=300, help="repeats of solve and plan")
    host.add_argument("--repeat-device", type=int, default=30, help="repeats of the rest")
    host.add_argument("--seed", type=int, default=0)
    host.add_argument("--json", type=str, default=None, help="also write the figures to this file")
    _layer_arguments(parts.add_parser("layer", help="stock and MicroEP layers on EP CPU ranks"))
    return p


def _finish(figures: dict, path: str | None) -> int:
    figures["machine"] = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )
    figures["load_average_1min"] = os.getloadavg()[0]
    print(f"  machine: {figures['machine']}; 1-minute load average at the end {figures['load_average_1min']:.1f}")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("host", "layer", "-h", "--help"):
        argv = ["host", *argv]
    args = _parser().parse_args(argv)
    if args.part == "host":
        result = host_part(args)
        _print_host(result, args)
        return _finish({"config": vars(args), **result}, args.json)
    if args.redundant_slots >= args.experts // args.ep:
        print(
            f"bench_dispatcher: --redundant-slots must be < experts per rank ({args.experts // args.ep})",
            file=sys.stderr,
        )
        return 2
    from megatron_microep.glue.distributed import spawn_gloo

    result = spawn_gloo(_rank, args.ep, args, timeout_s=1800)[0]
    rows = np.array(result["rows"])
    med = {
        name: float(np.median(rows[:, i]))
        for i, name in enumerate(
            [
                "stock_s",
                "microep_s",
                "sched_s",
                "gather_s",
                "solve_s",
                "split_s",
                "max_before",
                "mean_before",
                "max_after",
                "mean_after",
                "remote_before",
                "remote_after",
                "replica_tokens",
            ]
        )
    }
    share = rows[:, 2] / rows[:, 1]
    figures = {
        "config": vars(args),
        "replicas": result["replicas"],
        "placement": result["placement"],
        "stock_layer_ms": 1e3 * med["stock_s"],
        "microep_layer_ms": 1e3 * med["microep_s"],
        "microep_over_stock": float(np.median(rows[:, 1] / rows[:, 0])),
        "scheduling_ms": 1e3 * med["sched_s"],
        "count_gather_ms": 1e3 * med["gather_s"],
        "solve_ms": 1e3 * med["solve_s"],
        "split_ms": 1e3 * med["split_s"],
        "count_gather_alone_ms": 1e3 * result["gather_alone_s"],
        "host_reads_per_layer": result["host_reads"],
        "scheduling_share_of_layer": float(np.median(share)),
        "imbalance_before": float(np.median(rows[:, 6] / rows[:, 7])),
        "imbalance_after": float(np.median(rows[:, 8] / rows[:, 9])),
        "remote_tokens_before": med["remote_before"],
        "remote_tokens_after": med["remote_after"],
        "replica_tokens": med["replica_tokens"],
    }
    print(
        f"MicroEP dispatcher, EP={args.ep}, {args.experts} experts, top-{args.topk}, {args.tokens} tokens/rank, "
        f"H={args.hidden}, F={args.ffn}, R={args.redundant_slots} ({figures['replicas']} replicas placed by "
        f"{args.planner}), skew {args.skew}; medians of {args.iters} micro-batches (slowest rank)"
    )
    print(
        f"  layer fwd+bwd: stock alltoall {figures['stock_layer_ms']:.1f} ms, MicroEP {figures['microep_layer_ms']:.1f} ms "
        f"(ratio {figures['microep_over_stock']:.2f})"
    )
    print(
        f"  scheduling: {figures['scheduling_ms']:.2f} ms = count exchange {figures['count_gather_ms']:.2f} + solve "
        f"{figures['solve_ms']:.2f} + own tables {figures['split_ms']:.2f}; {100 * figures['scheduling_share_of_layer']:.1f}% "
        f"of the MicroEP layer time (the count gather alone, after a barrier: "
        f"{figures['count_gather_alone_ms']:.2f} ms)"
    )
    print(
        f"  GPU load max/mean: before {figures['imbalance_before']:.3f}, after {figures['imbalance_after']:.3f}; "
        f"remote tokens {figures['remote_tokens_before']:.0f} -> {figures['remote_tokens_after']:.0f}; "
        f"replicas carried {figures['replica_tokens']:.0f} tokens"
    )
    for name, reads in result["host_reads"].items():
        print(
            f"  host reads per layer ({name}, rank 0): forward {reads['forward']['boundary']} boundary + "
            f"{reads['forward']['reads']}, backward {reads['backward']['boundary']} boundary + {reads['backward']['reads']}"
        )
    return _finish(figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
