"""Token and weight exchange on 4 CPU ranks (2 expert-TP x 2 EP, gloo), without Megatron.

One launch runs every check: uneven all-gather / reduce-scatter and their gradients, and a full
dispatch -> identity experts -> combine round trip on skewed routing with replicas, forward and
backward (replica weights and gradients: test_replicas_gloo.py).
Seeds are fresh per run and printed.
"""

import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_microep.glue.distributed import spawn_gloo
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.plan import HistoryPlanner, PlannerSettings, PlanTarget
from megatron_microep.runtime import dispatch
from megatron_microep.runtime.collectives import all_gather_uneven, reduce_scatter_uneven
from megatron_microep.runtime.layout import PhysicalLayout
from megatron_microep.runtime.planner_pool import planner_process
from megatron_microep.runtime.replan import PlacementController, decode_placement, encode_placement

ETP, EP = 2, 2
EXPERTS_PER_RANK, REDUNDANT = 2, 1
HIDDEN = 6


def _groups():
    rank = dist.get_rank()
    etp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    ep_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return dispatch.Groups(
        ep=ep_groups[rank % ETP],
        etp=etp_groups[rank // ETP],
        tp_ep=dist.group.WORLD,
        ep_rank=rank // ETP,
        ep_size=EP,
        etp_rank=rank % ETP,
        etp_size=ETP,
    )


def _check_collectives(groups, seed):
    sizes = [3, 5]
    gen = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(s, HIDDEN, generator=gen, dtype=torch.float64) for s in sizes]
    weight = torch.randn(sum(sizes), HIDDEN, generator=gen, dtype=torch.float64)
    mine = chunks[groups.etp_rank].clone().requires_grad_(True)
    gathered = all_gather_uneven(mine, sizes, groups.etp)
    (gathered * weight).sum().backward()
    start = sum(sizes[: groups.etp_rank])
    # Every expert-TP rank used the same weight, so the gradient of my rows is ETP x my slice.
    grad_ok = torch.allclose(mine.grad, ETP * weight[start : start + sizes[groups.etp_rank]])
    full = torch.randn(
        sum(sizes), HIDDEN, generator=torch.Generator().manual_seed(seed + dist.get_rank()), dtype=torch.float64
    ).requires_grad_(True)
    reduced = reduce_scatter_uneven(full, sizes, groups.etp)
    everyone = [torch.zeros_like(full) for _ in range(ETP)]
    dist.all_gather(everyone, full.detach(), group=groups.etp)
    expected = sum(everyone)[start : start + sizes[groups.etp_rank]]
    reduced.sum().backward()
    return {
        "gather_ok": torch.equal(gathered.detach(), torch.cat(chunks)),
        "gather_grad_ok": grad_ok,
        "reduce_ok": torch.allclose(reduced.detach(), expected),
        "reduce_grad_ok": torch.equal(full.grad, torch.ones_like(full)),
    }


def _check_round_trip(groups, seed):
    # 4 experts on 2 EP ranks; experts 0 and 1 (rank 0) are hot; 0 is replicated on rank 1.
    placement = Placement.from_lists([[0, 1], [0], [1], [1]], EP)
    layout = PhysicalLayout.build(placement, EXPERTS_PER_RANK, REDUNDANT)
    gen = torch.Generator().manual_seed(seed + 101 * dist.get_rank())
    num_tokens, topk = 24, 2
    logits = torch.randn(num_tokens, EP * EXPERTS_PER_RANK, generator=gen)
    logits[:, :2] += 2.0
    top = torch.topk(logits, topk, dim=1).indices
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
    probs = (torch.softmax(logits, dim=1) * routing_map).double().requires_grad_(True)
    x = torch.randn(num_tokens, HIDDEN, generator=gen, dtype=torch.float64, requires_grad=True)

    routing = dispatch.route(routing_map, layout, groups)
    tokens, p = dispatch.permute(x, probs, routing)
    tokens, p = dispatch.exchange(tokens, p, routing, groups)
    tokens, per_slot, p = dispatch.regroup(tokens, p, routing, groups)
    out = tokens * p.unsqueeze(-1)  # identity experts, probabilities applied as Megatron does
    out = dispatch.ungroup(out, routing, groups, torch.float64)
    out = dispatch.exchange_back(out, routing, groups)
    out = dispatch.unpermute(out, routing, num_tokens)
    upstream = torch.randn(num_tokens, HIDDEN, generator=gen, dtype=torch.float64)
    (out * upstream).sum().backward()
    # Every expert-TP rank runs the (identity) expert on all rows; their partial sums add up.
    mass = probs.detach().sum(dim=1, keepdim=True)
    expected_prob_grad = ETP * (x.detach() * upstream).sum(dim=1, keepdim=True) * routing_map
    return {
        "out_err": (out.detach() - ETP * x.detach() * mass).abs().max().item(),
        "x_grad_err": (x.grad - ETP * upstream * mass).abs().max().item(),
        "prob_grad_err": (probs.grad - expected_prob_grad).abs().max().item(),
        "rows_here": int(per_slot.sum()),
        "per_slot": per_slot.tolist(),
        "replica_rows": int(per_slot[EXPERTS_PER_RANK:].sum()),
        "routed_here": int(routing_map.sum()),
        "max_before": int(routing.counts.sum(axis=0).sum(axis=0).reshape(EP, -1).sum(axis=1).max()),
        "max_after": int(routing.schedule.max_load),
    }


