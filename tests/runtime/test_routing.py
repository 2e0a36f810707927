"""Send plans from a schedule, against a token-by-token reference, on fresh random instances; then the
runtime's per-rank tables and device index maps against that numpy reference plan (every rank,
expert-TP sources, random row-group orders).

The reference walks every source's tokens one at a time: it hands each expert's tokens of an EP rank
(expert-TP sources in order) to that rank's slot quotas in slot order. The data-movement check
then moves labelled tokens through the plan exactly as the collectives would (all-to-all over EP,
all-gather over expert-TP, regroup by local slot) and compares what each local slot receives with
what the reference assigned to it.
"""

import os

import numpy as np
import pytest
import torch

from megatron_microep.planning.placement import Placement, PlacementError, home_gpu
from megatron_microep.planning.scheduler import schedule, schedule_quotas
from megatron_microep.runtime import dispatch
from megatron_microep.runtime.layout import PhysicalLayout
from megatron_microep.runtime.routing import concat_ranges, rank_plan, rank_tables, source_slot_counts

SEED = int(os.environ.get("MICROEP_TEST_SEED", np.random.SeedSequence().entropy % 2**32))


@pytest.fixture(scope="module")
def rng():
    print(f"routing test seed: {SEED} (rerun with MICROEP_TEST_SEED={SEED})")
    return np.random.default_rng(SEED)


def random_case(rng, num_ranks, experts_per_rank, redundant_slots, etp):
    E = num_ranks * experts_per_rank
    replicas = [[home_gpu(e, E, num_ranks)] for e in range(E)]
    for g in range(num_ranks):
        for e in rng.choice(E, size=redundant_slots, replace=False):
            if g not in replicas[e] and rng.random() < 0.8:
                replicas[e].append(int(g))
    placement = Placement.from_lists(replicas, num_ranks)
    layout = PhysicalLayout.build(placement, experts_per_rank, redundant_slots)
    weights = rng.lognormal(0.0, 1.5, E)
    counts = rng.multinomial(rng.integers(0, 200), weights / weights.sum(), size=(etp, num_ranks)).astype(np.int64)
    return layout, counts


def reference_assignment(counts, sched, layout):
    """{(t, g): list of (expert, token index, slot)} in (expert, token) order, token by token."""
    T, G, E = counts.shape
    placement = layout.placement
    quota = np.zeros((G, placement.num_slots), dtype=np.int64)  # per EP rank, what each slot takes
    for e in range(E):
        slots = range(placement.ptr[e], placement.ptr[e + 1])
        if len(slots) == 1:
            quota[:, placement.ptr[e]] = counts[:, :, e].sum(axis=0)
    for s, r, n in zip(sched.piece_src, sched.piece_slot, sched.piece_count):
        quota[s, r] += n
    out = {(t, g): [] for t in range(T) for g in range(G)}
    for g in range(G):
        for e in range(E):
            slots = list(range(placement.ptr[e], placement.ptr[e + 1]))
            left = {r: int(quota[g, r]) for r in slots}
            for t in range(T):
                for token in range(counts[t, g, e]):
                    r = next(r for r in slots if left[r] > 0)
                    left[r] -= 1
                    out[(t, g)].append((e, token, r))
            assert all(v == 0 for v in left.values())
    return out


@pytest.mark.parametrize("trial", range(30))
def test_source_slot_counts_match_token_by_token_reference(rng, trial):
    G = int(rng.integers(1, 7))
    n = int(rng.integers(1, 5))
    R = int(rng.integers(0, n))
    T = int(rng.choice([1, 2, 4]))
    layout, counts = random_case(rng, G, n, R, T)
    sched = schedule(counts.sum(axis=0), layout.placement)
    per_source = source_slot_counts(counts, sched, layout)
    ref = reference_assignment(counts, sched, layout)
    for (t, g), pairs in ref.items():
        expected = np.bincount([r for _, _, r in pairs], minlength=layout.placement.num_slots)
        np.testing.assert_array_equal(per_source[t, g], expected, err_msg=f"source ({t}, {g})")
    # Conservation: sources keep their per-expert counts; slots get the scheduled totals.
    np.testing.assert_array_equal(np.add.reduceat(per_source, layout.placement.ptr[:-1], axis=2), counts)
    np.testing.assert_array_equal(per_source.sum(axis=(0, 1)), sched.slot_tokens)


