"""FSEP layout planner: which experts each GPU materializes, with no home constraint.

Under FSEP every GPU stores a shard of every expert, so a layout is free to put any expert on any
GPU: G GPUs, C slots each, every expert at least one copy, never two copies of one expert on a
GPU. A layout costs the same gathers whichever experts it names, so every slot is filled (an extra
copy never raises the scheduler's optimum). From history ``loads`` int [S, E], choose the copies to
minimise ``expected_max``: the mean over samples of the exact per-micro-batch scheduler's optimal
max GPU load (``scheduler.optimal_max_load``), the same objective as the replica planner
(``planner.py``), which it follows in three stages within a hard time limit:

1. Greedy start: copy counts by highest (mean + std) load per copy, at most G per expert; copies,
   most copies then heaviest first, to the GPU with a free slot that is coolest in the samples where
   the expert is hot (ties: lower GPU id); a copy that finds no GPU without that expert swaps a
   slot with one that has room.
2. Local search on the exact objective, guided by the scheduler's solution: for a busiest GPU of
   the worst sample, put one of its experts on a GPU that is cool in that sample, either by taking
   over a slot whose expert has another copy or by swapping slots of two experts between the two
   GPUs; accept strict improvements only.
3. CP-SAT on the aggregated flow model, hinted with the incumbent: y[e,g] a copy of e on g
   (sum_e y = C per GPU, sum_g y >= 1 per expert), x[s,e,g] tokens of e run on g in sample s
   (x <= load * y, sum_g x = load), per sample every GPU's load <= z_s; minimise sum_s z_s. Integral
   loads make z_s exactly the scheduler's optimum. Large models keep only candidate pairs (the
   incumbent's copies, then the hottest experts on the coolest GPUs) and, for large loads, work in
   scaled units; the exact objective re-scores whatever CP-SAT returns.

``bound`` is always proven: CP-SAT's bound when its model was complete and unscaled, else the mean
over samples of ``max(ceil(total / G), max_e ceil(load_e / G))``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from ortools.sat.python import cp_model

from megatron_microep.planning.placement import Placement
from megatron_microep.planning.planner import history_matrix, run_cp_sat
from megatron_microep.planning.scheduler import optimal_max_load, route_loads

# The complete CP-SAT model (every expert on every GPU) up to this many flow variables; beyond it a
# neighbourhood of the incumbent of at most RESTRICTED_FLOW_VARIABLES (as in planner.py).
MAX_FLOW_VARIABLES = 24_000
RESTRICTED_FLOW_VARIABLES = 6_000
SCALED_UNITS_PER_GPU = 1000
_FINISH_RESERVE_S = 0.05


@dataclass(frozen=True)
class FsepPlan:
    """A planned FSEP layout. Loads are tokens per GPU per micro-batch."""

    placement: Placement  # copies of each expert in ascending GPU order
    expected_max: float
    expected_mean: float
    bound: float  # proven lower bound on expected_max over every layout with C slots per GPU
    gap: float
    status: str  # "OPTIMAL" (expected_max == bound) or "FEASIBLE"
    source: str  # greedy, current, local_search or cp_sat
    solver_status: str
    model_complete: bool
    solve_seconds: float
    per_sample_max: np.ndarray = field(repr=False)  # int64 [S]

    @property
    def max_over_mean(self) -> float:
        return self.expected_max / self.expected_mean if self.expected_mean else 1.0


def validate_fsep_inputs(history, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """Check the inputs; returns history as int64 [S, E]. Raises ValueError naming the problem."""
    loads = history_matrix(history)
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    num_experts = loads.shape[1]
    if slots_per_gpu * num_gpus < num_experts:
        raise ValueError(f"{slots_per_gpu} slots on each of {num_gpus} GPUs cannot hold {num_experts} experts")
    if slots_per_gpu > num_experts:
        raise ValueError(f"slots_per_gpu={slots_per_gpu} exceeds the {num_experts} experts (one copy per GPU at most)")
    return loads.astype(np.int64)


def placement_from_holds(holds: np.ndarray) -> Placement:
    """Placement from bool [E, G] (copies in ascending GPU order); every expert must have a copy."""
    counts = holds.sum(axis=1)
    ptr = np.zeros(holds.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return Placement(num_gpus=holds.shape[1], ptr=ptr, gpus=np.nonzero(holds)[1].astype(np.int64))


class _Problem:
    def __init__(self, loads: np.ndarray, num_gpus: int, slots: int):
        self.loads, self.num_gpus, self.slots = loads, num_gpus, slots
        self.num_samples, self.num_experts = loads.shape
        self.evaluations = 0

    def per_sample(self, holds: np.ndarray) -> np.ndarray:
        placement = placement_from_holds(holds)
        self.evaluations += 1
        return np.array([optimal_max_load(row, placement) for row in self.loads], dtype=np.int64)

    def cost_below(self, holds: np.ndarray, threshold: int, target: int, target_now: int, floor: np.ndarray):
        """Sum over samples of the optimum if below ``threshold`` and sample ``target`` improves, else None."""
        placement = placement_from_holds(holds)
        self.evaluations += 1
        value = optimal_max_load(self.loads[target], placement)
        if value >= target_now:
            return None
        total = int(floor.sum()) + value - int(floor[target])
        for s in range(self.num_samples):
            if total >= threshold:
                return None
            if s != target:
                total += optimal_max_load(self.loads[s], placement) - int(floor[s])
        return total if total < threshold else None


def greedy_layout(loads: np.ndarray, num_gpus: int, slots: int) -> np.ndarray:
    """bool [E, G]: the greedy start (stage 1 of the module doc); every GPU gets exactly ``slots`` copies."""
    loads = loads.astype(np.float64)
    num_samples, num_experts = loads.shape
    weight = loads.mean(axis=0) + loads.std(axis=0)
    copies = np.ones(num_experts, dtype=np.int64)
    for _ in range(num_gpus * slots - num_experts):
        per_copy = np.where(copies < num_gpus, weight / copies, -1.0)
        e = int(np.argmax(per_copy))  # ties: lower expert id
        copies[e] += 1
    share = loads / copies  # [S, E]
    gpu_load = np.zeros((num_samples, num_gpus))
    holds = np.zeros((num_experts, num_gpus), dtype=bool)
    free = np.full(num_gpus, slots, dtype=np.int64)
    for e in np.lexsort((-weight, -copies)):
        for _ in range(copies[e]):
            ok = (free > 0) & ~holds[e]
            if not ok.any():
                _make_room(holds, free, e)
                ok = (free > 0) & ~holds[e]
            candidates = np.flatnonzero(ok)
            g = int(candidates[np.argmin(share[:, e] @ gpu_load[:, candidates])])
            holds[e, g] = True
            free[g] -= 1
            gpu_load[:, g] += share[:, e]
    return holds


def _make_room(holds: np.ndarray, free: np.ndarray, e: int) -> None:
    """Every GPU with a free slot already holds ``e``: move some expert f from a GPU h without e to a
    GPU g with room that lacks f, freeing a slot on h. Exists because e has fewer than G copies."""
    for g in np.flatnonzero(free > 0):
        for h in np.flatnonzero(~holds[e]):
            movable = np.flatnonzero(holds[:, h] & ~holds[:, g])
            if movable.size:
                f = int(movable[0])
                holds[f, h], holds[f, g] = False, True
                free[h] += 1
                free[g] -= 1
                return
    raise AssertionError("FSEP greedy: no slot can be freed (copy counts exceed the GPUs)")


class _LocalSearch:
    """Stage 2: guided moves on the exact objective (see the module doc)."""

    WIDTHS = ((3, 4), (8, 16), (None, None))

    def __init__(self, problem: _Problem, deadline: float):
        self.p, self.deadline = problem, deadline

    def _gpu_loads(self, holds):
        placement = placement_from_holds(holds)
        return np.stack([route_loads(row, placement)[1] for row in self.p.loads]).astype(np.float64)

    def _moves(self, holds, gpu_load, per_sample, floor, width):
        p = self.p
        num_experts, num_dest = width
        for s in np.argsort(floor - per_sample, kind="stable"):
            if per_sample[s] <= floor[s]:
                return
            for b in np.flatnonzero(gpu_load[s] >= gpu_load[s].max()):
                on_b = sorted(np.flatnonzero(holds[:, b]), key=lambda e: -p.loads[s, e])[:num_experts]
                for e in on_b:
                    dest = np.flatnonzero(~holds[e])
                    dest = dest[np.argsort(gpu_load[s, dest] + gpu_load[:, dest].mean(axis=0), kind="stable")]
                    for g in dest[:num_dest]:
                        # Slots on g that e may take: an expert with another copy (retarget), or one
                        # absent from b (swap the two slots).
                        for f in sorted(np.flatnonzero(holds[:, g]), key=lambda f: p.loads[:, f].mean()):
                            if holds[f].sum() > 1:
                                yield int(s), ("retarget", int(e), int(f), int(g), int(b))
                            if not holds[f, b]:
                                yield int(s), ("swap", int(e), int(f), int(g), int(b))

    @staticmethod
    def _apply(holds, move):
        kind, e, f, g, b = move
        out = holds.copy()
        out[f, g], out[e, g] = False, True
        if kind == "swap":
            out[e, b], out[f, b] = False, True
        return out

    def run(self, holds: np.ndarray, cost: int) -> tuple[np.ndarray, int]:
        p = self.p
        floor = np.maximum(np.ceil(p.loads.sum(axis=1) / p.num_gpus), np.ceil(p.loads.max(axis=1) / p.num_gpus))
        level = 0
        while level < len(self.WIDTHS) and time.monotonic() < self.deadline:
            per_sample = p.per_sample(holds)
            gpu_load = self._gpu_loads(holds)
            improved = False
            for s, move in self._moves(holds, gpu_load, per_sample, floor, self.WIDTHS[level]):
                if time.monotonic() >= self.deadline:
                    break
                candidate = self._apply(holds, move)
                new_cost = p.cost_below(candidate, cost, s, per_sample[s], floor)
                if new_cost is not None:
                    holds, cost, improved = candidate, new_cost, True
                    break
            level = 0 if improved else level + 1
        return holds, cost


def _candidate_pairs(p: _Problem, incumbent: np.ndarray) -> tuple[list[tuple[int, int]], bool]:
    if p.num_experts * p.num_gpus * p.num_samples <= MAX_FLOW_VARIABLES:
        return [(e, g) for e in range(p.num_experts) for g in range(p.num_gpus)], True
    budget = max(p.num_experts * 2, RESTRICTED_FLOW_VARIABLES // p.num_samples)
    pairs = {tuple(map(int, eg)) for eg in np.argwhere(incumbent)}
    incumbent_load = np.zeros(p.num_gpus)
    share = p.loads.mean(axis=0) / incumbent.sum(axis=1)
    np.add.at(incumbent_load, np.nonzero(incumbent)[1], share[np.nonzero(incumbent)[0]])
    cool = np.argsort(incumbent_load, kind="stable")
    hotness = (p.loads / np.maximum(p.loads.sum(axis=1, keepdims=True), 1)).max(axis=0)
    for e in np.argsort(-hotness, kind="stable"):
        if len(pairs) >= budget:
            break
        pairs.update((int(e), int(g)) for g in cool[: max(2, min(p.num_gpus, 8))])
    return sorted(pairs), False


def _cp_sat(p: _Problem, incumbent: np.ndarray, deadline: float):
    """Returns (bool [E, G] or None, status name, bound in tokens per sample, complete)."""
    pairs, complete = _candidate_pairs(p, incumbent)
    mean_gpu = p.loads.sum(axis=1).mean() / p.num_gpus
    scale = min(1.0, SCALED_UNITS_PER_GPU / mean_gpu) if mean_gpu > 0 else 1.0
    loads = np.floor(p.loads * scale).astype(np.int64) if scale < 1.0 else p.loads
    model = cp_model.CpModel()
    y = {pair: model.new_bool_var(f"y{pair[0]}_{pair[1]}") for pair in pairs}
    for g in range(p.num_gpus):
        model.add(sum(y[pair] for pair in pairs if pair[1] == g) == p.slots)
    for e in range(p.num_experts):
        model.add(sum(y[pair] for pair in pairs if pair[0] == e) >= 1)
    placement = placement_from_holds(incumbent)
    z = []
    not_run = None, "NOT_RUN", 0.0, False
    for s in range(p.num_samples):
        if time.monotonic() >= deadline:
            return not_run
        slot_tokens, gpu_load = route_loads(loads[s], placement)
        hint = {
            (int(e), int(g)): int(slot_tokens[placement.ptr[e] + i])
            for e in range(p.num_experts)
            for i, g in enumerate(placement.copies(e))
        }
        on_gpu = [[] for _ in range(p.num_gpus)]
        by_expert: dict[int, list] = {}
        for e, g in pairs:
            if loads[s, e] == 0:
                continue
            x = model.new_int_var(0, int(loads[s, e]), "")
            model.add(x <= int(loads[s, e]) * y[(e, g)])
            model.add_hint(x, hint.get((e, g), 0))
            on_gpu[g].append(x)
            by_expert.setdefault(e, []).append(x)
        for e, xs in by_expert.items():
            model.add(sum(xs) == int(loads[s, e]))
        z_s = model.new_int_var(0, int(loads[s].sum()), f"z{s}")
        for g in range(p.num_gpus):
            if on_gpu[g]:
                model.add(sum(on_gpu[g]) <= z_s)
        model.add_hint(z_s, int(gpu_load.max(initial=0)))
        z.append(z_s)
    for pair in pairs:
        model.add_hint(y[pair], bool(incumbent[pair]))
    model.minimize(sum(z))
    run = run_cp_sat(model, deadline, p.num_samples, scale)
    if run is None:
        return not_run
    solver, status, name, bound = run
    exact = bool(complete and scale == 1.0)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, name, bound, exact
    holds = np.zeros_like(incumbent)
    for pair in pairs:
        holds[pair] = solver.boolean_value(y[pair])
    return holds, name, bound, exact


def _proven_bound(loads: np.ndarray, num_gpus: int) -> float:
    per_sample = np.maximum(np.ceil(loads.sum(axis=1) / num_gpus), np.ceil(loads.max(axis=1) / num_gpus))
    return float(per_sample.mean())


def plan_fsep_layout(
    history,
    num_gpus: int,
    slots_per_gpu: int,
    time_limit_s: float = 2.0,
    current: Placement | None = None,
    use_solver: bool = True,
) -> FsepPlan:
    """Plan an FSEP layout from ``history`` int [S, E]; see the module doc.

    ``current``: the layout in use; kept when nothing better is found (a layout change is free under
    FSEP, so it is only a tie-breaker). Returns within ``time_limit_s`` plus one exact evaluation.
    """
    started = time.monotonic()
    loads = validate_fsep_inputs(history, num_gpus, slots_per_gpu)
    if time_limit_s <= 0:
        raise ValueError(f"time_limit_s must be > 0, got {time_limit_s}")
    problem = _Problem(loads, num_gpus, slots_per_gpu)
    deadline = started + time_limit_s - _FINISH_RESERVE_S
    starts = {"greedy": greedy_layout(loads, num_gpus, slots_per_gpu)}
    if current is not None:
        if current.num_experts != problem.num_experts or current.num_gpus != num_gpus:
            raise ValueError(
                f"current layout has {current.num_experts} experts on {current.num_gpus} GPUs, "
                f"history has {problem.num_experts} experts and num_gpus={num_gpus}"
            )
        holds = np.zeros((problem.num_experts, num_gpus), dtype=bool)
        holds[np.repeat(np.arange(problem.num_experts), current.replica_counts()), current.gpus] = True
        if (holds.sum(axis=0) == slots_per_gpu).all():
            starts["current"] = holds
    costs = {name: int(problem.per_sample(h).sum()) for name, h in starts.items()}
    source = min(costs, key=lambda name: (costs[name], name != "current"))
    holds, cost = starts[source], costs[source]

    complete_fits = problem.num_experts * num_gpus * problem.num_samples <= MAX_FLOW_VARIABLES
    search_share = (0.3 if complete_fits else 0.75) if use_solver else 1.0
    searched, searched_cost = _LocalSearch(problem, min(deadline, started + search_share * time_limit_s)).run(
        holds, cost
    )
    if searched_cost < cost:
        holds, cost, source = searched, searched_cost, "local_search"

    bound = _proven_bound(loads, num_gpus)
    solver_status, exact_model = "NOT_RUN", False
    if use_solver and time.monotonic() < deadline and cost > bound * problem.num_samples:
        solved, solver_status, solver_bound, exact_model = _cp_sat(problem, holds, deadline)
        if exact_model:
            bound = max(bound, solver_bound)
        if solved is not None:
            solved_cost = int(problem.per_sample(solved).sum())
            if solved_cost < cost:
                holds, cost, source = solved, solved_cost, "cp_sat"
    per_sample = problem.per_sample(holds)
    expected_max = float(per_sample.mean())
    gap = (expected_max - bound) / expected_max if expected_max > 0 else 0.0
    return FsepPlan(
        placement=placement_from_holds(holds),
        expected_max=expected_max,
        expected_mean=float(loads.sum(axis=1).mean() / num_gpus),
        bound=bound,
        gap=gap,
        status="OPTIMAL" if gap <= 1e-12 else "FEASIBLE",
        source=source,
        solver_status=solver_status,
        model_complete=exact_model,
        solve_seconds=time.monotonic() - started,
        per_sample_max=per_sample,
    )