GREEDY = PlannerSettings("greedy", 1.0, 0.0, None, 0, 1, 0.0, True)


def _check_replanning(groups):
    """Controller over the whole expert domain (tp_ep): plan from history in the planner rank's
    planner process (layer 2: rank 1 of tp_ep), adopt on every rank."""
    stock = PhysicalLayout.stock(EP, EXPERTS_PER_RANK, REDUNDANT)
    hot = np.array([90, 5, 5, 0], dtype=np.int64)  # expert 0 (EP rank 0) is hot
    events = {}

    def run(planner, steps):
        controller = PlacementController(
            stock,
            planner,
            replan_interval=2,
            history_window=4,
            replan_lag=1,
            group=groups.tp_ep,
            device=torch.device("cpu"),
            layer_number=2,
        )
        adopted = []
        for step in steps:
            layout = controller.on_step(step)
            adopted.append(None if layout is None else layout.placement.to_lists())
            for _ in range(2):
                controller.record(hot)
        return controller, adopted

    controller, adopted = run(HistoryPlanner(PlanTarget("replicas", EP, REDUNDANT), GREEDY), [1, 2, 3, 4, 5])
    events["adopted"] = adopted
    events["version"] = controller.version
    events["history_rows"] = controller.history().shape[0]
    events["planner_rank"] = controller.is_planner
    events["planner_process"] = planner_process().pid is not None

    # More replica slots than any GPU can use: the planner process raises.
    broken = HistoryPlanner(PlanTarget("replicas", EP, EP * EXPERTS_PER_RANK), GREEDY)
    controller, adopted = run(broken, [1, 2, 3])
    events["after_failure"] = (adopted, controller.version, controller.layout.placement.to_lists())
    return events


def _exchange_rank(rank, world_size, seed):
    torch.manual_seed(seed)
    groups = _groups()
    return {
        "collectives": _check_collectives(groups, seed),
        "round_trip": _check_round_trip(groups, seed),
        "replanning": _check_replanning(groups),
    }


@pytest.fixture(scope="module")
def results():
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"exchange test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return spawn_gloo(_exchange_rank, ETP * EP, seed, timeout_s=300)


def test_uneven_collectives_and_gradients(results):
    for rank, res in enumerate(results):
        assert all(res["collectives"].values()), f"rank {rank}: {res['collectives']}"


def test_round_trip_restores_tokens_and_gradients(results):
    for rank, res in enumerate(results):
        rt = res["round_trip"]
        assert rt["out_err"] < 1e-12 and rt["x_grad_err"] < 1e-12 and rt["prob_grad_err"] < 1e-12, (rank, rt)


def test_round_trip_conserves_tokens_and_uses_the_replica(results):
    routed = sum(r["round_trip"]["routed_here"] for r in results)
    # Expert-TP ranks of one EP rank process the same rows; count each EP rank once.
    processed = sum(results[g * ETP]["round_trip"]["rows_here"] for g in range(EP))
    assert processed == routed
    assert results[ETP]["round_trip"]["replica_rows"] > 0  # EP rank 1 ran tokens of expert 0
    rt = results[0]["round_trip"]
    assert rt["max_after"] < rt["max_before"]


def test_replanning_adopts_one_placement_everywhere_at_the_step_boundary(results):
    events = [r["replanning"] for r in results]
    assert all(e["adopted"] == events[0]["adopted"] for e in events)
    adopted = events[0]["adopted"]
    # Planned at step 2 (history of step 1), adopted at step 3 = 2 + lag; planned again at 4, adopted at 5.
    assert [a is not None for a in adopted] == [False, False, True, False, True]
    assert adopted[2][0] == [0, 1]  # the hot expert got its replica on the other EP rank
    assert all(e["version"] == 2 for e in events)
    assert all(e["history_rows"] == 8 for e in events)  # 4 completed steps x 2 micro-batches, on every rank
    # Layer 2 is planned by rank 1 of the domain; only that rank started a planner process.
    assert [e["planner_rank"] for e in events] == [False, True, False, False]
    assert [e["planner_process"] for e in events] == [False, True, False, False]


def test_failed_planning_keeps_the_placement_on_every_rank(results):
    for r in results:
        adopted, version, placement = r["replanning"]["after_failure"]
        assert adopted == [None, None, None] and version == 0
        assert placement == [[0], [0], [1], [1]]


def test_placement_broadcast_encoding_round_trips():
    placement = Placement.from_lists([[0, 1, 3], [0], [1, 2], [2], [3, 0]], 4)
    buffer = encode_placement(placement, 5, 5 + 4 * 2)
    assert decode_placement(buffer, 5, 4).to_lists() == placement.to_lists()
