"""One plan-from-history and one history type for the runtime and the simulator.

``plan_from_history`` must be exactly the planner its target and method name, fed the window plus
forecast samples (checked against direct calls on fresh random windows); the simulator's ``microep``
policy must plan through it from ``LoadHistory`` with the settings its parameters name (the runtime's
settings replay as the same planner settings: tests/test_settings.py); ``LoadHistory`` keeps whole steps
within its bounds and restores what it saved.
"""

import os
import random

import numpy as np
import pytest

from megatron_microep.planning.eplb import eplb_placement
from megatron_microep.planning.forecast import planner_input
from megatron_microep.planning.fsep_layout import greedy_layout, placement_from_holds
from megatron_microep.planning.history import LoadHistory
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.plan import HistoryPlanner, PlannerSettings, PlanTarget, plan_from_history
from megatron_microep.planning.policies import HistoryWindow, Layout, PolicyError, make_policy


def _settings(**changes) -> PlannerSettings:
    values = dict(
        method="greedy",
        time_limit_s=1.0,
        move_penalty=0.0,
        gpus_per_node=None,
        forecast_samples=8,
        forecast_recent=2,
        forecast_burst=3.0,
        use_solver=True,
    )
    values.update(changes)
    return PlannerSettings(**values)


@pytest.fixture
def rng():
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"plan test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return np.random.default_rng(seed)


def _window(rng, rows=12, experts=16):
    return rng.integers(0, 200, size=(rows, experts)) * (1 + 4 * (rng.random(experts) < 0.2))


def test_greedy_plans_are_the_named_planners_on_the_forecast_input(rng):
    for _ in range(5):
        window = _window(rng)
        settings = _settings(gpus_per_node=2 if rng.random() < 0.5 else None)
        loads = planner_input(window, settings.forecast_samples, settings.forecast_recent, settings.forecast_burst)
        replicas = plan_from_history(window, PlanTarget("replicas", 4, 2), settings)
        assert replicas.to_lists() == eplb_placement(loads, 4, 2, settings.gpus_per_node).to_lists()
        fsep = plan_from_history(window, PlanTarget("fsep", 4, 5), settings)
        assert fsep.to_lists() == placement_from_holds(greedy_layout(loads, 4, 5)).to_lists()
    # Without forecast samples the planner sees the window alone.
    window = _window(rng)
    plan = plan_from_history(window, PlanTarget("replicas", 4, 2), _settings(forecast_samples=0))
    assert plan.to_lists() == eplb_placement(window, 4, 2).to_lists()


def test_ortools_plans_get_the_forecast_input_and_their_settings(rng, monkeypatch):
    from megatron_microep.planning import plan as plan_module

    calls = {}

    def spy(name):
        def record(*args, **kwargs):
            calls.setdefault(name, []).append((args, kwargs))
            raise StopIteration  # the arguments are what is checked here

        return record

    monkeypatch.setattr(plan_module, "plan_placement", spy("replicas"))
    monkeypatch.setattr(plan_module, "plan_fsep_layout", spy("fsep"))
    window = _window(rng)
    current = Placement.contiguous(16, 4)
    settings = _settings(method="ortools", time_limit_s=2.0, move_penalty=1.5, gpus_per_node=2, use_solver=False)
    loads = planner_input(window, settings.forecast_samples, settings.forecast_recent, settings.forecast_burst)
    for kind, slots in (("replicas", 2), ("fsep", 5)):
        with pytest.raises(StopIteration):
            # A per-plan limit can only shorten the configured one.
            plan_from_history(window, PlanTarget(kind, 4, slots), settings, current, time_limit_s=9.0)
        with pytest.raises(StopIteration):
            plan_from_history(window, PlanTarget(kind, 4, slots), settings, current, time_limit_s=0.5)
    for (args, kwargs), limit in zip(calls["replicas"], (2.0, 0.5)):
        np.testing.assert_array_equal(args[0], loads)
        assert args[1:] == (4, 2, 2)
        assert kwargs == dict(time_limit_s=limit, current=current, move_penalty=1.5, use_solver=False)
    for (args, kwargs), limit in zip(calls["fsep"], (2.0, 0.5)):
        np.testing.assert_array_equal(args[0], loads)
        assert args[1:] == (4, 5) and kwargs == dict(time_limit_s=limit, current=current, use_solver=False)
    assert len(calls["replicas"]) == len(calls["fsep"]) == 2
    with pytest.raises(ValueError, match="time_limit_s must be > 0"):
        plan_from_history(window, PlanTarget("replicas", 4, 2), settings, current, time_limit_s=0.0)


