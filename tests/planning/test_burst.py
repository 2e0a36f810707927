"""Burst copies against the exact reference (best choice of copies, a MIP) on fresh random instances,
the MIP against brute-force enumeration, and the rules every plan must keep."""

import itertools
import os
from fractions import Fraction

import numpy as np
import pytest

from megatron_microep.planning.burst import (
    NO_COPIES,
    _add_copy,
    _binding_expert,
    _eligible_gpu,
    _move_copy,
    _reverse,
    check_burst_copies,
    plan_burst,
    tolerance_cap,
    with_copies,
)
from megatron_microep.planning.burst_reference import admissible_copies, fewest_copies, min_max_load
from megatron_microep.planning.placement import Placement, PlacementError, home_gpu
from megatron_microep.planning.scheduler import _route, optimal_max_load, schedule

SEED = int(os.environ.get("MICROEP_TEST_SEED", np.random.SeedSequence().entropy % 2**32))


@pytest.fixture(scope="module")
def rng():
    print(f"burst test seed: {SEED} (rerun with MICROEP_TEST_SEED={SEED})")
    return np.random.default_rng(SEED)


def random_instance(rng, num_gpus, num_experts, replicas=0.5, sigma=1.5):
    lists = [[home_gpu(e, num_experts, num_gpus)] for e in range(num_experts)]
    for g in range(num_gpus):
        if rng.random() < replicas:
            e = int(rng.integers(num_experts))
            if g not in lists[e]:
                lists[e].append(g)
    weights = rng.lognormal(0.0, sigma, num_experts)
    tokens = np.stack(
        [rng.multinomial(int(rng.integers(20, 400)), weights / weights.sum()) for _ in range(num_gpus)]
    ).astype(np.int64)
    return tokens, Placement.from_lists(lists, num_gpus)


def random_held(rng, placement, slots, node_size):
    """Some admissible burst copies, as earlier micro-batches of the step may have left them."""
    candidates = admissible_copies(placement, NO_COPIES, slots, node_size)
    rng.shuffle(candidates)
    held, per_gpu = [], np.zeros(placement.num_gpus, dtype=int)
    for e, g in candidates[: int(rng.integers(0, 4))]:
        if per_gpu[g] < slots:
            held.append((e, g))
            per_gpu[g] += 1
    return np.asarray(held, dtype=np.int64).reshape(-1, 2)