@pytest.mark.parametrize("trial", range(30))
def test_rank_plans_deliver_every_pair_to_its_slot(rng, trial):
    G = int(rng.integers(1, 6))
    n = int(rng.integers(1, 4))
    R = int(rng.integers(0, n))
    T = int(rng.choice([1, 2, 3]))
    layout, counts = random_case(rng, G, n, R, T)
    sched = schedule(counts.sum(axis=0), layout.placement)
    per_source = source_slot_counts(counts, sched, layout)
    ref = reference_assignment(counts, sched, layout)
    plans = {(t, g): rank_plan(per_source, layout, t, g) for t in range(T) for g in range(G)}

    # Send: each source labels its pairs (source, expert, token) in (expert, token) order.
    sent = {}
    for (t, g), plan in plans.items():
        labels = [(t, g, e, tok) for e, tok, _ in ref[(t, g)]]
        assert plan.send_pairs.size == len(labels)
        rows = [labels[i] for i in plan.send_pairs]
        chunks, start = [], 0
        for size in plan.input_splits:
            chunks.append(rows[start : start + size])
            start += size
        sent[(t, g)] = chunks
    for (t, g), plan in plans.items():
        received = []
        for src in range(G):  # EP all-to-all: from every EP rank with the same expert-TP rank
            chunk = sent[(t, src)][g]
            assert len(chunk) == plan.output_splits[src]
            received += chunk
        assert len(received) == plan.etp_sizes[t]
        plans[(t, g)] = (plan, received)
    for (t, g), (plan, _) in plans.items():
        gathered = [row for t2 in range(T) for row in plans[(t2, g)][1]]  # expert-TP all-gather
        by_slot = [gathered[i] for i in plan.to_slot_major]
        assert sorted(plan.to_slot_major.tolist()) == list(range(len(gathered)))
        start = 0
        for j, rows in enumerate(plan.tokens_per_slot):
            got = sorted(by_slot[start : start + rows])
            start += rows
            slot = layout.local_slot[g, j]
            expected = (
                sorted((t2, src, e, tok) for (t2, src), pairs in ref.items() for e, tok, r in pairs if r == slot)
                if slot >= 0
                else []
            )
            assert got == expected, f"rank ({t}, {g}) local slot {j}"
        assert start == len(gathered)


def test_concat_ranges():
    np.testing.assert_array_equal(concat_ranges([5, 0, 9], [2, 0, 3]), [5, 6, 9, 10, 11])
    assert concat_ranges([], []).size == 0


def test_layout_numbers_replicas_after_home_experts():
    placement = Placement.from_lists([[0, 1], [0], [1], [1, 0]], 2)
    layout = PhysicalLayout.build(placement, experts_per_rank=2, redundant_slots=1)
    np.testing.assert_array_equal(layout.local_slot, [[0, 2, 5], [3, 4, 1]])
    np.testing.assert_array_equal(layout.replica_experts(0), [3])
    np.testing.assert_array_equal(layout.replica_experts(1), [0])
    assert layout.has_replicas
    assert not PhysicalLayout.stock(2, 2, 1).has_replicas


def test_layout_rejects_foreign_home_and_overfull_rank():
    with pytest.raises(PlacementError, match="Megatron homes it on rank 0"):
        PhysicalLayout.build(Placement.from_lists([[1, 0], [0], [1], [1]], 2), 2, 1)
    with pytest.raises(PlacementError, match="more than redundant_slots=1"):
        PhysicalLayout.build(Placement.from_lists([[0], [0], [1, 0], [1, 0]], 2), 2, 1)
    with pytest.raises(PlacementError, match="expected 2 per rank"):
        PhysicalLayout.build(Placement.from_lists([[0], [1], [1]], 2), 2, 1)


# --- this rank's tables and the device index maps, against the numpy reference ----------------------