def test_the_simulator_plans_through_the_shared_planner_from_the_shared_history(rng):
    layout = Layout(num_gpus=4, num_experts=16, redundant_slots=2)
    policy = make_policy("microep", layout, planner="eplb", history_micro_batches=6, forecast_samples=8)
    window = HistoryWindow(4, 16, *policy.history_needs())
    blocks = []
    for _ in range(4):  # 4 steps of 3 micro-batches
        rows = [rng.integers(0, 50, size=(4, 16)) for _ in range(3)]
        for tokens in rows:
            window.push(tokens)
        window.end_step()
        blocks.append(np.stack([t.sum(axis=0) for t in rows]))
    view = window.view()
    assert isinstance(view.loads, LoadHistory)
    # The history keeps the whole steps the last 6 micro-batches reach, and the policy plans on those 6.
    np.testing.assert_array_equal(view.loads.window(), np.concatenate(blocks[-2:]))
    current = layout.contiguous()
    planner = HistoryPlanner(PlanTarget("replicas", 4, 2), policy.planner_settings())
    expected = planner(np.concatenate(blocks)[-6:], current)
    assert policy.place(view, current).to_lists() == expected.to_lists()


def test_settings_and_targets_are_checked():
    with pytest.raises(ValueError, match="planner method must be one of ortools, greedy"):
        _settings(method="eplb")
    with pytest.raises(ValueError, match="time_limit_s must be > 0"):
        _settings(time_limit_s=0)
    with pytest.raises(ValueError, match="recent must be >= 1"):
        _settings(forecast_recent=0)
    with pytest.raises(ValueError, match="plan target must be one of replicas, fsep"):
        PlanTarget("moe", 4, 1)
    with pytest.raises(ValueError, match="non-empty"):
        plan_from_history(np.zeros((0, 8), dtype=np.int64), PlanTarget("replicas", 4, 1), _settings())
    with pytest.raises(PolicyError, match="microep planner: redundant_slots=4 exceeds"):
        policy = make_policy("microep", Layout(num_gpus=2, num_experts=4, redundant_slots=4))
        window = HistoryWindow(2, 4, 4, 1)
        window.push(np.ones((2, 4), dtype=np.int64))
        window.end_step()
        policy.place(window.view(), policy.initial_placement())


def test_load_history_keeps_whole_steps_within_its_bounds(rng):
    history = LoadHistory(3, steps=2)
    assert len(history) == 0 and history.window().shape == (0, 3)
    blocks = [rng.integers(0, 9, size=(n, 3)) for n in (2, 1, 3)]
    for block in blocks:
        for row in block:
            history.record(row)
        history.end_step()
        history.end_step()  # a step without rows adds nothing
    assert len(history) == 2
    np.testing.assert_array_equal(history.window(), np.concatenate(blocks[1:]))
    np.testing.assert_array_equal(history.window(2), blocks[2][1:])
    history.record([1, 2, 3])
    assert history.current().tolist() == [[1, 2, 3]]

    by_rows = LoadHistory(3, micro_batches=3)
    for block in blocks:
        by_rows.restore(by_rows.blocks() + [block], np.zeros((0, 3), dtype=np.int64))
    # 3 rows are reached by the last step alone: the older ones are dropped.
    assert [len(b) for b in by_rows.blocks()] == [3]

    restored = LoadHistory(3, steps=2)
    restored.restore(history.blocks(), history.current())
    assert [b.tolist() for b in restored.blocks()] == [b.tolist() for b in history.blocks()]
    assert restored.current().tolist() == [[1, 2, 3]]
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        history.record([1, 2])
    with pytest.raises(ValueError, match="needs a bound"):
        LoadHistory(3)