def check_plan(tokens, placement, held, slots, node_size, plan):
    """The copies keep every rule; the schedule assigns every token once, to copies of its expert."""
    copies = plan.copies
    np.testing.assert_array_equal(copies[: plan.num_held], held)
    assert plan.num_held == len(held)
    check_burst_copies(copies, placement, slots)  # slots per GPU, no duplicate of any copy
    assert plan.placement.to_lists() == with_copies(placement, copies).to_lists()
    home = placement.gpus[placement.ptr[:-1]]
    new = copies[plan.num_held :]
    np.testing.assert_array_equal(plan.pushes, np.stack([home[new[:, 0]], new[:, 1]], axis=1).reshape(-1, 2))
    if node_size:
        assert (new[:, 1] // node_size == home[new[:, 0]] // node_size).all(), "a new copy left its home node"
    ext, result = plan.placement, plan.schedule
    assigned = np.zeros_like(tokens)
    single = ext.replica_counts() == 1
    assigned[:, single] = tokens[:, single]
    slot_expert = np.repeat(np.arange(ext.num_experts), ext.replica_counts())
    np.add.at(assigned, (result.piece_src, slot_expert[result.piece_slot]), result.piece_count)
    np.testing.assert_array_equal(assigned, tokens)
    per_slot = np.bincount(result.piece_slot, weights=result.piece_count, minlength=ext.num_slots)
    per_slot[ext.ptr[:-1][single]] = tokens.sum(axis=0)[single]
    np.testing.assert_array_equal(per_slot.astype(np.int64), result.slot_tokens)
    load = np.bincount(ext.gpus, weights=result.slot_tokens, minlength=ext.num_gpus).astype(np.int64)
    np.testing.assert_array_equal(load, result.gpu_load)
    assert result.max_load == load.max()
    remote = sum(int(n) for s, r, n in zip(result.piece_src, result.piece_slot, result.piece_count) if ext.gpus[r] != s)
    remote += sum(
        int(tokens[s, e]) for e in np.flatnonzero(single) for s in range(ext.num_gpus) if s != ext.copies(e)[0]
    )
    assert result.remote_tokens == remote


def best_choice_ratios(rng, instances):
    """Random small instances: each plan checked against the rules and the MIP's optimum; returns
    the plan's max load / the best choice of copies on those at tolerance 1."""
    ratios = []
    for _ in range(instances):
        num_gpus = int(rng.choice([4, 6, 8]))
        tokens, placement = random_instance(rng, num_gpus, num_gpus * int(rng.integers(1, 4)))
        node_size = int(rng.choice([0, num_gpus // 2])) or None
        slots = int(rng.integers(1, 3))
        held = random_held(rng, placement, slots, node_size)
        tolerance = float(rng.choice([1.0, 1.05]))
        plan = plan_burst(tokens, placement, held, slots, node_size, tolerance)
        check_plan(tokens, placement, held, slots, node_size, plan)
        best, _ = min_max_load(tokens, placement, held, slots, node_size)
        load = tokens.sum(axis=0)
        got = plan.schedule.max_load
        assert best <= got <= optimal_max_load(load, with_copies(placement, held))
        cap = tolerance_cap(int(load.sum()), num_gpus, tolerance)
        if got > cap:
            assert got == optimal_max_load(load, plan.placement)
            assert int(np.ceil(plan.schedule.lower_bound - 1e-9)) == got, "the last violator certifies the optimum"
        if len(plan.pushes) == 0:
            assert got == schedule(tokens, with_copies(placement, held)).max_load
        if tolerance == 1.0:
            ratios.append(got / best)
    return np.asarray(ratios)


def test_against_best_choice_of_copies(rng):
    """Fresh random instances: the plan keeps the rules, never beats the MIP's optimum (which would
    mean a broken reference or an invalid plan), never loses to no copies, is exact over its own
    placement whenever it ends above the tolerance cap, and is mostly the best choice. The choice is
    greedy, so no bound on a single instance holds; ``test_gap_to_best_choice`` checks the gap."""
    ratios = best_choice_ratios(rng, 40)
    print(f"plan / best choice of copies over {len(ratios)} instances: optimal in {np.mean(ratios == 1):.0%}")
    # About 99% are optimal (scripts/bench_burst.py --parts gap): 6 of some 20 missing the optimum
    # is a broken choice, not chance.
    assert np.sum(ratios > 1) <= 5


def test_gap_to_best_choice():
    """The gap on fixed instances (the seed of docs/benchmarks.md's gap table): a change to the
    choice of copies that loses quality fails here, whatever seed the other tests draw."""
    ratios = best_choice_ratios(np.random.default_rng(724048502), 200)
    print(f"plan / best choice over {len(ratios)} instances: mean {ratios.mean():.4f}, max {ratios.max():.4f}")
    assert ratios.mean() < 1.005 and ratios.max() < 1.1


def test_reference_matches_enumeration(rng):
    """The MIP's optimum and fewest copies equal brute force over every admissible set of copies."""
    for _ in range(6):
        num_gpus = int(rng.choice([3, 4]))
        tokens, placement = random_instance(rng, num_gpus, num_gpus + int(rng.integers(0, 3)))
        node_size = None if rng.random() < 0.5 else 2 if num_gpus == 4 else None
        candidates = admissible_copies(placement, NO_COPIES, 1, node_size)
        load = tokens.sum(axis=0)
        best, best_count = None, {}
        for size in range(num_gpus + 1):
            for chosen in itertools.combinations(range(len(candidates)), size):
                picked = candidates[list(chosen)].reshape(-1, 2)
                if len(np.unique(picked[:, 1])) != len(picked):
                    continue  # one burst slot per GPU
                value = optimal_max_load(load, with_copies(placement, picked))
                best = value if best is None else min(best, value)
                best_count[value] = min(best_count.get(value, size), size)
        assert min_max_load(tokens, placement, NO_COPIES, 1, node_size)[0] == best
        cap = best + int(rng.integers(0, 3))
        fewest = min(n for value, n in best_count.items() if value <= cap)
        assert fewest_copies(tokens, placement, cap, NO_COPIES, 1, node_size) == fewest
    assert fewest_copies(tokens, placement, best - 1, NO_COPIES, 1, node_size) is None


def test_deterministic_and_stops_within_tolerance(rng):
    """Same inputs, same bits (every rank decides alone); no copy while the optimum is within the
    tolerance cap; with slots 0 the plan is the scheduler's."""
    tokens, placement = random_instance(rng, 16, 64, replicas=1.0)
    tokens[:, 5] *= 20  # a burst on one expert
    first = plan_burst(tokens, placement, NO_COPIES, 2, 4, 1.0)
    again = plan_burst(tokens.copy(), placement, NO_COPIES, 2, 4, 1.0)
    assert len(first.pushes) > 0
    for a, b in ((first.copies, again.copies), (first.placement.gpus, again.placement.gpus)):
        np.testing.assert_array_equal(a, b)
    for name in ("slot_tokens", "piece_src", "piece_slot", "piece_count", "gpu_load"):
        np.testing.assert_array_equal(getattr(first.schedule, name), getattr(again.schedule, name))
    plain = schedule(tokens, placement)
    loose = plain.max_load * 16 / tokens.sum() + 0.01
    untouched = plan_burst(tokens, placement, NO_COPIES, 2, 4, loose)
    assert len(untouched.copies) == 0 and untouched.schedule.max_load == plain.max_load
    none = plan_burst(tokens, placement, NO_COPIES, 0, 4, 1.0)
    assert len(none.copies) == 0
    np.testing.assert_array_equal(none.schedule.piece_count, plain.piece_count)


def test_held_copies_are_reused_and_fill_slots(rng):
    """Held copies are part of the solve, pushed again never, and count against the slots; a second
    micro-batch with the same burst needs no new copy."""
    tokens, placement = random_instance(rng, 8, 16)
    tokens[:, 3] += 400
    first = plan_burst(tokens, placement, NO_COPIES, 1, None, 1.0)
    assert len(first.copies) > 0
    second = plan_burst(tokens, placement, first.copies, 1, None, 1.0)
    assert len(second.pushes) == 0 and second.num_held == len(first.copies)
    assert second.schedule.max_load == first.schedule.max_load
    np.testing.assert_array_equal(first.burst_slot(), np.zeros(len(first.copies), dtype=np.int64))
    # Every GPU's one slot already taken: nothing new can be pushed.
    full = np.array([[next(e for e in range(16) if g not in placement.copies(e)), g] for g in range(8)])
    assert len(plan_burst(tokens, placement, full, 1, None, 1.0).pushes) == 0
    two = plan_burst(tokens, placement, NO_COPIES, 2, None, 1.0)
    slots = two.burst_slot()
    for g in np.unique(two.copies[:, 1]):
        np.testing.assert_array_equal(np.sort(slots[two.copies[:, 1] == g]), np.arange((two.copies[:, 1] == g).sum()))


def test_copies_added_by_moving_their_expert_match_a_rebuild(rng):
    """The search adds each new copy by moving its expert's slots to unused room (``_add_copy``),
    renumbering no other slot, and compacts the slots in use when the room runs out; after every
    addition the experts' slot ranges read in expert order, the copies' flow and each GPU's list of
    slots (whose order the searches follow) must equal a rebuild from scratch (``with_copies``,
    ``_reverse``)."""
    num_gpus, num_experts, limit = 8, 24, 12
    _, placement = random_instance(rng, num_gpus, num_experts, replicas=1.0)
    nnz = placement.num_slots
    room = nnz + limit + num_gpus  # the least that always fits one more move: compactions happen
    begin, end = placement.ptr[:-1].copy(), placement.ptr[1:].copy()
    gpus, flow, slot_expert = (np.full(room, -1, dtype=np.int64) for _ in range(3))
    gpus[:nnz] = placement.gpus
    flow[:nnz] = rng.integers(1, 100, nnz)
    slot_expert[:nnz] = np.repeat(np.arange(num_experts), placement.replica_counts())
    gpu_slot = np.full(nnz + limit, -1, dtype=np.int64)
    gpu_ptr, gpu_slot[:nnz] = _reverse(placement.gpus, num_gpus)
    per_copy = [[int(flow[r]) for r in range(placement.ptr[e], placement.ptr[e + 1])] for e in range(num_experts)]
    copies, top, compacted = [], nnz, 0
    for n in range(limit):
        current = with_copies(placement, np.asarray(copies, dtype=np.int64).reshape(-1, 2))
        e = int(rng.integers(num_experts))
        g = int(rng.choice(np.setdiff1d(np.arange(num_gpus), current.copies(e))))
        moved = top + end[e] - begin[e] + 1 > room
        top = _add_copy(begin, end, gpus, flow, slot_expert, gpu_ptr, gpu_slot, top, nnz + n, e, g)
        compacted += moved
        copies.append((e, g))
        per_copy[e].append(0)
        expected = with_copies(placement, np.asarray(copies, dtype=np.int64))
        live = np.concatenate([np.arange(begin[x], end[x]) for x in range(num_experts)])
        np.testing.assert_array_equal(end - begin, expected.replica_counts())
        np.testing.assert_array_equal(gpus[live], expected.gpus)
        np.testing.assert_array_equal(slot_expert[live], np.repeat(np.arange(num_experts), expected.replica_counts()))
        np.testing.assert_array_equal(flow[live], np.concatenate(per_copy))
        # Slot r of the rebuild is slot live[r] here.
        expected_ptr, expected_slot = _reverse(expected.gpus, num_gpus)
        np.testing.assert_array_equal(gpu_ptr, expected_ptr)
        np.testing.assert_array_equal(gpu_slot[: nnz + n + 1], live[expected_slot])
    assert compacted > 0


def test_binding_expert_over_the_violator_matches_a_scan_of_every_expert(rng):
    """``_binding_expert`` looks only at the violator's experts, in the order the search reached
    them; it must pick what a scan of every expert in id order picks: the most load per copy among
    those with an eligible GPU, ties to the lower id."""
    for _ in range(300):
        num_gpus = int(rng.choice([4, 8, 16]))
        num_experts = num_gpus * int(rng.integers(1, 4))
        _, placement = random_instance(rng, num_gpus, num_experts, replicas=float(rng.choice([0.5, 2.0])))
        load = rng.integers(0, 6, num_experts) * int(rng.choice([1, 60]))  # ties in load per copy
        seen_expert = rng.random(num_experts) < 0.5
        seen_gpu = rng.random(num_gpus) < 0.5
        spare = rng.integers(0, 3, num_gpus)
        free = rng.integers(0, 2, num_gpus)
        node_size = int(rng.choice([0, 2, num_gpus // 2]))
        begin, end = placement.ptr[:-1], placement.ptr[1:]
        violator = rng.permutation(np.flatnonzero(seen_expert))
        got = _binding_expert(load, begin, end, placement.gpus, violator, seen_gpu, spare, free, node_size)
        expected, best_key = -1, None
        for e in range(num_experts):
            if seen_expert[e] and _eligible_gpu(e, begin, end, placement.gpus, seen_gpu, spare, free, node_size) >= 0:
                key = Fraction(int(load[e]), int(end[e] - begin[e]))
                if best_key is None or key > best_key:
                    expected, best_key = e, key
        assert got == expected


def test_moved_copies_match_a_rebuild(rng):
    """A relocation moves a burst copy to another GPU in place, emptied; after every move the CSR
    arrays, the flow and the GPU -> slots adjacency must equal a rebuild from the moved copies."""
    num_gpus, num_experts = 8, 24
    _, placement = random_instance(rng, num_gpus, num_experts, replicas=1.0)
    copies = random_held(rng, placement, 3, None)
    while len(copies) < 2:
        copies = random_held(rng, placement, 3, None)
    extended = with_copies(placement, copies)
    gpus = extended.gpus.copy()
    flow = rng.integers(1, 100, extended.num_slots)
    slot_expert = np.repeat(np.arange(num_experts), extended.replica_counts())
    gpu_ptr, gpu_slot = _reverse(gpus, num_gpus)
    for _ in range(12):
        k = int(rng.integers(len(copies)))
        e = int(copies[k, 0])
        current = with_copies(placement, copies)
        g = int(rng.choice(np.setdiff1d(np.arange(num_gpus), current.copies(e))))
        slot = int(current.ptr[e] + np.flatnonzero(current.copies(e) == copies[k, 1])[0])
        _move_copy(gpus, flow, slot_expert, gpu_ptr, gpu_slot, extended.num_slots, slot, g)
        copies[k, 1] = g
        expected = with_copies(placement, copies)
        np.testing.assert_array_equal(gpus, expected.gpus)
        assert flow[slot] == 0
        expected_ptr, expected_slot = _reverse(expected.gpus, num_gpus)
        np.testing.assert_array_equal(gpu_ptr, expected_ptr)
        np.testing.assert_array_equal(gpu_slot, expected_slot)


def test_a_copy_moves_to_free_the_slot_a_violator_needs():
    """One burst slot per GPU, GPU 0's taken by a held copy of expert 2. The heaviest expert 0 gets
    the free slot of GPU 2 first; then expert 1 (190 tokens, GPU 1 only) is a violator whose one
    free slot is its own GPU's. Moving expert 0's copy to GPU 1 frees GPU 2 for expert 1: max load
    134 (the best choice of copies, total / G) instead of 190."""
    placement = Placement.from_lists([[0], [1], [2]], 3)
    tokens = np.diag([200, 190, 10])
    held = np.array([[2, 0]])
    plan = plan_burst(tokens, placement, held, 1, None, 1.0)
    check_plan(tokens, placement, held, 1, None, plan)
    assert plan.schedule.max_load == 134 == min_max_load(tokens, placement, held, 1, None)[0]
    np.testing.assert_array_equal(plan.copies, [[2, 0], [0, 1], [1, 2]])
    np.testing.assert_array_equal(plan.pushes, [[0, 1], [1, 2]])


def test_resumed_searches_route_as_fresh_ones(rng):
    """``_route`` lets a search continue the previous one's tree when the push only filled its
    target; every result must equal routing with a fresh search each time (the reference), on
    placements as ``plan_burst`` routes them (persistent replicas plus burst copies), at the start
    and at the optimum (``_complete``'s second route)."""
    for _ in range(60):
        num_gpus = int(rng.choice([8, 16, 32]))
        tokens, placement = random_instance(rng, num_gpus, 4 * num_gpus, replicas=2.0, sigma=float(rng.uniform(0.5, 2)))
        placement = with_copies(placement, random_held(rng, placement, 2, None))
        load = tokens.sum(axis=0)
        for local in (tokens, np.zeros((0, placement.num_experts), dtype=np.int64)):
            fresh = _route(load, local, placement.ptr, placement.gpus, num_gpus, 0, False)
            for start in (0, int(fresh[1].max())):
                expected = _route(load, local, placement.ptr, placement.gpus, num_gpus, start, False)
                got = _route(load, local, placement.ptr, placement.gpus, num_gpus, start)
                for a, b in zip(got, expected):
                    np.testing.assert_array_equal(a, b)


def test_bad_input_is_named():
    placement = Placement.contiguous(8, 4)
    tokens = np.ones((4, 8), dtype=np.int64)
    with pytest.raises(PlacementError, match="outside the placement"):
        plan_burst(tokens, placement, np.array([[8, 0]]), 1, None, 1.0)
    with pytest.raises(PlacementError, match="more burst copies than"):
        plan_burst(tokens, placement, np.array([[0, 1], [1, 1]]), 1, None, 1.0)
    with pytest.raises(PlacementError, match="duplicates"):
        plan_burst(tokens, placement, np.array([[0, 0]]), 1, None, 1.0)
    with pytest.raises(PlacementError, match="duplicates"):
        plan_burst(tokens, placement, np.array([[0, 1], [0, 1]]), 2, None, 1.0)
    with pytest.raises(ValueError, match="slots must be >= 0"):
        plan_burst(tokens, placement, NO_COPIES, -1, None, 1.0)
    with pytest.raises(ValueError, match="tolerance must be >= 1"):
        plan_burst(tokens, placement, NO_COPIES, 1, None, 0.9)
    with pytest.raises(ValueError, match="node_size=3"):
        plan_burst(tokens, placement, NO_COPIES, 1, 3, 1.0)
    assert tolerance_cap(1000, 8, 1.0) == 125 and tolerance_cap(1001, 8, 1.0) == 126
    assert tolerance_cap(1000, 8, 1.05) == 131
