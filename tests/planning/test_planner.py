import itertools
import json
import time

import numpy as np
import pytest

from megatron_microep.planning import workloads
from megatron_microep.planning.eplb import allowed_replica_gpus, eplb_placement, even_split_gpu_loads
from megatron_microep.planning.placement import Placement, home_gpu
from megatron_microep.planning.planner import plan_placement
from megatron_microep.planning.scheduler import optimal_max_load


def _seed():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed={seed}")
    return seed


def _expected_max(history, placement):
    return float(np.mean([optimal_max_load(row, placement) for row in history]))


def _check_invariants(placement, num_experts, num_gpus, redundant_slots, gpus_per_node=None):
    lists = placement.to_lists()
    assert len(lists) == num_experts
    for e, copies in enumerate(lists):
        assert copies[0] == home_gpu(e, num_experts, num_gpus), f"expert {e} lost its home copy"
        assert len(set(copies)) == len(copies), f"expert {e} has two copies on one GPU"
        if gpus_per_node:
            assert {g // gpus_per_node for g in copies} == {copies[0] // gpus_per_node}, f"expert {e} left its node"
    extra = np.bincount([g for copies in lists for g in copies[1:]], minlength=num_gpus)
    assert extra.max(initial=0) <= redundant_slots


def _random_history(rng, num_samples, num_experts, scale):
    hot = rng.lognormal(0.0, 1.0, num_experts)
    return rng.poisson(scale * hot / hot.mean() * rng.lognormal(0.0, 0.5, (num_samples, num_experts))).astype(np.int64)


def _brute_force(history, num_gpus, redundant_slots, gpus_per_node=None, current_pairs=(), move_penalty=0.0):
    """Slow exact reference: score every feasible placement."""
    num_experts = history.shape[1]
    allowed = allowed_replica_gpus(num_experts, num_gpus, gpus_per_node)
    per_gpu_choices = []
    for g in range(num_gpus):
        candidates = np.flatnonzero(allowed[:, g]).tolist()
        per_gpu_choices.append([c for k in range(redundant_slots + 1) for c in itertools.combinations(candidates, k)])
    best = np.inf
    for choice in itertools.product(*per_gpu_choices):
        lists = [[home_gpu(e, num_experts, num_gpus)] for e in range(num_experts)]
        moved = 0
        for g, experts in enumerate(choice):
            for e in experts:
                lists[e].append(g)
                moved += (e, g) not in current_pairs
        value = _expected_max(history, Placement.from_lists(lists, num_gpus)) + move_penalty * moved
        best = min(best, value)
    return best


@pytest.mark.parametrize(
    "num_experts,num_gpus,redundant_slots,gpus_per_node",
    [
        (6, 3, 1, None),
        (6, 3, 2, None),
        (8, 4, 1, None),
        (8, 4, 1, 2),
        (5, 2, 2, None),
        (2, 4, 1, None),
        (3, 4, 1, 2),  # more GPUs than experts: some GPUs hold replicas only
    ],
)
def test_matches_brute_force_optimum_on_small_instances(num_experts, num_gpus, redundant_slots, gpus_per_node):
    rng = np.random.default_rng(_seed())
    history = _random_history(rng, 3, num_experts, scale=40)
    result = plan_placement(history, num_gpus, redundant_slots, gpus_per_node, time_limit_s=5.0)
    optimum = _brute_force(history, num_gpus, redundant_slots, gpus_per_node)
    _check_invariants(result.placement, num_experts, num_gpus, redundant_slots, gpus_per_node)
    assert result.objective == pytest.approx(optimum)
    # Small loads, every pair in the model: the solver's bound is a proof (it is skipped when a start
    # already meets the perfect-balance bound).
    assert result.model_complete or result.solver_status == "NOT_RUN"
    assert result.status == "OPTIMAL" and result.bound == pytest.approx(optimum)


def test_move_penalty_matches_brute_force_and_keeps_current():
    rng = np.random.default_rng(_seed())
    num_experts, num_gpus = 6, 3
    history = _random_history(rng, 3, num_experts, scale=40)
    current = [[home_gpu(e, num_experts, num_gpus)] for e in range(num_experts)]
    current[0].append(2)
    current[3].append(0)
    pairs = {(0, 2), (3, 0)}
    free = plan_placement(history, num_gpus, 1, time_limit_s=5.0, current=current)
    for penalty in (2.0, 1e6):
        result = plan_placement(history, num_gpus, 1, time_limit_s=5.0, current=current, move_penalty=penalty)
        assert result.objective == pytest.approx(_brute_force(history, num_gpus, 1, None, pairs, penalty))
        assert result.moved_slots <= free.moved_slots
    assert result.moved_slots == 0  # a prohibitive penalty keeps every slot


def test_bound_is_proven_on_small_instances_and_when_the_model_is_scaled():
    rng = np.random.default_rng(_seed())
    for _ in range(3):
        history = _random_history(rng, 3, 6, scale=int(rng.integers(20, 200_000)))
        result = plan_placement(history, 3, 1, time_limit_s=3.0)
        assert result.bound <= _brute_force(history, 3, 1) + 1e-9 <= result.objective + 1e-9


@pytest.mark.parametrize("gpus_per_node", [None, 4])
def test_invariants_exact_objective_and_never_worse_than_greedy(gpus_per_node):
    seed = _seed()
    num_experts, num_gpus, redundant_slots = 64, 16, 2
    history = workloads.expert_loads(workloads.generate("bursty", 8, num_gpus, num_experts, 512, 4, seed))
    result = plan_placement(history, num_gpus, redundant_slots, gpus_per_node, time_limit_s=3.0)
    _check_invariants(result.placement, num_experts, num_gpus, redundant_slots, gpus_per_node)
    exact = _expected_max(history, result.placement)
    assert result.expected_max == pytest.approx(exact) and result.objective == pytest.approx(exact)
    np.testing.assert_array_equal(result.per_sample_max, [optimal_max_load(row, result.placement) for row in history])
    greedy = _expected_max(history, eplb_placement(history, num_gpus, redundant_slots, gpus_per_node))
    assert result.expected_max <= greedy
    assert result.bound <= result.objective
    assert result.expected_mean == pytest.approx(history.sum(axis=1).mean() / num_gpus)
    assert result.gap == pytest.approx((result.objective - result.bound) / result.objective)


def test_more_gpus_than_experts_fills_the_homeless_gpus_and_beats_greedy():
    seed = _seed()
    num_experts, num_gpus, redundant_slots = 16, 64, 2
    history = workloads.expert_loads(workloads.generate("lognormal_drift", 8, num_gpus, num_experts, 256, 2, seed))
    result = plan_placement(history, num_gpus, redundant_slots, time_limit_s=3.0)
    _check_invariants(result.placement, num_experts, num_gpus, redundant_slots)
    homes = {home_gpu(e, num_experts, num_gpus) for e in range(num_experts)}
    used = {g for copies in result.placement.to_lists() for g in copies}
    assert used - homes, "no replica landed on a GPU without a home expert"
    greedy = _expected_max(history, eplb_placement(history, num_gpus, redundant_slots))
    assert result.expected_max == pytest.approx(_expected_max(history, result.placement))
    assert result.expected_max <= greedy
    assert result.bound <= result.objective


def test_time_limit_is_honoured_at_full_scale():
    seed = _seed()
    history = workloads.expert_loads(workloads.generate("bursty", 16, 64, 256, 4096, 8, seed))
    started = time.monotonic()
    result = plan_placement(history, 64, 2, time_limit_s=2.0)
    elapsed = time.monotonic() - started
    assert elapsed <= 2.0 + 0.25, elapsed  # the limit plus one final exact evaluation
    assert result.solve_seconds <= elapsed
    _check_invariants(result.placement, 256, 64, 2)


def test_plan_beats_mean_based_greedy_when_every_sample_is_skewed_but_the_mean_is_flat():
    # The hot block visits every position in the history, so mean loads are nearly uniform; only a
    # per-sample objective sees that each micro-batch needs spare copies near its hot block.
    seed = _seed()
    loads = workloads.expert_loads(
        workloads.rotating_hotspot(8, 8, 32, 1024, 2, seed, hot_width=4, period=1, hot_factor=4.0)
    )
    result = plan_placement(loads, 8, 2, time_limit_s=3.0)
    greedy = _expected_max(loads, eplb_placement(loads, 8, 2))
    assert result.expected_max < 0.99 * greedy


def test_current_placement_with_zero_penalty_is_a_start_and_is_validated():
    rng = np.random.default_rng(_seed())
    history = _random_history(rng, 4, 8, scale=100)
    current = eplb_placement(history, 4, 1)
    result = plan_placement(history, 4, 1, time_limit_s=2.0, current=current)
    assert result.expected_max <= _expected_max(history, current)
    bad = current.to_lists()
    bad[0] = [1] + [g for g in bad[0] if g != 1]
    with pytest.raises(ValueError, match="home is 0"):
        plan_placement(history, 4, 1, current=bad)
    crowded = [[home_gpu(e, 8, 4)] for e in range(8)]
    crowded[0].append(3)
    crowded[2].append(3)
    with pytest.raises(ValueError, match="GPU 3 holds 2 extra copies"):
        plan_placement(history, 4, 1, current=crowded)
    with pytest.raises(ValueError, match="outside its home node"):
        plan_placement(
            history, 4, 1, gpus_per_node=2, current=[[home_gpu(e, 8, 4)] + ([3] if e == 0 else []) for e in range(8)]
        )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(history=[[1, -2, 3, 4]], num_gpus=2, redundant_slots=1), "negative load"),
        (dict(history=[[1, 2, 3, 4]], num_gpus=2, redundant_slots=3), "redundant_slots=3 exceeds"),
        (dict(history=[[1, 2, 3, 4]], num_gpus=2, redundant_slots=1, gpus_per_node=3), "divide"),
        (dict(history=[[1.5, 2, 3, 4]], num_gpus=2, redundant_slots=1), "integer"),
        (dict(history=[1, 2, 3, 4], num_gpus=2, redundant_slots=1), "matrix"),
        (dict(history=[[1, 2, 3, 4]], num_gpus=2, redundant_slots=1, move_penalty=-1), "move_penalty"),
    ],
)
def test_bad_inputs_are_named(kwargs, message):
    kwargs = dict(kwargs, history=np.asarray(kwargs["history"]))
    with pytest.raises(ValueError, match=message):
        plan_placement(**kwargs)


