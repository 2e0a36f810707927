"""A micro-batch's layout with burst copies (``PhysicalLayout.with_burst``) and the runtime's tables over
it, against the numpy reference plan, on fresh random instances.

``planning.burst.plan_burst`` adds copies of the micro-batch's hot experts to a persistent layout; the
runtime numbers them in burst slots after the replica slots, keeps every persistent slot's local
index (so replica weights and the experts' group order carry over), and routes with the burst plan's
schedule. A second micro-batch of the step reuses the held copies: they keep their burst slots.
"""

import numpy as np
import pytest
import torch
from test_routing import SEED, routed_case

from megatron_microep.planning.burst import plan_burst
from megatron_microep.runtime import dispatch
from megatron_microep.runtime.routing import rank_plan, rank_tables, source_slot_counts


@pytest.fixture(scope="module")
def rng():
    print(f"burst layout test seed: {SEED} (rerun with MICROEP_TEST_SEED={SEED})")
    return np.random.default_rng(SEED + 15)


def _check_numbering(burst_layout, layout, plan, slots):
    n, R = layout.experts_per_rank, layout.redundant_slots
    placement = burst_layout.placement
    assert burst_layout.local_slots == n + R + slots
    for r in range(placement.num_slots):
        assert burst_layout.local_slot[placement.gpus[r], burst_layout.slot_local[r]] == r
    # Persistent slots keep their local index; slots beyond n + R hold exactly the plan's copies.
    for e in range(placement.num_experts):
        base = range(layout.placement.ptr[e], layout.placement.ptr[e + 1])
        for offset, r in enumerate(base):
            assert burst_layout.slot_local[placement.ptr[e] + offset] == layout.slot_local[r]
    held = {
        (int(burst_layout.slot_expert[r]), int(placement.gpus[r]), int(burst_layout.slot_local[r]) - n - R)
        for r in range(placement.num_slots)
        if burst_layout.slot_local[r] >= n + R
    }
    assert held == {(int(e), int(g), int(s)) for (e, g), s in zip(plan.copies, plan.burst_slot())}
    assert (burst_layout.local_slot >= 0).sum() == placement.num_slots


@pytest.mark.parametrize("trial", range(20))
def test_burst_layouts_route_every_pair_as_the_reference(rng, trial):
    G = int(rng.integers(2, 6))
    n = int(rng.integers(1, 4))
    R = int(rng.integers(0, n))
    T = int(rng.choice([1, 2]))
    topk = int(rng.integers(1, min(3, G * n) + 1))
    slots = int(rng.integers(1, 3))
    layout, maps, counts = routed_case(rng, G, n, R, T, tokens=16, topk=topk)
    E = layout.placement.num_experts
    held = np.zeros((0, 2), dtype=np.int64)
    held_slots = np.zeros(0, dtype=np.int64)
    bursts = 0
    for micro_batch in range(2):  # the second reuses the first's copies
        if micro_batch:
            counts = counts[:, :, rng.permutation(E)]  # other hot experts
        plan = plan_burst(counts.sum(axis=0), layout.placement, held, slots, None, 1.0)
        np.testing.assert_array_equal(plan.copies[: len(held)], held)
        np.testing.assert_array_equal(plan.burst_slot()[: len(held)], held_slots)
        held, held_slots = plan.copies, plan.burst_slot()
        if not len(plan.copies):
            continue
        bursts += 1
        burst_layout = layout.with_burst(plan.placement, plan.copies, plan.burst_slot(), slots)
        _check_numbering(burst_layout, layout, plan, slots)
        per_source = source_slot_counts(counts, plan.schedule, burst_layout)
        for (t, g), routing_map in maps.items():
            ref = rank_plan(per_source, burst_layout, t, g)
            order = rng.permutation(burst_layout.local_slots).astype(np.int64)
            tables = rank_tables(counts, plan.schedule, burst_layout, t, g, order)
            np.testing.assert_array_equal(tables.send_counts, per_source[t, g])
            assert tables.input_splits == ref.input_splits.tolist()
            assert tables.output_splits == ref.output_splits.tolist()
            assert tables.group_rows == ref.tokens_per_slot[order].tolist()
            if micro_batch == 0:
                maps_ = dispatch.build_index_maps(dispatch.order_pairs(routing_map, topk), tables, E)
                pairs = routing_map.t().nonzero()
                sent = pairs[torch.from_numpy(ref.send_pairs)]
                assert torch.equal(maps_.send_tokens.long(), sent[:, 1])
    print(f"trial {trial}: {bursts} micro-batches with burst copies")
