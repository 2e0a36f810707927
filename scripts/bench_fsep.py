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
FSEP's buffers per layer and micro-batch (send and receive buffers of the gather and of the gradient
return, the assembled copies, the converted rows, the placeholder gradient) come from
``runtime.fsep.fsep_buffer_bytes``, the formula tests/runtime/test_fsep_gloo.py checks against an
allocation-accounting run. Communication per step per rank, in LAER's accounting: token all-to-all
(dispatch and combine, forward and backward), parameter gathers (FSEP: per micro-batch), gradient
returns.

Measured: 4 CPU ranks (gloo) build small layers of the same shapes scaled down, with real tensors:
stock experts with main gradients and Adam on fp32 master copies, replica weights fetched with
MicroEP's ``ReplicaExchange``, FSEP shards with the same, and ``--layers`` FSEP layers run forward
and backward under each policy; memory is summed from tensor sizes and the peak of gathered copies
and receive buffers is measured by ``runtime.fsep.GatheredMemory``; bytes are measured by a spy on
torch.distributed (what each rank hands to the shard group's all-to-alls) and compared with the
simulator cost model's FSEP charge (``CostModel.fsep_rank_bytes``) for the same layouts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

from megatron_microep.planning.placement import Placement
from megatron_microep.simulator.cost import FSEP_MEMORY_POLICY_CHARGES, CostModel

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


def fsep_buffers(s: Shape) -> dict:
    """FSEP's buffers per layer and micro-batch on rank 0 of a balanced layout (every rank C copies):
    ``runtime.fsep.fsep_buffer_bytes`` for bf16 shards and fp32 main gradients."""
    from megatron_microep.runtime.fsep import ShardSpec, fsep_buffer_bytes, fsep_layout, initial_fsep_placement

    spec = ShardSpec([(2 * s.ffn, s.hidden), (s.hidden, s.ffn)], [2, 1], s.ep)
    layout = fsep_layout(initial_fsep_placement(s.experts, s.ep, s.slots), s.slots)
    return fsep_buffer_bytes(layout, 0, spec, PARAM_BYTES, GRAD_BYTES)


def memory(s: Shape) -> dict:
    """Bytes per rank: persistent (params + main grads + optimizer) and transient, per mode."""
    P = s.expert_params
    persistent = s.per_rank * P * (PARAM_BYTES + GRAD_BYTES + OPTIMIZER_BYTES)
    b = fsep_buffers(s)
    # A layer's forward transient: its receive buffer while assembling, and the next layer's gather in flight.
    forward_transient = b["gather_recv"] + b["gather_send"] + b["gather_recv"]
    return {
        "stock_persistent": persistent,
        "replica_persistent": persistent,
        "replica_step": s.layers * s.redundant * P * PARAM_BYTES,  # replica weights, every layer, whole step
        "replica_backward": s.redundant * P * PARAM_BYTES,  # one layer's replica gradients
        "fsep_persistent": persistent,
        # Every layer's copies kept for its backward, plus one layer's forward transient.
        "fsep_keep_peak": s.layers * b["copies"] + forward_transient,
        # The layer being computed (its copies and forward transient); nothing kept.
        "fsep_regather_peak": b["copies"] + forward_transient,
        # One layer's backward: the copies' gradients (the expert GEMMs') and the return's peak.
        "fsep_backward": b["copies"] + b["backward_peak"],
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
    from megatron_microep.runtime.comm_spy import CollectiveSpy
    from megatron_microep.runtime.experts import ExpertMath, ExpertWeights, loop_experts
    from megatron_microep.runtime.fsep import (
        GatheredMemory,
        ShardExchange,
        ShardGradients,
        ShardSpec,
        attach_shard_gradients,
        fsep_layout,
        run_sharded_experts,
        shard_group,
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
    group = shard_group(dist.group.WORLD)
    shards = shards_from_experts([torch.stack([e[i] for e in home]) for i in range(len(shapes))], spec, group)
    out["fsep"] = persistent([shards])
    rng = np.random.default_rng(seed)
    loads = rng.poisson(shape.tokens * rng.lognormal(0, 1, shape.experts), (4, shape.experts)).astype(np.int64)
    fsep_placement = placement_from_holds(greedy_layout(loads, G, shape.slots))
    flayout = fsep_layout(fsep_placement, shape.slots)
    math = ExpertMath(activation=F.silu, gated=True)
    spy = CollectiveSpy()
    for policy in ("keep", "regather"):
        memory_tracker = GatheredMemory()
        params = [shards.clone().requires_grad_(True) for _ in range(shape.layers)]
        exchanges = [
            ShardExchange(flayout, rank, group, spec, torch.device("cpu"), memory=memory_tracker) for _ in params
        ]
        rows = [shape.tokens * shape.topk // shape.slots] * exchanges[0].num_local
        start_call = len(spy.calls)
        with spy.active():
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

                    grads = ShardGradients()
                    y = attach_shard_gradients(y, param, grads)
                    pending = forward.pop(index, None) or ex.start_gather(param)
                    start(forward, index + 1)
                    y = run_sharded_experts(policy, y, probs, param, ex, run, grads, pending, regather(index))
                y.float().sum().backward()
        mine = [c for c in spy.calls[start_call:] if c.group is group]
        out[f"{policy}_peak"] = memory_tracker.peak
        out[f"{policy}_sent"] = sum(c.sent for c in mine)
        out[f"{policy}_received"] = sum(c.received for c in mine)
        out[f"{policy}_copies"] = int(flayout.placement.slots_per_gpu()[rank])
    out["placement"] = flayout.placement.to_lists()
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
    print(
        "\n## Computed, FSEP buffers per MoE layer and micro-batch on one rank (GiB; runtime.fsep.fsep_buffer_bytes)\n"
    )
    names = ("gather_send", "gather_recv", "copies", "return_send", "return_recv", "return_chunk", "dummy_grad")
    print("| layer | C | " + " | ".join(names) + " | forward peak | kept until backward (keep) | backward peak |")
    print("|---|---|" + "---|" * (len(names) + 3))
    for s in FULL:
        b = fsep_buffers(s)
        report["computed"][s.name]["fsep_buffers"] = b
        print(
            f"| {s.name} | {s.slots} | " + " | ".join(_gib(b[k]) for k in names) + f" | {_gib(b['forward_peak'])} |"
            f" {_gib(b['copies'])} | {_gib(b['backward_peak'])} |"
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
            model = dataclasses.replace(
                CostModel(hidden_size=s.hidden, ffn_hidden_size=s.ffn, gated=True, param_bytes=PARAM_BYTES),
                **FSEP_MEMORY_POLICY_CHARGES[policy],
            )
            for rank, r in enumerate(ranks):
                charge = model.fsep_rank_bytes(Placement.from_lists(r["placement"], s.ep))
                charged = tuple(s.micro_batches * s.layers * charge[k][rank] for k in ("sent", "received"))
                if (r[f"{policy}_sent"], r[f"{policy}_received"]) != charged:
                    raise SystemExit(
                        f"{s.name} {policy} rank {rank}: measured {r[f'{policy}_sent']} sent, "
                        f"{r[f'{policy}_received']} received; the cost model charges {charged}"
                    )
            sent = [r[f"{policy}_sent"] for r in ranks]
            print(
                f"| {s.name} | FSEP {policy}: bytes sent per step (gathers + grad return), min..max over ranks "
                f"| {_kib(min(sent))}..{_kib(max(sent))} | = cost model charge on every rank | 1.000 |"
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
