"""Invariants every balancing policy must keep, on fresh seeded random routing (seeds printed), plus
each policy's own rules checked against slow references."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from megatron_microep.planning import workloads
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.policies import (
    POLICIES,
    HistoryWindow,
    Layout,
    PolicyError,
    check_placement,
    make_policy,
    traffic,
)
from megatron_microep.planning.policies.balancemoe import best_move
from megatron_microep.planning.policies.base import even_split_assignment, quota_assignment
from megatron_microep.planning.policies.ideal import force_balanced
from megatron_microep.planning.policies.laer import greedy_place, priority_counts
from megatron_microep.planning.scheduler import optimal_max_load

SEED = int(os.environ.get("MICROEP_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
FAST = {"microep": {"time_limit_s": 0.3}}


def setup_module():
    print(f"policy tests seed: {SEED} (rerun with MICROEP_TEST_SEED={SEED})")


def skewed_trace(
    seed: int, gpus: int = 16, experts: int = 64, micro_batches: int = 12, tokens: int = 2048, topk: int = 4
) -> np.ndarray:
    return workloads.generate("lognormal_drift", micro_batches, gpus, experts, tokens, topk, seed, sigma=1.2)


def history_of(tokens: np.ndarray, gpus: int, experts: int, per_step: int = 4) -> HistoryWindow:
    window = HistoryWindow(gpus, experts, micro_batches=len(tokens), steps=5)
    for m, t in enumerate(tokens):
        window.push(t)
        if (m + 1) % per_step == 0:
            window.end_step()
    return window


def distributed_matrix(a) -> np.ndarray:
    """Slow reference: int64 [G, E] tokens each source sends to each expert, rebuilt from the
    assignment (single-copy experts whole, multi-copy experts from their pieces)."""
    placement = a.placement
    out = np.zeros_like(a.tokens)
    counts = placement.replica_counts()
    slot_expert = np.repeat(np.arange(placement.num_experts), counts)
    for e in np.flatnonzero(counts == 1):
        out[:, e] = a.tokens[:, e]
    for s, r, n in zip(a.piece_src, a.piece_slot, a.piece_count):
        assert n > 0
        assert counts[slot_expert[r]] > 1, "pieces only for multi-copy experts"
        out[s, slot_expert[r]] += n
    return out


def check_assignment(name: str, a, tokens: np.ndarray, layout: Layout) -> None:
    check_placement(a.placement, layout, name)  # slot limit, no duplicate copy on a GPU, every expert placed
    if name == "ideal":
        assert (a.tokens.sum(axis=1) == tokens.sum(axis=1)).all(), "ideal keeps each source's token count"
    else:
        assert (a.tokens == tokens).all(), "assignment must distribute the routed tokens"
    assert (distributed_matrix(a) == a.tokens).all(), "every token of every (source, expert) assigned once"
    counts = a.placement.replica_counts()
    per_slot = np.zeros(a.placement.num_slots, dtype=np.int64)
    single = np.flatnonzero(counts == 1)
    per_slot[a.placement.ptr[single]] = a.tokens[:, single].sum(axis=0)
    np.add.at(per_slot, a.piece_slot, a.piece_count)
    assert (per_slot == a.slot_tokens).all(), "slot_tokens match the pieces"
    assert a.gpu_load().sum() == tokens.sum()
    assert (a.slot_tokens >= 0).all()


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_invariants_on_random_traces(name):
    for trial in range(3):
        seed = SEED + trial
        gpus, experts = [(16, 64), (8, 16), (12, 48)][trial]
        layout = Layout(gpus, experts, redundant_slots=[2, 1, 3][trial], gpus_per_node=[4, 8, 4][trial])
        tokens = skewed_trace(seed, gpus, experts)
        policy = make_policy(name, layout, **FAST.get(name, {}))
        placement = policy.initial_placement()
        check_placement(placement, layout, name)
        placement = policy.place(history_of(tokens[:8], gpus, experts).view(), placement)
        check_placement(placement, layout, name)
        for t in tokens[8:]:
            a = policy.assign(t, placement)
            check_assignment(name, a, t, layout)
            if policy.keeps_assign_placement:
                placement = a.placement


@pytest.mark.parametrize("name", ["eplb", "laer", "llep", "ultraep", "microep"])
def test_replicating_policies_use_their_copies(name):
    """On skewed routing a policy that adds copies must actually run tokens on non-home copies."""
    layout = Layout(16, 64, redundant_slots=2, gpus_per_node=4)
    tokens = skewed_trace(SEED, micro_batches=12, tokens=8192)
    policy = make_policy(name, layout, **FAST.get(name, {}))
    placement = policy.place(history_of(tokens[:8], 16, 64).view(), policy.initial_placement())
    a = policy.assign(tokens[9], placement)
    extra = np.ones(a.placement.num_slots, dtype=bool)
    extra[a.placement.ptr[:-1]] = False
    assert a.slot_tokens[extra].sum() > 0
    static = make_policy("static", layout).assign(tokens[9], layout.contiguous()).gpu_load()
    assert a.gpu_load().max() < static.max()


def test_static_is_megatron_ep():
    layout = Layout(8, 32)
    tokens = skewed_trace(SEED, 8, 32)[0]
    a = make_policy("static", layout).assign(tokens, layout.contiguous())
    assert a.placement.to_lists() == [[e * 8 // 32] for e in range(32)]
    home = np.arange(32) * 8 // 32
    assert (a.gpu_load() == np.bincount(home, weights=tokens.sum(axis=0), minlength=8)).all()


def test_force_balanced_matches_round_robin_reference():
    rng = np.random.default_rng(SEED)
    tokens = rng.integers(0, 50, size=(6, 10))
    expected = np.zeros_like(tokens)
    position = 0
    for s in range(6):
        for _ in range(tokens[s].sum()):
            expected[s, position % 10] += 1
            position += 1
    assert (force_balanced(tokens) == expected).all()
    cols = force_balanced(tokens).sum(axis=0)
    assert cols.max() - cols.min() <= 1


def test_even_split_matches_slow_reference():
    rng = np.random.default_rng(SEED)
    num_gpus, num_experts = 8, 12
    replicas = [
        [e * num_gpus // num_experts]
        + list(
            rng.choice(
                [g for g in range(num_gpus) if g != e * num_gpus // num_experts], size=rng.integers(0, 4), replace=False
            )
        )
        for e in range(num_experts)
    ]
    placement = Placement.from_lists(replicas, num_gpus)
    tokens = rng.integers(0, 40, size=(num_gpus, num_experts))
    for node_size in (None, 4):
        a = even_split_assignment(tokens, placement, node_size)
        got = np.zeros((num_gpus, placement.num_slots), dtype=np.int64)
        np.add.at(got, (a.piece_src, a.piece_slot), a.piece_count)
        for e in range(num_experts):
            slots = list(range(placement.ptr[e], placement.ptr[e + 1]))
            if len(slots) == 1:
                continue
            for s in range(num_gpus):
                usable = slots
                if node_size is not None:
                    local = [r for r in slots if placement.gpus[r] // node_size == s // node_size]
                    usable = local or slots
                shares = got[s, usable]
                assert shares.sum() == tokens[s, e]
                assert shares.max() - shares.min() <= 1, "even split over the usable copies"
                assert got[s, [r for r in slots if r not in usable]].sum() == 0


def test_quota_assignment_fills_quotas_local_first():
    rng = np.random.default_rng(SEED)
    placement = Placement.from_lists([[0, 1], [1, 2, 3], [2], [3, 0]], 4)
    tokens = rng.integers(0, 30, size=(4, 4))
    load = tokens.sum(axis=0)
    quotas = np.zeros(placement.num_slots, dtype=np.int64)
    for e in range(4):
        slots = range(placement.ptr[e], placement.ptr[e + 1])
        cuts = np.sort(rng.integers(0, load[e] + 1, size=len(slots) - 1))
        quotas[list(slots)] = np.diff(np.concatenate([[0], cuts, [load[e]]]))
    a = quota_assignment(tokens, placement, quotas)
    np.add.at(check := np.zeros(placement.num_slots, dtype=np.int64), a.piece_slot, a.piece_count)
    multi = np.repeat(placement.replica_counts() > 1, placement.replica_counts())
    assert (check[multi] == quotas[multi]).all()
    for s, r, _n in zip(a.piece_src, a.piece_slot, a.piece_count):
        g = placement.gpus[r]
        if s != g:  # a remote piece only when the copy could not take all of its own GPU's tokens or ran out
            e = np.searchsorted(placement.ptr, r, side="right") - 1
            local_slot = [x for x in range(placement.ptr[e], placement.ptr[e + 1]) if placement.gpus[x] == s]
            if local_slot:
                assert check[local_slot[0]] == quotas[local_slot[0]]


def test_traffic_matches_slow_reference():
    rng = np.random.default_rng(SEED)
    layout = Layout(8, 24, redundant_slots=2, gpus_per_node=4)
    tokens = skewed_trace(SEED, 8, 24, micro_batches=10, tokens=512)
    for name in ("static", "eplb", "laer", "llep", "ultraep"):
        policy = make_policy(name, layout, **({"min_chunk": 16} if name == "llep" else {}))
        placement = policy.place(history_of(tokens[:8], 8, 24).view(), policy.initial_placement())
        a = policy.assign(tokens[9], placement)
        flow = traffic(a, 4)
        send = np.zeros((8, 8), dtype=np.int64)  # send[s, g]
        counts = a.placement.replica_counts()
        for e in np.flatnonzero(counts == 1):
            g = a.placement.gpus[a.placement.ptr[e]]
            send[:, g] += a.tokens[:, e]
        np.add.at(send, (a.piece_src, a.placement.gpus[a.piece_slot]), a.piece_count)
        np.fill_diagonal(send, 0)
        same = (np.arange(8)[:, None] // 4) == (np.arange(8)[None, :] // 4)
        assert (flow.send_intra == (send * same).sum(axis=1)).all(), name
        assert (flow.send_inter == (send * ~same).sum(axis=1)).all(), name
        assert (flow.recv_intra == (send * same).sum(axis=0)).all(), name
        assert (flow.recv_inter == (send * ~same).sum(axis=0)).all(), name
    del rng


def test_microep_reaches_the_exact_optimum():
    layout = Layout(16, 64, redundant_slots=2, gpus_per_node=4)
    tokens = skewed_trace(SEED)
    policy = make_policy("microep", layout, time_limit_s=0.3)
    placement = policy.place(history_of(tokens[:8], 16, 64).view(), policy.initial_placement())
    for t in tokens[8:]:
        a = policy.assign(t, placement)
        assert a.gpu_load().max() == optimal_max_load(t.sum(axis=0), placement)


def test_microep_burst_copies_follow_the_micro_batch():
    """With burst slots, a step's micro-batches add copies where their own bursts are, inside the
    home node, at most D per GPU over the step, reuse earlier ones, run tokens on them, and never
    end above the schedule without them."""
    persistent = Layout(16, 64, redundant_slots=1, gpus_per_node=4)
    tokens = workloads.generate("bursty", 12, 16, 64, 4096, 4, SEED, burst_probability=1.0, burst_experts=3)
    plain = make_policy("microep", persistent, time_limit_s=0.3)
    policy = make_policy("microep", persistent, time_limit_s=0.3, burst_slots=2)
    placement = policy.place(history_of(tokens[:8], 16, 64).view(), policy.initial_placement())
    home = placement.gpus[placement.ptr[:-1]]
    held = np.zeros((0, 2), dtype=np.int64)
    used = 0
    for t in tokens[8:]:
        a = policy.assign_in_step(t, placement, held)
        check_assignment("microep", a, t, Layout(16, 64, redundant_slots=3, gpus_per_node=4))
        copies = a.step_copies
        np.testing.assert_array_equal(copies[: len(held)], held)  # kept for the rest of the step
        assert (np.bincount(copies[:, 1], minlength=16) <= 2).all()
        assert (copies[:, 1] // 4 == home[copies[:, 0]] // 4).all()
        lists = placement.to_lists()
        for e, g in copies:
            assert g not in lists[e]
            lists[e].append(int(g))
        assert a.placement.to_lists() == lists
        burst_slots = np.flatnonzero(
            ~np.isin(np.arange(a.placement.num_slots), _persistent_slots(a.placement, placement))
        )
        used += a.slot_tokens[burst_slots].sum()
        assert a.gpu_load().max() <= plain.assign(t, placement).gpu_load().max()
        held = copies
    assert len(held) > 0 and used > 0, "burst copies were made and ran tokens"
    assert len(plain.assign(tokens[8], placement).step_copies) == 0


def _persistent_slots(extended, placement):
    """Slots of ``extended`` that are copies of ``placement`` (the first ones of each expert)."""
    counts = placement.replica_counts()
    return np.concatenate([extended.ptr[e] + np.arange(counts[e]) for e in range(placement.num_experts)])


def test_llep_plain_ep_below_threshold_and_spills_above():
    layout = Layout(8, 16, redundant_slots=2)
    llep = make_policy("llep", layout, min_chunk=8)
    balanced = workloads.generate("balanced", 1, 8, 16, 256, 2, SEED)[0]
    a = llep.assign(balanced, layout.contiguous())
    assert a.placement.num_slots == 16 and len(a.weight_moves) == 0
    tokens = np.zeros((8, 16), dtype=np.int64)
    tokens[:, 0] = 400  # expert 0 (GPU 0) is hot
    tokens[:, 1:] = 20
    a = llep.assign(tokens, layout.contiguous())
    load = a.gpu_load()
    cap = tokens.sum() / 8
    assert load.max() < tokens[:, :2].sum()
    extra = np.ones(a.placement.num_slots, dtype=bool)
    extra[a.placement.ptr[:-1]] = False
    home = np.repeat(a.placement.gpus[a.placement.ptr[:-1]], a.placement.replica_counts())
    assert sorted(map(tuple, a.weight_moves.tolist())) == sorted(
        zip(home[extra].tolist(), a.placement.gpus[extra].tolist())
    ), "one weight transfer from the expert's home to every helper"
    assert (a.slot_tokens[extra] >= 8).all(), "every spilled chunk is at least min_chunk"
    foreign = np.bincount(a.placement.gpus[extra], minlength=8)
    assert foreign.max() <= 2
    if load.max() > cap + 8:  # over the cap only when the helpers' foreign slots ran out
        assert foreign.sum() >= 2 * (8 - 1) - 2


def test_balancemoe_knapsack_is_exact():
    rng = np.random.default_rng(SEED)
    for _ in range(200):
        items = rng.integers(0, 100, size=rng.integers(1, 7))
        heavy = int(items.sum() + rng.integers(0, 50))
        light = int(rng.integers(0, heavy + 1))
        limit = int(rng.integers(1, 4))
        cost = float(rng.uniform(0, 20))
        best = best_move(heavy, light, items, limit, cost)

        def pair_time(subset):
            moved = int(items[list(subset)].sum())
            return max(heavy - moved, light + moved) + cost * len(subset)

        brute = min(
            pair_time(s)
            for k in range(0, min(limit, len(items)) + 1)
            for s in itertools.combinations(range(len(items)), k)
        )
        assert pair_time(best) == pytest.approx(brute)
        assert len(best) <= limit


def test_balancemoe_moves_stay_within_pairs_and_slots():
    layout = Layout(8, 32, redundant_slots=2, gpus_per_node=4)
    tokens = skewed_trace(SEED, 8, 32)[3]
    policy = make_policy("balancemoe", layout)
    a = policy.assign(tokens, layout.contiguous())
    home = layout.home()
    owner = a.placement.gpus[a.placement.ptr[:-1]]
    moved = owner != home
    assert len(a.weight_moves) == moved.sum()
    assert (np.bincount(owner[moved], minlength=8) <= 2).all()
    static_max = np.bincount(home, weights=tokens.sum(axis=0), minlength=8).max()
    assert a.gpu_load().max() <= static_max


def _reference_greedy(load, home, num_gpus, node_size, redundant, cap):
    """Slow transcription of UltraEP's greedy check (module doc) for the numba version."""
    gpu_load = np.bincount(home, weights=load, minlength=num_gpus).astype(np.int64)
    keep = load.copy()
    free = [redundant] * num_gpus
    reps = []
    for g in range(num_gpus):
        if gpu_load[g] <= cap:
            continue
        node = range((g // node_size) * node_size, (g // node_size + 1) * node_size)
        mine = sorted(np.flatnonzero(home == g), key=lambda e: -load[e])  # stable: ties keep expert order
        for e in mine:
            holders = set()
            while gpu_load[g] > cap and keep[e] > 0:
                options = [h for h in node if h != g and free[h] > 0 and h not in holders and cap - gpu_load[h] > 0]
                if not options:
                    break
                h = max(options, key=lambda x: (cap - gpu_load[x], -x))
                amount = min(gpu_load[g] - cap, cap - gpu_load[h], keep[e])
                reps.append((e, h, amount))
                keep[e] -= amount
                gpu_load[g] -= amount
                gpu_load[h] += amount
                free[h] -= 1
                holders.add(h)
            if gpu_load[g] <= cap:
                break
        if gpu_load[g] > cap:
            return False, keep, reps
    return True, keep, reps


def test_ultraep_greedy_and_cap_search_match_slow_reference():
    rng = np.random.default_rng(SEED)
    layout = Layout(8, 32, redundant_slots=2, gpus_per_node=4)
    policy = make_policy("ultraep", layout)
    home = layout.home()
    for _ in range(30):
        load = (rng.lognormal(0, 1.2, 32) * 100).astype(np.int64)
        native = np.bincount(home, weights=load, minlength=8).astype(np.int64)
        for cap in rng.integers(load.sum() // 8, native.max() + 1, size=5):
            ok, keep, rep_e, rep_g, rep_n = policy.quotas(load, int(cap))
            ref_ok, ref_keep, ref_reps = _reference_greedy(load, home, 8, 4, 2, int(cap))
            assert ok == ref_ok
            if ok:
                assert (keep == ref_keep).all()
                assert sorted(zip(rep_e.tolist(), rep_g.tolist(), rep_n.tolist())) == sorted(ref_reps)
        chosen = policy.min_cap(load)
        assert policy.quotas(load, chosen)[0]
        fast = int(np.ceil(1.01 * load.sum() / 8))
        if chosen > fast:  # the search result is the smallest accepted cap above the fast path
            assert not any(policy.quotas(load, c)[0] for c in range(fast, chosen))


def test_ultraep_keeps_replicas_in_the_node_and_under_the_cap():
    layout = Layout(16, 64, redundant_slots=2, gpus_per_node=4)
    tokens = skewed_trace(SEED)
    policy = make_policy("ultraep", layout)
    placement = layout.contiguous()
    for t in tokens:
        a = policy.assign(t, placement)
        home = np.repeat(a.placement.gpus[a.placement.ptr[:-1]], a.placement.replica_counts())
        assert (home // 4 == a.placement.gpus // 4).all(), "replicas stay in the home node"
        assert a.gpu_load().max() <= policy.min_cap(t.sum(axis=0))
        cached = {(e, g) for e, copies in enumerate(placement.to_lists()) for g in copies[1:]}
        new = {(e, g) for e, copies in enumerate(a.placement.to_lists()) for g in copies[1:]}
        assert len(a.weight_moves) == len(new - cached), "weights pushed only for replicas not cached"
        placement = a.placement


def test_laer_plans_spread_copies_over_nodes():
    load = np.array([900.0, 500, 300, 100, 80, 60, 40, 20])
    counts = priority_counts(load, 16, 8)
    assert counts.sum() == 16 and counts.min() >= 1 and counts.max() <= 8
    placement = greedy_place(load, counts, 8, 4, 2)
    assert (placement.replica_counts() == counts).all()
    assert placement.slots_per_gpu().max() <= 2
    for e in range(8):
        nodes = np.bincount(placement.copies(e) // 4, minlength=2)
        assert nodes.max() - nodes.min() <= 1, "fewest copies per node first"


def test_bad_parameters_are_named():
    layout = Layout(8, 16, redundant_slots=1)
    with pytest.raises(PolicyError, match="unknown parameter 'lamda'"):
        make_policy("llep", layout, lamda=1.2)
    with pytest.raises(PolicyError, match="imbalance_threshold must be >= 1"):
        make_policy("llep", layout, imbalance_threshold=0.5)
    with pytest.raises(PolicyError, match="forecast_burst must be 0"):
        make_policy("microep", layout, forecast_burst=0.9)
    with pytest.raises(PolicyError, match="burst_slots must be >= 0"):
        make_policy("microep", layout, burst_slots=-1)
    with pytest.raises(PolicyError, match="burst_tolerance must be >= 1"):
        make_policy("microep", layout, burst_tolerance=0.99)
    with pytest.raises(PolicyError, match="replan_interval must be int"):
        make_policy("eplb", layout, replan_interval="soon")
    with pytest.raises(PolicyError, match="unknown policy 'fastest'"):
        make_policy("fastest", layout)
    with pytest.raises(PolicyError, match="gpus_per_node=3 must"):
        Layout(8, 16, gpus_per_node=3)


def test_check_placement_rejects_violations():
    layout = Layout(4, 8, redundant_slots=1)
    with pytest.raises(PolicyError, match="two copies on one GPU"):
        check_placement(
            Placement(4, np.array([0, 2, 3, 4, 5, 6, 7, 8, 9]), np.array([0, 0, 0, 1, 1, 2, 2, 3, 3])), layout, "test"
        )
    too_many = Placement.from_lists([[0, 1], [0, 2], [1, 0], [1, 3], [2, 0], [2], [3], [3]], 4)
    with pytest.raises(PolicyError, match="GPU 0 holds 4 experts, limit 3"):
        check_placement(too_many, layout, "test")


def test_history_window_keeps_the_recent_past():
    window = HistoryWindow(2, 3, micro_batches=3, steps=2)
    assert window.empty
    batches = [np.full((2, 3), i, dtype=np.int64) for i in range(1, 6)]
    for i, b in enumerate(batches):
        window.push(b)
        if i % 2 == 1:
            window.end_step()
    view = window.view()
    assert view.expert_loads.tolist() == [[6] * 3, [8] * 3, [10] * 3]
    assert [s[0, 0] for s in view.step_tokens] == [3, 7]


def _reference_spill(load, home, num_gpus, cap, min_chunk, limit):
    """Slow transcription of LLEP's LPT spill (module doc) for the numba version."""
    assigned = np.zeros(num_gpus)
    foreign = np.zeros(num_gpus, dtype=np.int64)
    keep = np.zeros(len(load), dtype=np.int64)
    helpers = []
    for e in sorted(range(len(load)), key=lambda x: -load[x]):
        g = home[e]
        kept = min(load[e], max(int(cap - assigned[g]), 0))
        assigned[g] += kept
        rest = load[e] - kept
        holders = {g}
        while rest >= min_chunk:
            options = [h for h in range(num_gpus) if h not in holders and foreign[h] < limit]
            if not options:
                break
            h = min(options, key=lambda x: (assigned[x], x))
            chunk = min(rest, max(int(cap - assigned[h]), min_chunk))
            helpers.append((e, h, chunk))
            assigned[h] += chunk
            foreign[h] += 1
            holders.add(h)
            rest -= chunk
        keep[e] = kept + rest
        assigned[g] += rest
    return keep, helpers


def test_llep_spill_matches_slow_reference():
    from megatron_microep.planning.policies.llep import _spill

    rng = np.random.default_rng(SEED)
    for _ in range(50):
        num_gpus, num_experts = int(rng.integers(2, 12)), int(rng.integers(2, 40))
        load = (rng.lognormal(0, 1.5, num_experts) * 200).astype(np.int64)
        home = np.arange(num_experts) * num_gpus // num_experts
        cap = float(rng.uniform(0.8, 1.3) * load.sum() / num_gpus)
        chunk, limit = int(rng.integers(1, 100)), int(rng.integers(1, 4))
        order = np.argsort(-load, kind="stable").astype(np.int64)
        keep, rep_e, rep_g, rep_n = _spill(load, home, order, num_gpus, cap, chunk, limit)
        ref_keep, ref_helpers = _reference_spill(load, home, num_gpus, cap, chunk, limit)
        assert (keep == ref_keep).all()
        assert list(zip(rep_e.tolist(), rep_g.tolist(), rep_n.tolist())) == ref_helpers


def _reference_greedy_place(load, counts, num_gpus, node_size, slot_limit):
    """Slow transcription of LAER's greedy placement (module doc) for the numba version."""
    num_nodes = num_gpus // node_size
    gpu_load = np.zeros(num_gpus)
    # A node's load is the running sum of the shares placed on it, in placement order (summing its
    # GPUs' loads instead rounds differently and flips exact ties between nodes).
    node_load = [0.0] * num_nodes
    free = np.full(num_gpus, slot_limit)
    copies = [[] for _ in load]
    for e in np.lexsort((-load, -counts)):
        node_copies = [0] * num_nodes
        for _ in range(counts[e]):

            def open_gpus(node):
                return [
                    g for g in range(node * node_size, (node + 1) * node_size) if free[g] > 0 and g not in copies[e]
                ]

            nodes = [n for n in range(num_nodes) if open_gpus(n)]
            node = min(nodes, key=lambda n: (node_copies[n], node_load[n], n))
            g = min(open_gpus(node), key=lambda x: (gpu_load[x], x))
            copies[e].append(g)
            free[g] -= 1
            gpu_load[g] += load[e] / counts[e]
            node_load[node] += load[e] / counts[e]
            node_copies[node] += 1
    return copies


def test_laer_greedy_place_matches_slow_reference():
    rng = np.random.default_rng(SEED)
    for _ in range(20):
        node_size, nodes = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        num_gpus = node_size * nodes
        num_experts = int(rng.integers(num_gpus, 3 * num_gpus + 1))
        slot_limit = -(-num_experts // num_gpus) + int(rng.integers(0, 3))
        load = np.round(rng.lognormal(0, 1.0, num_experts) * 100)
        counts = priority_counts(load, num_gpus * slot_limit, num_gpus)
        got = greedy_place(load, counts, num_gpus, node_size, slot_limit)
        ref = _reference_greedy_place(load, counts, num_gpus, node_size, slot_limit)
        assert got.to_lists() == ref