def test_eplb_invariants_and_even_split():
    seed = _seed()
    rng = np.random.default_rng(seed)
    for gpus_per_node in (None, 2, 4, 8):
        num_experts, num_gpus, slots = 48, 8, int(rng.integers(1, 4))
        history = _random_history(rng, 5, num_experts, scale=1000)
        placement = eplb_placement(history, num_gpus, slots, gpus_per_node)
        _check_invariants(placement, num_experts, num_gpus, slots, gpus_per_node)
        used = placement.num_slots - num_experts
        assert used == num_gpus * slots, f"{used} of {num_gpus * slots} slots used"
        if gpus_per_node is None:  # confined, the hottest expert's node may run out of slots first
            hottest = int(history.mean(axis=0).argmax())
            assert placement.replica_counts()[hottest] == placement.replica_counts().max()
        split = even_split_gpu_loads(history[0], placement)
        assert split.sum() == pytest.approx(history[0].sum())
        assert split.max() >= optimal_max_load(history[0], placement) - 1  # the exact split is never worse


def _cli(tmp_path, capsys, history, *flags):
    from megatron_microep.cli import main

    path = tmp_path / "history.json"
    path.write_text(history if isinstance(history, str) else json.dumps(history))
    code = main(["plan", str(path), "-o", str(tmp_path / "placement.json"), *flags])
    return code, capsys.readouterr().err


