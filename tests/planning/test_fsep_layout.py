"""FSEP layout planner vs brute force on tiny instances, invariants and bounds on larger random ones."""

import itertools

import numpy as np
import pytest

from megatron_microep.planning.fsep_layout import greedy_layout, placement_from_holds, plan_fsep_layout
from megatron_microep.planning.scheduler import optimal_max_load


def _seed():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed={seed}")
    return seed


def _expected_max(history, placement):
    return float(np.mean([optimal_max_load(row, placement) for row in history]))


def _history(rng, samples, experts, scale):
    hot = rng.lognormal(0.0, 1.0, experts)
    return rng.poisson(scale * hot / hot.mean() * rng.lognormal(0.0, 0.4, (samples, experts))).astype(np.int64)


def _brute_force(history, num_gpus, slots):
    """Slow exact reference: every choice of ``slots`` experts per GPU that covers every expert."""
    experts = history.shape[1]
    best = np.inf
    for choice in itertools.product(itertools.combinations(range(experts), slots), repeat=num_gpus):
        holds = np.zeros((experts, num_gpus), dtype=bool)
        for g, chosen in enumerate(choice):
            holds[list(chosen), g] = True
        if holds.any(axis=1).all():
            best = min(best, _expected_max(history, placement_from_holds(holds)))
    return best


def _check_layout(placement, experts, gpus, slots):
    lists = placement.to_lists()
    assert len(lists) == experts and all(lists), "every expert needs a copy"
    assert all(len(set(c)) == len(c) for c in lists), "two copies of one expert on a GPU"
    assert placement.slots_per_gpu().tolist() == [slots] * gpus, "every slot is filled"


@pytest.mark.parametrize("experts,gpus,slots", [(4, 2, 2), (5, 3, 2), (5, 3, 3), (6, 2, 4)])
def test_planner_matches_brute_force(experts, gpus, slots):
    rng = np.random.default_rng(_seed())
    for _ in range(3):
        history = _history(rng, 3, experts, 20)
        plan = plan_fsep_layout(history, gpus, slots, time_limit_s=5.0)
        _check_layout(plan.placement, experts, gpus, slots)
        best = _brute_force(history, gpus, slots)
        assert plan.expected_max == pytest.approx(_expected_max(history, plan.placement))
        assert plan.bound <= best + 1e-9
        assert plan.expected_max == pytest.approx(best), (plan, best)


@pytest.mark.parametrize("experts,gpus,slots", [(16, 4, 5), (32, 8, 6), (64, 16, 5)])
def test_larger_layouts_are_valid_and_beat_greedy(experts, gpus, slots):
    rng = np.random.default_rng(_seed())
    history = _history(rng, 6, experts, 200)
    greedy = placement_from_holds(greedy_layout(history, gpus, slots))
    _check_layout(greedy, experts, gpus, slots)
    plan = plan_fsep_layout(history, gpus, slots, time_limit_s=1.0)
    _check_layout(plan.placement, experts, gpus, slots)
    assert plan.bound <= plan.expected_max + 1e-9
    assert plan.expected_max <= _expected_max(history, greedy)
    # Without a home, a hot expert may have a copy on every GPU: the bound is perfect balance.
    assert plan.max_over_mean < 1.1


def test_greedy_fills_slots_when_copies_crowd_few_gpus():
    # One very hot expert takes a copy on every GPU; the rest must still fit with no duplicates.
    history = np.array([[1000, 1, 1, 1, 1, 1]], dtype=np.int64)
    holds = greedy_layout(history, 3, 3)
    _check_layout(placement_from_holds(holds), 6, 3, 3)
    assert holds[0].all()


def test_current_layout_kept_on_ties():
    history = np.full((2, 4), 10, dtype=np.int64)
    holds = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    current = placement_from_holds(holds)
    plan = plan_fsep_layout(history, 2, 2, time_limit_s=1.0, current=current)
    assert plan.placement.to_lists() == current.to_lists()
    assert plan.source == "current"


@pytest.mark.parametrize(
    "history,gpus,slots,match",
    [
        (np.ones((2, 4), dtype=np.int64), 2, 1, "cannot hold 4 experts"),
        (np.ones((2, 4), dtype=np.int64), 2, 5, "exceeds the 4 experts"),
        (-np.ones((2, 4), dtype=np.int64), 2, 2, "negative load"),
        (np.ones((2, 4)), 2, 2, "integer token counts"),
    ],
)
def test_bad_inputs_are_named(history, gpus, slots, match):
    with pytest.raises(ValueError, match=match):
        plan_fsep_layout(history, gpus, slots)
