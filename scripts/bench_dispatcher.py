#!/usr/bin/env python
"""Per-micro-batch cost of MicroEP scheduling inside a real MoE layer, and the balance it buys.

Launches EP CPU ranks (gloo) that each build Megatron's stock MoELayer (alltoall dispatcher) and a
MicroEPMoELayer with the same weights. Routing is skewed with a Zipf-shaped router expert bias
(sigmoid router) over a seeded random permutation of experts. The MicroEP layer records routing
history for ``--warmup-steps`` steps, re-plans its placement with the chosen planner (in its
background thread) and adopts it; then both layers run ``--iters`` forward+backward passes on the
same inputs, timed per micro-batch (the slowest rank counts, as in a collective).

Printed (medians over iterations): stock and MicroEP layer time, the scheduling overhead (count
all-gather + exact solve + split computation, also per phase) and its share of the MicroEP layer
time, GPU max/mean load before (stock placement) and after (MicroEP schedule), remote tokens and
replica tokens. On an oversubscribed CPU the ranks share cores, so layer times measure total work,
not the slowest GPU: the balance figures are the ones to read for speed-ups.
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    return p


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
    }


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
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
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, Python {platform.python_version()}",
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
        "load_average_1min": os.getloadavg()[0],
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
        f"  scheduling: {figures['scheduling_ms']:.2f} ms = count gather {figures['count_gather_ms']:.2f} + solve "
        f"{figures['solve_ms']:.2f} + split {figures['split_ms']:.2f}; {100 * figures['scheduling_share_of_layer']:.1f}% "
        f"of the MicroEP layer time (the count gather alone, after a barrier: "
        f"{figures['count_gather_alone_ms']:.2f} ms)"
    )
    print(
        f"  GPU load max/mean: before {figures['imbalance_before']:.3f}, after {figures['imbalance_after']:.3f}; "
        f"remote tokens {figures['remote_tokens_before']:.0f} -> {figures['remote_tokens_after']:.0f}; "
        f"replicas carried {figures['replica_tokens']:.0f} tokens"
    )
    print(f"  machine: {figures['machine']}; 1-minute load average at the end {figures['load_average_1min']:.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