def test_cli_plans_and_writes_the_documented_format(tmp_path, capsys):
    rng = np.random.default_rng(_seed())
    loads = _random_history(rng, 4, 8, scale=50)
    current = [[home_gpu(e, 8, 4)] for e in range(8)]
    current[1].append(1)
    code, err = _cli(
        tmp_path,
        capsys,
        {"num_gpus": 4, "loads": loads.tolist(), "current": current},
        "--redundant-slots",
        "1",
        "--gpus-per-node",
        "2",
        "--time-limit",
        "2",
        "--move-penalty",
        "1",
    )
    assert code == 0, err
    out = json.loads((tmp_path / "placement.json").read_text())
    placement = Placement.from_lists(out["replicas"], 4)
    _check_invariants(placement, 8, 4, 1, gpus_per_node=2)
    assert out["expected_max"] == pytest.approx(_expected_max(loads, placement))
    moved = sum((e, g) != (1, 1) for e, r in enumerate(out["replicas"]) for g in r[1:])
    assert out["moved_slots"] == moved
    assert out["objective"] == pytest.approx(out["expected_max"] + moved)
    assert out["bound"] <= out["objective"] and out["solve_seconds"] <= 2.5
    for key in ("expected_mean", "gap", "status", "solver_status", "solver_bound", "per_sample_max"):
        assert key in out


