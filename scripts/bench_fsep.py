#!/usr/bin/env python
"""FSEP per-rank expert memory and communication per step, computed for full-size layers and measured on CPU.

Computed (per EP rank, per MoE layer; bf16 parameters, fp32 main gradients, fp32 master parameters
and two Adam moments, i.e. 2 + 4 + 12 bytes per stored parameter) for a Mixtral-8x7B-like and a
DeepSeek-V3-like layer under three modes with the same slots per rank:
- stock EP: n = E/G experts per rank;
- replica mode (MicroEP, ``--microep-redundant-slots R``): stock plus R replica weight copies held
  for the step and their gradients during the backward;
- FSEP (C = n + R slots): 1/G of every expert (as much as stock) plus the gathered copies: under
  ``keep`` C copies per MoE layer from its forward to its backward (so all layers of a micro-batch at
  the peak), under ``regather`` those of the layer being computed and one prefetched; plus the
  copies' gradients during one layer's backward.
Communication per step per rank, in LAER's accounting: token all-to-all (dispatch and combine,
forward and backward), parameter gathers (FSEP: per micro-batch), gradient returns.

Measured: 4 CPU ranks (gloo) build small layers of the same shapes scaled down, with real tensors:
stock experts with main gradients and Adam on fp32 master copies, replica weights fetched with
MicroEP's ``ReplicaExchange``, FSEP shards with the same, and ``--layers`` FSEP layers run forward
and backward under each policy; memory is summed from tensor sizes and the gathered-copy peak is
measured by ``runtime.fsep.GatheredMemory``; bytes sent are counted at ``all_to_all_single`` and by the
runtime's own counters. Each measured figure is printed with the formula's value for the same shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

PARAM_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 4, 12


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    ffn: int
    experts: int
    topk: int
    ep: int
    redundant: int
    tokens: int  # tokens per rank per micro-batch
    micro_batches: int
    layers: int  # MoE layers of one pipeline stage

    @property
    def per_rank(self) -> int:
        return self.experts // self.ep

    @property
    def slots(self) -> int:
        return self.per_rank + self.redundant

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.ffn  # gated: fc1 [2F, H], fc2 [H, F]


FULL = (
    Shape(
        "Mixtral-8x7B-like",
        hidden=4096,
        ffn=14336,
        experts=8,
        topk=2,
        ep=8,
        redundant=1,
        tokens=4096,
        micro_batches=8,
        layers=8,
    ),
    Shape(
        "DeepSeek-V3-like",
        hidden=7168,
        ffn=2048,
        experts=256,
        topk=8,
        ep=64,
        redundant=1,
        tokens=4096,
        micro_batches=8,
        layers=8,
    ),
)
SMALL = (
    Shape(
        "Mixtral-8x7B-like, small",
        hidden=64,
        ffn=224,
        experts=8,
        topk=2,
        ep=4,
        redundant=1,
        tokens=64,
        micro_batches=2,
        layers=3,
    ),
    Shape(
        "DeepSeek-V3-like, small",
        hidden=112,
        ffn=32,
        experts=32,
        topk=8,
        ep=4,
        redundant=1,
        tokens=64,
        micro_batches=2,
        layers=3,
    ),
)


def memory(s: Shape) -> dict:
    """Bytes per rank: persistent (params + main grads + optimizer) and transient, per mode."""
    P = s.expert_params
    persistent = s.per_rank * P * (PARAM_BYTES + GRAD_BYTES + OPTIMIZER_BYTES)
    copies = s.slots * P * PARAM_BYTES
    return {
        "stock_persistent": persistent,
        "replica_persistent": persistent,
        "replica_step": s.layers * s.redundant * P * PARAM_BYTES,  # replica weights, every layer, whole step
        "replica_backward": s.redundant * P * PARAM_BYTES,  # one layer's replica gradients
        "fsep_persistent": persistent,
        # Every layer's copies between its forward and backward, plus the next layer's received shards.
        "fsep_keep_peak": (s.layers + 1) * copies,
        # The layer being computed (received shards and assembled copies) and one prefetched.
        "fsep_regather_peak": 3 * copies,
        "fsep_backward": copies,  # one layer's copies' gradients
    }


def communication(s: Shape) -> dict:
    """Bytes sent per step per rank (all MoE layers of the stage), LAER's three parts.

    Tokens: every routed token copy leaves its rank with probability (G-1)/G (uniform routing),
    four all-to-alls (dispatch, combine; forward, backward) of hidden-size bf16 rows.
    """
    G, P = s.ep, s.expert_params
    per_mb_tokens = 4 * s.tokens * s.topk * (G - 1) / G * s.hidden * 2
    gather = s.slots * (G - 1) / G * P * PARAM_BYTES  # this rank's shards of other ranks' copies (balanced layout)
    out = {"tokens": s.layers * s.micro_batches * per_mb_tokens}
    out["fsep_keep_gathers"] = s.layers * s.micro_batches * gather
    out["fsep_regather_gathers"] = 2 * out["fsep_keep_gathers"]
    out["laer_gathers"] = out["fsep_regather_gathers"]  # LAER gathers before forward and backward
    out["fsep_grad_return"] = s.layers * s.micro_batches * gather
    # Replica mode: each replica fetched once per step and its gradient returned once per step.
    out["replica_refresh"] = s.layers * s.redundant * P * PARAM_BYTES
    out["replica_grad_return"] = out["replica_refresh"]
    return out


# --- measured (CPU ranks) -------------------------------------------------------------------------


def _measure_rank(rank: int, world: int, shape: Shape, seed: int):
    import torch.distributed as dist
    import torch.nn.functional as F

    from megatron_microep.planning.fsep_layout import greedy_layout, placement_from_holds
    from megatron_microep.planning.placement import Placement
    from megatron_microep.runtime.experts import ExpertMath, ExpertWeights, loop_experts
    from megatron_microep.runtime.fsep import (
        GatheredMemory,
        ShardExchange,
        ShardSpec,
        TrafficCounter,
        fsep_layout,
        run_sharded_experts,
        shards_from_experts,
    )
    from megatron_microep.runtime.layout import PhysicalLayout
    from megatron_microep.runtime.replicas import ReplicaExchange

    torch.manual_seed(seed + rank)
    G, n, H, Fh = world, shape.per_rank, shape.hidden, shape.ffn
    shapes = [(2 * Fh, H), (H, Fh)]
    dtype = torch.bfloat16
    home = [[torch.randn(s, dtype=dtype) * 0.05 for s in shapes] for _ in range(n)]

    def persistent(params):
        """Bytes of params, fp32 main grads and Adam on fp32 master params after one step."""
        masters = [p.detach().float().requires_grad_(True) for p in params]
        adam = torch.optim.Adam(masters, lr=1e-3)
        for m in masters:
            m.grad = torch.zeros_like(m)
        adam.step()
        main_grads = [torch.zeros(p.shape, dtype=torch.float32) for p in params]
        state = sum(t.nbytes for st in adam.state.values() for t in st.values() if torch.is_tensor(t) and t.dim())
        return (
            sum(p.nbytes for p in params),
            sum(g.nbytes for g in main_grads),
            sum(m.nbytes for m in masters) + state,
        )

    out = {"stock": persistent([t for expert in home for t in expert])}

    # Replica mode: R replica slots per rank, each holding a copy of a hot expert homed elsewhere.
    lists = [[e * G // shape.experts] for e in range(shape.experts)]
    for g in range(G):
        for j in range(shape.redundant):
            lists[((g + 1) % G * n + j) % shape.experts].append(g)
    layout = PhysicalLayout.build(Placement.from_lists(lists, G), n, shape.redundant)
    exchange = ReplicaExchange(layout, rank, [torch.Size(s) for s in shapes])
    replicas = exchange.start_fetch(home, dist.group.WORLD).wait()
    out["replica_weights"] = replicas.nbytes

    # FSEP: shards, their persistent state, and a step of `layers` layers per policy.
    spec = ShardSpec(shapes, [2, 1], G)
    shards = shards_from_experts(home, spec, rank, dist.group.WORLD)
    out["fsep"] = persistent([shards])
    rng = np.random.default_rng(seed)
    loads = rng.poisson(shape.tokens * rng.lognormal(0, 1, shape.experts), (4, shape.experts)).astype(np.int64)
    fsep_placement = placement_from_holds(greedy_layout(loads, G, shape.slots))
    flayout = fsep_layout(fsep_placement, shape.slots)
    math = ExpertMath(activation=F.silu, gated=True)
    sent_at_a2a = [0]
    original = dist.all_to_all_single

    def counted(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if input_split_sizes is not None:
            own = sum(input_split_sizes[:rank]), input_split_sizes[rank]
            sent_at_a2a[0] += (input.numel() - own[1]) * input.element_size()
        return original(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    for policy in ("keep", "regather"):
        memory_tracker, traffic = GatheredMemory(), TrafficCounter()
        params = [shards.clone().requires_grad_(True) for _ in range(shape.layers)]
        exchanges = [ShardExchange(flayout, rank, dist.group.WORLD, spec, traffic, memory_tracker) for _ in params]
        rows = [shape.tokens * shape.topk // shape.slots] * exchanges[0].num_local
        sent_at_a2a[0] = 0
        dist.all_to_all_single = counted
        try:
            for _ in range(shape.micro_batches):
                # As FSEPMoELayer prefetches: the next layer's gather starts before this layer computes,
                # and under regather each backward starts the previous layer's gather.
                forward, backward = {}, {}

                def start(store, index):
                    if 0 <= index < len(params):
                        store[index] = exchanges[index].start_gather(params[index])

                def regather(index):
                    def callback():
                        own = backward.pop(index, None) or exchanges[index].start_gather(params[index])
                        start(backward, index - 1)
                        return own

                    return callback

                x = torch.randn(sum(rows), H, dtype=dtype, requires_grad=True)
                probs = torch.rand(sum(rows), dtype=dtype)
                y = x
                for index, (param, ex) in enumerate(zip(params, exchanges)):

                    def run(a, p, tensors, ex=ex):
                        weights = [ExpertWeights(tensors[0][j], tensors[1][j]) for j in range(ex.num_local)]
                        return loop_experts(a, rows, p, weights, math)

                    pending = forward.pop(index, None) or ex.start_gather(param)
                    start(forward, index + 1)
                    y = run_sharded_experts(policy, y, probs, param, ex, run, pending, regather(index))
                y.float().sum().backward()
        finally:
            dist.all_to_all_single = original
        out[f"{policy}_peak"] = memory_tracker.peak
        out[f"{policy}_traffic"] = traffic.snapshot()
        out[f"{policy}_a2a_sent"] = sent_at_a2a[0]
        out[f"{policy}_copies"] = int(flayout.placement.slots_per_gpu()[rank])
    out["slots_total"] = int(flayout.placement.num_slots)
    return out


def measure(shape: Shape, seed: int) -> list:
    from megatron_microep.glue.distributed import spawn_gloo

    return spawn_gloo(_measure_rank, shape.ep, shape, seed, timeout_s=600)


def _kib(x: float) -> str:
    return f"{x / 2**10:,.1f}"


def _gib(x: float) -> str:
    return f"{x / 2**30:,.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write every figure to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}",
        "computed": {},
        "measured": {},
    }

    print("## Computed, per EP rank, full-size layers (bf16 params, fp32 main grads, fp32 master + Adam)\n")
    print(
        "| layer | E | EP | slots C = n + R | stock EP (GiB) | replica mode: persistent + step + backward (GiB) |"
        " FSEP: persistent + keep peak / regather peak + backward (GiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for s in FULL:
        m = memory(s)
        report["computed"][s.name] = {"shape": asdict(s), "memory": m, "communication": communication(s)}
        print(
            f"| {s.name} ({s.layers} MoE layers per stage) | {s.experts} | {s.ep} | {s.per_rank} + {s.redundant} |"
            f" {_gib(s.layers * m['stock_persistent'])} |"
            f" {_gib(s.layers * m['replica_persistent'])} + {_gib(m['replica_step'])} + {_gib(m['replica_backward'])} |"
            f" {_gib(s.layers * m['fsep_persistent'])} + {_gib(m['fsep_keep_peak'])} / {_gib(m['fsep_regather_peak'])}"
            f" + {_gib(m['fsep_backward'])} |"
        )
    print("\n## Computed, bytes sent per step per rank (all MoE layers of the stage), LAER's accounting\n")
    print(
        "| layer | micro-batches x MoE layers | tokens a2a (GiB) | FSEP keep: gathers + grad return (GiB) |"
        " FSEP regather = LAER: gathers + grad return (GiB) | replica mode: refresh + grad return (GiB) |"
        " routed tokens per copy per micro-batch |"
    )
    print("|---|---|---|---|---|---|---|")
    for s in FULL:
        c = communication(s)
        print(
            f"| {s.name} | {s.micro_batches} x {s.layers} | {_gib(c['tokens'])} |"
            f" {_gib(c['fsep_keep_gathers'])} + {_gib(c['fsep_grad_return'])} |"
            f" {_gib(c['fsep_regather_gathers'])} + {_gib(c['fsep_grad_return'])} |"
            f" {_gib(c['replica_refresh'])} + {_gib(c['replica_grad_return'])} | {s.tokens * s.topk // s.slots} |"
        )

    print(f"\n## Measured on CPU (seed {args.seed}), 4 gloo ranks, small shapes; measured / formula\n")
    print("| layer | per rank | measured (KiB) | formula (KiB) | ratio |")
    print("|---|---|---|---|---|")
    for s in SMALL:
        ranks = measure(s, args.seed)
        report["measured"][s.name] = {"shape": asdict(s), "ranks": ranks}
        m, P = memory(s), s.expert_params
        rows = [
            ("stock: params + main grads + optimizer", sum(ranks[0]["stock"]), m["stock_persistent"]),
            ("FSEP: params + main grads + optimizer", sum(ranks[0]["fsep"]), m["fsep_persistent"]),
            ("replica mode: replica weights (1 layer)", ranks[0]["replica_weights"], s.redundant * P * PARAM_BYTES),
        ]
        for policy in ("keep", "regather"):
            copies = max(r[f"{policy}_copies"] for r in ranks)
            peak = max(r[f"{policy}_peak"] for r in ranks)
            formula = ((s.layers + 1) if policy == "keep" else 3) * copies * P * PARAM_BYTES
            rows.append(
                (f"FSEP {policy}: peak of gathered copies and received shards, {s.layers} layers", peak, formula)
            )
        for label, measured, formula in rows:
            print(f"| {s.name} | {label} | {_kib(measured)} | {_kib(formula)} | {measured / formula:.3f} |")
        for policy in ("keep", "regather"):
            gathers = s.micro_batches * s.layers * (1 if policy == "keep" else 2)
            for rank, r in enumerate(ranks):
                t = r[f"{policy}_traffic"]
                own = r[f"{policy}_copies"]
                expected_gather = gathers * (r["slots_total"] - own) * P // s.ep * PARAM_BYTES
                expected_return = s.micro_batches * s.layers * own * (s.ep - 1) * P // s.ep * PARAM_BYTES
                if (t["gather_sent"], t["grad_sent"]) != (expected_gather, expected_return):
                    raise SystemExit(
                        f"{s.name} {policy} rank {rank}: counted {t}, expected gather {expected_gather} "
                        f"return {expected_return}"
                    )
                if r[f"{policy}_a2a_sent"] != t["gather_sent"] + t["grad_sent"]:
                    raise SystemExit(
                        f"{s.name} {policy} rank {rank}: all_to_all_single sent {r[f'{policy}_a2a_sent']}"
                        f" bytes, the runtime counted {t['gather_sent'] + t['grad_sent']}"
                    )
            sent = [r[f"{policy}_a2a_sent"] for r in ranks]
            print(
                f"| {s.name} | FSEP {policy}: bytes sent per step (gathers + grad return), min..max over ranks "
                f"| {_kib(min(sent))}..{_kib(max(sent))} | = layout formula on every rank | 1.000 |"
            )
    print(
        "\nPeaks: a gather's receive buffer lives from its start to its end; an asynchronous backend may free a "
        "finished one a little later than the wait, which can add one layer's copies to a measured peak."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