def routed_case(rng, num_ranks, experts_per_rank, redundant_slots, etp, tokens, topk):
    """A layout and, per source (t, g), a routing map with exactly ``topk`` experts per token."""
    layout, _ = random_case(rng, num_ranks, experts_per_rank, redundant_slots, etp)
    E = layout.placement.num_experts
    weights = rng.lognormal(0.0, 1.5, E)
    maps = {}
    for t in range(etp):
        for g in range(num_ranks):
            n = int(rng.integers(0, tokens + 1))
            chosen = [rng.choice(E, topk, replace=False, p=weights / weights.sum()) for _ in range(n)]
            routing_map = torch.zeros(n, E, dtype=torch.bool)
            for i, experts in enumerate(chosen):
                routing_map[i, torch.from_numpy(experts)] = True
            maps[(t, g)] = routing_map
    counts = np.stack([np.stack([maps[(t, g)].sum(0).numpy() for g in range(num_ranks)]) for t in range(etp)])
    return layout, maps, counts.astype(np.int64)


@pytest.mark.parametrize("trial", range(20))
def test_rank_tables_and_index_maps_match_the_numpy_reference(rng, trial):
    G = int(rng.integers(1, 6))
    n = int(rng.integers(1, 4))
    R = int(rng.integers(0, n))
    T = int(rng.choice([1, 2, 3]))
    topk = int(rng.integers(1, min(4, G * n) + 1))
    layout, maps, counts = routed_case(rng, G, n, R, T, tokens=12, topk=topk)
    E = layout.placement.num_experts
    sched = schedule(counts.sum(axis=0), layout.placement)
    per_source = source_slot_counts(counts, sched, layout)
    for (t, g), routing_map in maps.items():
        ref = rank_plan(per_source, layout, t, g)
        order = rng.permutation(layout.local_slots).astype(np.int64)
        tables = rank_tables(counts, sched, layout, t, g, order)
        np.testing.assert_array_equal(tables.send_counts, per_source[t, g])
        assert tables.input_splits == ref.input_splits.tolist()
        assert tables.output_splits == ref.output_splits.tolist()
        assert tables.etp_sizes == ref.etp_sizes.tolist()
        assert tables.group_rows == ref.tokens_per_slot[order].tolist()

        # The runtime solves without every source's pieces: same quotas, same tables.
        quotas = schedule_quotas(counts.sum(axis=0), layout.placement)
        fast = rank_tables(counts, quotas, layout, t, g, order)
        np.testing.assert_array_equal(fast.device_table, tables.device_table)
        assert fast.received.tolist() == tables.received.tolist()

        maps_ = dispatch.build_index_maps(dispatch.order_pairs(routing_map, topk), tables, E)
        pairs = routing_map.t().nonzero()  # the reference's numbering: (expert, token)
        sent = pairs[torch.from_numpy(ref.send_pairs)]
        assert torch.equal(maps_.send_tokens.long(), sent[:, 1])
        assert torch.equal(maps_.probs_index.long(), sent[:, 1] * E + sent[:, 0])
        # token_rows[j, i]: the send row of token i's j-th expert in ascending order.
        for i in range(routing_map.shape[0]):
            rows = torch.nonzero(sent[:, 1] == i).flatten()
            rows = rows[torch.argsort(sent[rows, 0])]
            assert torch.equal(maps_.token_rows[:, i].long(), rows)
        # Grouped order: the reference's slot-major segments, taken in group order.
        ends = np.cumsum(ref.tokens_per_slot)
        segments = [ref.to_slot_major[e - c : e] for e, c in zip(ends, ref.tokens_per_slot)]
        expected = np.concatenate([segments[j] for j in order]) if segments else np.zeros(0, np.int64)
        np.testing.assert_array_equal(maps_.to_grouped.numpy(), expected)
        assert torch.equal(maps_.to_grouped[maps_.from_grouped.long()].long(), torch.arange(tables.rows))
        np.testing.assert_array_equal(maps_.group_offsets.numpy(), np.cumsum(ref.tokens_per_slot[order]))


@pytest.mark.parametrize("trial", range(20))
def test_schedule_quotas_is_schedule_without_pieces(rng, trial):
    G = int(rng.integers(1, 9))
    n = int(rng.integers(1, 5))
    layout, counts = random_case(rng, G, n, int(rng.integers(0, n)), 1)
    full, quotas = schedule(counts[0], layout.placement), schedule_quotas(counts[0], layout.placement)
    assert (full.max_load, full.lower_bound, full.remote_tokens) == (
        quotas.max_load,
        quotas.lower_bound,
        quotas.remote_tokens,
    )
    np.testing.assert_array_equal(full.slot_tokens, quotas.slot_tokens)
    np.testing.assert_array_equal(full.gpu_load, quotas.gpu_load)
    assert quotas.piece_src.size == 0