@pytest.mark.parametrize(
    "history,flags,message",
    [
        ("{not json", [], "not valid JSON"),
        ([1, 2], [], "JSON object"),
        ({"loads": [[1, 2]]}, [], "missing field 'num_gpus'"),
        ({"num_gpus": 2}, [], "missing field 'loads'"),
        ({"num_gpus": 2, "loads": [[1, 2, 3, 4]], "extra": 1}, [], "unknown field 'extra'"),
        ({"num_gpus": 0, "loads": [[1, 2]]}, [], "positive integer"),
        ({"num_gpus": 2, "loads": []}, [], "non-empty list"),
        ({"num_gpus": 2, "loads": [[1, 2, 3, 4], [1, 2, 3]]}, [], "field 'loads[1]' has 3 entries, expected 4"),
        ({"num_gpus": 2, "loads": [[1, 2, -3, 4]]}, [], "field 'loads[0][2]' must be non-negative, got -3"),
        ({"num_gpus": 2, "loads": [[1, 2.5, 3, 4]]}, [], "field 'loads[0][1]' must be an integer, got 2.5"),
        ({"num_gpus": 2, "loads": [[1, True, 3, 4]]}, [], "field 'loads[0][1]' must be an integer, got True"),
        ({"num_gpus": 2, "loads": [[1, 2, 3, 4]]}, ["--redundant-slots", "5"], "redundant_slots=5 exceeds"),
        ({"num_gpus": 4, "loads": [[1, 2, 3, 4]]}, ["--gpus-per-node", "3"], "must be >= 1 and divide num_gpus=4"),
        ({"num_gpus": 2, "loads": [[1, 2, 3, 4]], "current": [[0], [0], [1]]}, [], "current placement has 3 experts"),
        ({"num_gpus": 2, "loads": [[1, 2, 3, 4]], "current": [[0, 0], [0], [1], [1]]}, [], "two copies on one GPU"),
        ({"num_gpus": 2, "loads": [[1, 2, 3, 4]], "current": "x"}, [], '"current" must be a list'),
        ({"num_gpus": 2, "loads": [[1, 2, 3, 4]]}, ["--time-limit", "0"], "--time-limit must be > 0"),
        ({"num_gpus": 2, "loads": [[1, 2, 3, 4]]}, ["--move-penalty", "-1"], "move_penalty must be >= 0"),
    ],
)
def test_cli_bad_input_exits_2_with_a_one_line_message(tmp_path, capsys, history, flags, message):
    flags = flags if "--redundant-slots" in flags else ["--redundant-slots", "1", *flags]
    code, err = _cli(tmp_path, capsys, history, *flags)
    assert code == 2
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "placement.json").exists()


def test_cli_missing_history_file(tmp_path, capsys):
    from megatron_microep.cli import main

    code = main(["plan", str(tmp_path / "absent.json"), "--redundant-slots", "1", "-o", str(tmp_path / "p.json")])
    assert code == 2 and "No such file" in capsys.readouterr().err


def test_evaluator_placement_matches_from_lists():
    from megatron_microep.planning.planner import _Evaluator, _Problem

    rng = np.random.default_rng(_seed())
    num_experts, num_gpus, redundant_slots = 37, 6, 3
    home = np.array([home_gpu(e, num_experts, num_gpus) for e in range(num_experts)])
    problem = _Problem(
        loads=np.ones((1, num_experts), dtype=np.int64),
        num_gpus=num_gpus,
        redundant_slots=redundant_slots,
        gpus_per_node=None,
        home=home,
        allowed=allowed_replica_gpus(num_experts, num_gpus, None),
        current_pairs=frozenset(),
        move_penalty=0.0,
    )
    for _ in range(20):
        extra = [
            [int(g) for g in rng.permutation(np.delete(np.arange(num_gpus), home[e]))[: rng.integers(0, 3)]]
            for e in range(num_experts)
        ]
        fast = _Evaluator(problem).placement(extra)
        slow = Placement.from_lists([[int(home[e])] + extra[e] for e in range(num_experts)], num_gpus)
        assert np.array_equal(fast.ptr, slow.ptr) and np.array_equal(fast.gpus, slow.gpus)
