"""Replica placement planner: which experts get extra copies, and on which GPUs.

Problem. History ``loads`` int [S, E] (tokens per expert in S sampled micro-batches), G GPUs, home
of expert e on GPU e*G//E (Megatron's contiguous EP; with G > E some GPUs hold no home expert and
serve replicas only), R redundant slots per GPU, optionally replicas
confined to the home node (``gpus_per_node``). Choose extra copies (never two of one expert on a GPU,
at most R per GPU) to minimise

    expected_max + move_penalty * moved_slots

where ``expected_max`` is the mean over samples of the exact per-micro-batch scheduler's optimal
max GPU load (``scheduler.optimal_max_load``), so a plan is judged by how the scheduler will really
balance each sample, variance included, and ``moved_slots`` counts extra copies absent from
``current`` (each one is a weight transfer).

Method, within a hard time limit:
1. Warm starts: the EPLB-style greedy, a sample-aware greedy and ``current``; the best by the exact
   objective is kept, so the plan is never worse than the EPLB-style baseline on the history.
2. Local search on the exact objective, guided by the scheduler's own solution: relieve a busiest
   GPU of the worst sample by copying one of its experts to a GPU that is cool in that sample, freeing
   the least-used replica slot there when none is free (one such step per busiest GPU at once when
   several tie); accept strict improvements only. It gets 30% of the time when the complete CP-SAT
   model fits, else 75% (at E=256, G=64 CP-SAT rarely improves on it), and the whole limit when
   CP-SAT would get no time after that share and its shutdown reserve (no solver, or a short limit).
3. CP-SAT on the aggregated flow model, hinted with the incumbent (variables and flows):
   y[e,g] in {0,1} an extra copy of e on g; x[s,e,g] >= 0 tokens of e moved from its home to g in
   sample s (x <= load*y, sum_g x <= load); per sample, GPU load = home load - moved out + moved in
   <= z_s; minimise sum_s z_s (+ penalty). With integer loads this is the scheduler's integral flow,
   so z_s is exactly its optimum. To stay tractable the model keeps only candidate (expert, GPU) pairs
   (every incumbent and current copy, then the hottest experts on the coolest GPUs) and, for large
   loads, works in scaled units (loads floored); the exact objective re-scores whatever it returns.
CP-SAT is skipped when the incumbent already meets the proven bound. The reported ``bound`` is always
a proven lower bound: the solver's bound when the model was complete
(all pairs) and unscaled, otherwise the larger of the perfect-balance bound, the largest-expert bound
and, with node confinement, the per-node bound (a node's total load cannot leave it).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np
from ortools.sat.python import cp_model

from megatron_microep.planning.eplb import allowed_replica_gpus, eplb_placement
from megatron_microep.planning.placement import Placement, home_gpu
from megatron_microep.planning.scheduler import optimal_max_load, route_loads

# CP-SAT gets the complete model (every allowed pair) up to this many flow variables x[s,e,g]; beyond it,
# a neighbourhood of the incumbent with at most RESTRICTED_FLOW_VARIABLES, since larger models do not
# reach a useful solution on a few CPU cores within seconds.
MAX_FLOW_VARIABLES = 24_000
RESTRICTED_FLOW_VARIABLES = 6_000
# In scaled units a GPU's mean load is this many units: 0.1% resolution, small enough integers for CP-SAT.
SCALED_UNITS_PER_GPU = 1000
# Part of the time limit left for CP-SAT's shutdown and the final exact evaluation.
_FINISH_RESERVE_S = 0.25


@dataclass(frozen=True)
class PlanResult:
    """A planned placement and how good it is. All loads are tokens per GPU per micro-batch."""

    placement: Placement
    expected_max: float  # mean over history samples of the exact optimal max GPU load
    expected_mean: float  # mean over history samples of total tokens / G (the perfect balance)
    objective: float  # expected_max + move_penalty * moved_slots
    bound: float  # proven lower bound on the objective of every feasible placement
    gap: float  # (objective - bound) / objective
    status: str  # "OPTIMAL" (objective == bound) or "FEASIBLE"
    source: str  # stage that produced the placement: eplb, sample_greedy, current, local_search, cp_sat
    solver_status: str  # CP-SAT's status, or "NOT_RUN" (no time left, or the start already met the bound)
    solver_bound: float  # CP-SAT's bound on its own (possibly restricted, scaled) model, in tokens
    model_complete: bool  # True when the CP-SAT model had every allowed pair and unscaled loads
    moved_slots: int  # extra copies not present in ``current``
    solve_seconds: float
    per_sample_max: np.ndarray = field(repr=False)  # int64 [S]

    @property
    def replicas(self) -> list[list[int]]:
        return self.placement.to_lists()

    @property
    def max_over_mean(self) -> float:
        return self.expected_max / self.expected_mean if self.expected_mean else 1.0


@dataclass(frozen=True)
class _Problem:
    loads: np.ndarray  # int64 [S, E]
    num_gpus: int
    redundant_slots: int
    gpus_per_node: int | None
    home: np.ndarray  # int64 [E]
    allowed: np.ndarray  # bool [E, G]
    current_pairs: frozenset  # (expert, gpu) extra copies of the current placement
    move_penalty: float

    @property
    def num_samples(self) -> int:
        return self.loads.shape[0]

    @property
    def num_experts(self) -> int:
        return self.loads.shape[1]


def history_matrix(history) -> np.ndarray:
    """Load history as int64 [S, E] (S, E >= 1, non-negative integers). Raises ValueError naming the problem."""
    loads = np.asarray(history)
    if loads.ndim != 2 or loads.shape[0] < 1 or loads.shape[1] < 1:
        raise ValueError(f"history must be a non-empty [samples, experts] matrix, got shape {list(loads.shape)}")
    if loads.dtype.kind not in "iu":
        raise ValueError(f"history must hold integer token counts, got dtype {loads.dtype}")
    if loads.min() < 0:
        s, e = np.argwhere(loads < 0)[0]
        raise ValueError(f"history has a negative load (sample {s}, expert {e}: {loads[s, e]})")
    return loads.astype(np.int64, copy=False)


def validate_history(history, num_gpus: int, redundant_slots: int, gpus_per_node: int | None = None) -> np.ndarray:
    """Check the planner's inputs; returns ``history`` as int64 [S, E]. Raises ValueError naming the problem."""
    loads = history_matrix(history)
    num_experts = loads.shape[1]
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    if gpus_per_node is not None and (gpus_per_node < 1 or num_gpus % gpus_per_node):
        raise ValueError(f"gpus_per_node={gpus_per_node} must be >= 1 and divide num_gpus={num_gpus}")
    if redundant_slots < 0:
        raise ValueError(f"redundant_slots must be >= 0, got {redundant_slots}")
    usable = int(allowed_replica_gpus(num_experts, num_gpus, gpus_per_node).sum(axis=0).max())
    if redundant_slots > usable:
        raise ValueError(f"redundant_slots={redundant_slots} exceeds the {usable} non-home experts any GPU could hold")
    return loads.astype(np.int64)


def _current_pairs(current, num_experts, num_gpus, home, allowed, redundant_slots) -> frozenset:
    if current is None:
        return frozenset()
    lists = current.to_lists() if isinstance(current, Placement) else [list(map(int, r)) for r in current]
    if len(lists) != num_experts:
        raise ValueError(f"current placement has {len(lists)} experts, history has {num_experts}")
    Placement.from_lists(lists, num_gpus)  # ids in range, no duplicates, no empty list
    pairs = set()
    for e, copies in enumerate(lists):
        if copies[0] != home[e]:
            raise ValueError(f"current placement: expert {e}'s first copy is on GPU {copies[0]}, its home is {home[e]}")
        for g in copies[1:]:
            if not allowed[e, g]:
                raise ValueError(f"current placement: expert {e} has a copy on GPU {g} outside its home node")
            pairs.add((e, g))
    per_gpu = np.bincount([g for _, g in pairs], minlength=num_gpus)
    if per_gpu.max(initial=0) > redundant_slots:
        g = int(per_gpu.argmax())
        raise ValueError(
            f"current placement: GPU {g} holds {per_gpu[g]} extra copies, more than redundant_slots={redundant_slots}"
        )
    return frozenset(pairs)


class _Evaluator:
    """Exact objective of replica lists: sum over samples of optimal max load (+ scaled penalty)."""

    def __init__(self, problem: _Problem):
        self.problem = problem
        self.evaluations = 0

    def placement(self, extra: list[list[int]]) -> Placement:
        """Home copy first, then the extra copies in the given order (invariants kept by the callers)."""
        counts = np.fromiter(map(len, extra), dtype=np.int64, count=len(extra)) + 1
        ptr = np.zeros(len(extra) + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        is_extra = np.ones(ptr[-1], dtype=bool)
        is_extra[ptr[:-1]] = False
        gpus = np.empty(ptr[-1], dtype=np.int64)
        gpus[ptr[:-1]] = self.problem.home
        gpus[is_extra] = np.fromiter(itertools.chain.from_iterable(extra), dtype=np.int64, count=ptr[-1] - len(extra))
        return Placement(num_gpus=self.problem.num_gpus, ptr=ptr, gpus=gpus)

    def per_sample(self, extra) -> np.ndarray:
        placement = self.placement(extra)
        self.evaluations += 1
        return np.array([optimal_max_load(row, placement) for row in self.problem.loads], dtype=np.int64)

    def moved(self, extra) -> int:
        return sum((e, g) not in self.problem.current_pairs for e, x in enumerate(extra) for g in x)

    def cost(self, extra) -> float:
        """Objective times S (kept as sums so comparisons of integer maxima are exact)."""
        p = self.problem
        return float(self.per_sample(extra).sum()) + p.move_penalty * p.num_samples * self.moved(extra)

    def cost_below(self, extra, threshold: float, target: int, target_now: int, floor: np.ndarray) -> float | None:
        """``cost(extra)`` if it is below ``threshold`` and sample ``target`` improves on ``target_now``,
        else None, stopping as soon as that is certain. ``floor`` float [S]: per-sample lower bounds."""
        p = self.problem
        placement = self.placement(extra)
        self.evaluations += 1
        value = optimal_max_load(p.loads[target], placement)
        if value >= target_now:
            return None  # the move was made for this sample; it does not help it
        total = p.move_penalty * p.num_samples * self.moved(extra) + float(floor.sum()) + value - floor[target]
        for s in range(p.num_samples):
            if total >= threshold:
                return None
            if s != target:
                total += optimal_max_load(p.loads[s], placement) - floor[s]
        return total if total < threshold else None


def _sample_greedy(problem: _Problem) -> list[list[int]]:
    """Greedy start that looks at every sample, not only the mean.

    Copy counts go to the highest per-copy load of mean + one standard deviation (hot-when-busy
    experts earn copies); each copy, largest first, goes to the allowed GPU with a free slot that
    minimises sum_s load_s[g] * share_s, i.e. a GPU that is cool in the samples where this expert is hot.
    """
    loads = problem.loads.astype(np.float64)
    num_experts, num_gpus = problem.num_experts, problem.num_gpus
    weight = loads.mean(axis=0) + loads.std(axis=0)
    max_copies = 1 + problem.allowed.sum(axis=1)
    copies = np.ones(num_experts, dtype=np.int64)
    for _ in range(num_gpus * problem.redundant_slots):
        per_copy = np.where(copies < max_copies, weight / copies, -1.0)
        e = int(per_copy.argmax())
        if per_copy[e] < 0:
            break
        copies[e] += 1
    share = loads / copies  # [S, E]
    gpu_load = np.zeros((problem.num_samples, num_gpus))
    np.add.at(gpu_load.T, problem.home, share.T)
    free = np.full(num_gpus, problem.redundant_slots, dtype=np.int64)
    extra: list[list[int]] = [[] for _ in range(num_experts)]
    order = sorted(
        (e for e in range(num_experts) for _ in range(copies[e] - 1)), key=lambda e: (-weight[e] / copies[e], e)
    )
    for e in order:
        ok = problem.allowed[e] & (free > 0)
        ok[extra[e]] = False
        if not ok.any():
            continue
        candidates = np.flatnonzero(ok)
        g = int(candidates[np.argmin(share[:, e] @ gpu_load[:, candidates])])
        extra[e].append(g)
        gpu_load[:, g] += share[:, e]
        free[g] -= 1
    return extra


class _LocalSearch:
    """Improve replica lists on the exact objective until no guided move helps or time runs out.

    A step copies an expert of a busiest GPU ``b`` of sample ``s`` to a GPU ``g`` that is cool in ``s``,
    dropping a little-used extra copy on ``g`` when it has no free slot. The neighbourhood widens in
    ``LEVELS`` (experts of ``b``, destination GPUs, copies to drop) while the narrower one has no
    improving move, and narrows again after each improvement. When several GPUs tie for the maximum,
    no single step lowers it, so the last level combines one step per busiest GPU of the sample.
    """

    LEVELS = ((3, 4, 2), (8, 16, 4), (None, None, None))
    COMPOUND_RANKS = 16  # compound moves tried per sample: the i-th step of each busiest GPU together

    def __init__(self, problem: _Problem, evaluator: _Evaluator, deadline: float):
        self.p = problem
        self.evaluator = evaluator
        self.deadline = deadline

    def _flows(self, extra):
        """Per-sample optimal GPU loads float [S, G] and mean tokens per extra copy {(e, g): tokens}."""
        placement = self.evaluator.placement(extra)
        gpu_load = np.empty((self.p.num_samples, self.p.num_gpus))
        usage = np.zeros(placement.num_slots)
        for s, row in enumerate(self.p.loads):
            slot_tokens, gpu_load[s] = route_loads(row, placement)
            usage += slot_tokens
        slot_use = {}
        for e, x in enumerate(extra):
            for i, g in enumerate(x):
                slot_use[(e, g)] = usage[placement.ptr[e] + 1 + i] / self.p.num_samples
        return gpu_load, slot_use

    def _steps(self, s, b, holds, per_gpu, gpu_load, width):
        """Steps relieving GPU ``b`` in sample ``s``, most promising first: (expert, GPU, dropped expert or None)."""
        p = self.p
        num_experts, num_dest, num_victims = width
        on_b = sorted(np.flatnonzero(holds[:, b]), key=lambda e: -p.loads[s, e])
        steps = []
        for e in on_b[:num_experts]:
            dest = np.flatnonzero(p.allowed[e] & ~holds[e])
            dest = dest[np.argsort(gpu_load[s, dest] + gpu_load[:, dest].mean(axis=0), kind="stable")]
            for g in dest[:num_dest]:
                if len(per_gpu[g]) < p.redundant_slots:
                    steps.append((int(e), int(g), None))
                else:
                    steps.extend((int(e), int(g), victim) for _, victim in per_gpu[g][:num_victims])
        return steps

    def _moves(self, extra, gpu_load, slot_use, per_sample, level):
        """Candidate moves, most promising first: (sample they are made for, tuple of steps)."""
        p = self.p
        balance = np.ceil(p.loads.sum(axis=1) / p.num_gpus)
        holds = np.zeros((p.num_experts, p.num_gpus), dtype=bool)
        holds[np.arange(p.num_experts), p.home] = True
        per_gpu: list[list[tuple[float, int]]] = [[] for _ in range(p.num_gpus)]
        for e, x in enumerate(extra):
            holds[e, x] = True
            for g in x:
                per_gpu[g].append((slot_use[(e, g)], e))
        for g in range(p.num_gpus):
            per_gpu[g].sort()
        for s in np.argsort(balance - per_sample, kind="stable"):
            if per_sample[s] <= balance[s]:
                return
            busiest = np.flatnonzero(gpu_load[s] >= gpu_load[s].max())
            for b in busiest:
                for step in self._steps(s, b, holds, per_gpu, gpu_load, self.LEVELS[level]):
                    yield int(s), (step,)
            if level == len(self.LEVELS) - 1 and len(busiest) > 1:
                per_busy = [self._steps(s, b, holds, per_gpu, gpu_load, self.LEVELS[1]) for b in busiest]
                for rank in range(self.COMPOUND_RANKS):
                    yield int(s), tuple(steps[rank % len(steps)] for steps in per_busy if steps)

    def _apply(self, extra, steps):
        """New replica lists with ``steps`` applied, or None when they conflict (slot limit, duplicates)."""
        candidate = [list(x) for x in extra]
        for e, g, victim in steps:
            if victim is not None:
                if g not in candidate[victim]:
                    return None
                candidate[victim].remove(g)
            if g in candidate[e]:
                return None
            candidate[e].append(g)
        per_gpu = np.bincount([g for x in candidate for g in x], minlength=self.p.num_gpus)
        return candidate if per_gpu.max(initial=0) <= self.p.redundant_slots else None

    def run(self, extra, cost):
        floor = np.ceil(self.p.loads.sum(axis=1) / self.p.num_gpus)
        level = 0
        while level < len(self.LEVELS) and time.monotonic() < self.deadline:
            per_sample = self.evaluator.per_sample(extra)
            gpu_load, slot_use = self._flows(extra)
            tried = set()
            improved = False
            for s, steps in self._moves(extra, gpu_load, slot_use, per_sample, level):
                if (s, steps) in tried:
                    continue
                tried.add((s, steps))
                if time.monotonic() >= self.deadline:
                    break
                candidate = self._apply(extra, steps)
                if candidate is None:
                    continue
                new_cost = self.evaluator.cost_below(candidate, cost, s, per_sample[s], floor)
                if new_cost is not None:
                    extra, cost, improved = candidate, new_cost, True
                    break
            level = 0 if improved else level + 1
        return extra, cost


def _candidate_pairs(problem: _Problem, incumbent, gpu_load_mean: np.ndarray) -> tuple[list[tuple[int, int]], bool]:
    """(expert, GPU) pairs the CP-SAT model may use, and whether that is every allowed pair."""
    p = problem
    budget = max(1, RESTRICTED_FLOW_VARIABLES // p.num_samples)
    all_pairs = [tuple(map(int, eg)) for eg in np.argwhere(p.allowed)]
    if len(all_pairs) * p.num_samples <= MAX_FLOW_VARIABLES:
        return all_pairs, True
    pairs = {(e, g) for e, x in enumerate(incumbent) for g in x} | set(p.current_pairs)
    hotness = (p.loads / np.maximum(p.loads.sum(axis=1, keepdims=True), 1)).max(axis=0)
    per_expert = max(2, min(p.num_gpus, 8))
    cool = np.argsort(gpu_load_mean, kind="stable")
    for e in np.argsort(-hotness, kind="stable"):
        if len(pairs) >= budget:
            break
        allowed = p.allowed[e][cool]
        pairs.update((int(e), int(g)) for g in cool[allowed][:per_expert])
    return sorted(pairs), False


def run_cp_sat(model: cp_model.CpModel, deadline: float, num_samples: int, scale: float):
    """Solve ``model`` (minimising the sum over ``num_samples`` samples of the per-sample max load, in
    loads scaled by ``scale`` and floored) until ``deadline`` (time.monotonic).

    Returns (solver, status, status name, proven bound on the mean per-sample optimum in tokens), or
    None when no time is left.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = remaining
    solver.parameters.num_workers = 2
    solver.parameters.random_seed = 0
    status = solver.solve(model)
    # Floored loads: the model's optimum per sample is < scale * exact optimum + 1 (see module doc).
    slack = 0.0 if scale == 1.0 else num_samples
    bound = max(0.0, (solver.best_objective_bound - slack) / (num_samples * scale))
    return solver, status, solver.status_name(status), bound


def _cp_sat(problem: _Problem, incumbent, gpu_load_mean, deadline: float):
    """Solve the flow model; returns (extra lists or None, status name, bound in tokens, complete)."""
    p = problem
    pairs, complete = _candidate_pairs(p, incumbent, gpu_load_mean)
    mean_gpu = p.loads.sum(axis=1).mean() / p.num_gpus
    scale = min(1.0, SCALED_UNITS_PER_GPU / mean_gpu) if mean_gpu > 0 else 1.0
    loads = np.floor(p.loads * scale).astype(np.int64) if scale < 1.0 else p.loads
    num_samples, num_gpus = p.num_samples, p.num_gpus
    home_load = np.zeros((num_samples, num_gpus), dtype=np.int64)
    np.add.at(home_load.T, p.home, loads.T)

    model = cp_model.CpModel()
    y = {pair: model.new_bool_var(f"y{pair[0]}_{pair[1]}") for pair in pairs}
    for g in range(num_gpus):
        on_g = [y[pair] for pair in pairs if pair[1] == g]
        if len(on_g) > p.redundant_slots:
            model.add(sum(on_g) <= p.redundant_slots)
    incumbent_pairs = {(e, g) for e, x in enumerate(incumbent) for g in x}
    # Hinted flows: the exact scheduler's split of the incumbent, scaled down (floors keep it feasible).
    hint_flow = _incumbent_flows(p, incumbent, scale)
    z = []
    not_run = None, "NOT_RUN", 0.0, False
    for s in range(num_samples):
        if time.monotonic() >= deadline:
            return not_run
        moved_out = [[] for _ in range(num_gpus)]
        moved_in = [[] for _ in range(num_gpus)]
        by_expert: dict[int, list] = {}
        hint_load = home_load[s].copy()
        for e, g in pairs:
            if loads[s, e] == 0:
                continue
            x = model.new_int_var(0, int(loads[s, e]), "")
            model.add(x <= int(loads[s, e]) * y[(e, g)])
            moved_out[p.home[e]].append(x)
            moved_in[g].append(x)
            by_expert.setdefault(e, []).append(x)
            flow = hint_flow.get((s, e, g), 0)
            model.add_hint(x, flow)
            hint_load[p.home[e]] -= flow
            hint_load[g] += flow
        for e, xs in by_expert.items():
            if len(xs) > 1:
                model.add(sum(xs) <= int(loads[s, e]))
        z_s = model.new_int_var(0, int(home_load[s].max()), f"z{s}")
        for g in range(num_gpus):
            model.add(int(home_load[s, g]) - sum(moved_out[g]) + sum(moved_in[g]) <= z_s)
        model.add_hint(z_s, int(hint_load.max()))
        z.append(z_s)
    for pair in pairs:
        model.add_hint(y[pair], pair in incumbent_pairs)
    penalty = p.move_penalty * scale * num_samples
    moved = [y[pair] for pair in pairs if pair not in p.current_pairs]
    model.minimize(sum(z) + penalty * sum(moved) if penalty and moved else sum(z))

    run = run_cp_sat(model, deadline, num_samples, scale)
    if run is None:
        return not_run
    solver, status, name, bound = run
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, name, bound, bool(complete and scale == 1.0)
    extra: list[list[int]] = [[] for _ in range(p.num_experts)]
    for e, g in pairs:
        if solver.boolean_value(y[(e, g)]):
            extra[e].append(g)
    return extra, name, bound, bool(complete and scale == 1.0)


def _incumbent_flows(problem: _Problem, incumbent, scale: float) -> dict[tuple[int, int, int], int]:
    """{(sample, expert, gpu): tokens the exact schedule moves from the expert's home to that copy}."""
    evaluator = _Evaluator(problem)
    placement = evaluator.placement(incumbent)
    flows = {}
    for s, row in enumerate(problem.loads):
        slot_tokens, _ = route_loads(row, placement)
        for e, x in enumerate(incumbent):
            for i, g in enumerate(x):
                moved = int(math.floor(slot_tokens[placement.ptr[e] + 1 + i] * scale))
                if moved:
                    flows[(s, e, g)] = moved
    return flows


def _proven_bound(problem: _Problem) -> float:
    """Mean over samples of the largest load bound that holds for every feasible placement."""
    p = problem
    loads = p.loads
    per_sample = np.ceil(loads.sum(axis=1) / p.num_gpus)
    max_copies = 1 + p.allowed.sum(axis=1)  # [E]
    per_sample = np.maximum(per_sample, np.ceil(loads / max_copies).max(axis=1))
    if p.gpus_per_node:
        node_of_expert = p.home // p.gpus_per_node
        num_nodes = p.num_gpus // p.gpus_per_node
        node_load = np.zeros((p.num_samples, num_nodes), dtype=np.int64)
        np.add.at(node_load.T, node_of_expert, loads.T)
        per_sample = np.maximum(per_sample, np.ceil(node_load / p.gpus_per_node).max(axis=1))
    return float(per_sample.mean())


def plan_placement(
    history,
    num_gpus: int,
    redundant_slots: int,
    gpus_per_node: int | None = None,
    time_limit_s: float = 10.0,
    current=None,
    move_penalty: float = 0.0,
    use_solver: bool = True,
) -> PlanResult:
    """Plan replicas from ``history`` int [S, E] tokens per expert; see the module doc.

    ``current``: a Placement or replica lists (home first) to stay close to; ``move_penalty``: tokens of
    expected max load one moved copy is worth. Returns within ``time_limit_s`` plus the time of about
    two exact evaluations of every sample (the start being scored at the deadline, and the final one). ``use_solver=False`` stops after the local search (no CP-SAT).
    """
    started = time.monotonic()
    loads = validate_history(history, num_gpus, redundant_slots, gpus_per_node)
    if move_penalty < 0:
        raise ValueError(f"move_penalty must be >= 0, got {move_penalty}")
    if time_limit_s <= 0:
        raise ValueError(f"time_limit_s must be > 0, got {time_limit_s}")
    num_experts = loads.shape[1]
    home = np.array([home_gpu(e, num_experts, num_gpus) for e in range(num_experts)], dtype=np.int64)
    allowed = allowed_replica_gpus(num_experts, num_gpus, gpus_per_node)
    problem = _Problem(
        loads=loads,
        num_gpus=num_gpus,
        redundant_slots=redundant_slots,
        gpus_per_node=gpus_per_node,
        home=home,
        allowed=allowed,
        current_pairs=_current_pairs(current, num_experts, num_gpus, home, allowed, redundant_slots),
        move_penalty=float(move_penalty),
    )
    deadline = started + time_limit_s - _FINISH_RESERVE_S
    evaluator = _Evaluator(problem)

    starts = {
        "eplb": [r[1:] for r in eplb_placement(loads, num_gpus, redundant_slots, gpus_per_node).to_lists()],
        "sample_greedy": _sample_greedy(problem),
    }
    if current is not None:
        starts["current"] = [[] for _ in range(num_experts)]
        for e, g in sorted(problem.current_pairs):
            starts["current"][e].append(g)
    # Starts are scored in order while time remains (at 1024 GPUs one scoring of 48 samples takes ~1 s).
    costs = {}
    for name, start in starts.items():
        if costs and time.monotonic() >= deadline:
            break
        costs[name] = evaluator.cost(start)
    source = min(costs, key=lambda name: (costs[name], name != "current"))
    extra, cost = starts[source], costs[source]

    # A complete model (every allowed pair) can prove optimality, so it gets most of the time; a restricted
    # one rarely beats the local search at scale, which then keeps most of it.
    complete_fits = int(allowed.sum()) * loads.shape[0] <= MAX_FLOW_VARIABLES
    search_share = (0.3 if complete_fits else 0.75) if use_solver else 1.0
    search_deadline = started + search_share * time_limit_s
    if search_deadline >= deadline:
        # CP-SAT would get no time after the search's share (no solver, or a short limit): the reserve
        # kept for its shutdown is not needed, so the search keeps the whole limit.
        search_deadline = started + time_limit_s
    searched, searched_cost = _LocalSearch(problem, evaluator, search_deadline).run(extra, cost)
    if searched_cost < cost:
        extra, cost, source = searched, searched_cost, "local_search"

    bound = _proven_bound(problem)
    solver_status, solver_bound, model_complete = "NOT_RUN", 0.0, False
    if use_solver and time.monotonic() < deadline and cost > bound * problem.num_samples:
        per_gpu_mean = np.zeros(num_gpus)
        np.add.at(per_gpu_mean, home, loads.mean(axis=0))
        solved, solver_status, solver_bound, model_complete = _cp_sat(problem, extra, per_gpu_mean, deadline)
        if solved is not None:
            solved_cost = evaluator.cost(solved)
            if solved_cost < cost:
                extra, cost, source = solved, solved_cost, "cp_sat"

    per_sample = evaluator.per_sample(extra)
    moved = evaluator.moved(extra)
    expected_max = float(per_sample.mean())
    objective = expected_max + move_penalty * moved
    if model_complete:
        bound = max(bound, solver_bound)
    gap = (objective - bound) / objective if objective > 0 else 0.0
    return PlanResult(
        placement=Placement.from_lists([[int(home[e])] + extra[e] for e in range(num_experts)], num_gpus),
        expected_max=expected_max,
        expected_mean=float(loads.sum(axis=1).mean() / num_gpus),
        objective=objective,
        bound=bound,
        gap=gap,
        status="OPTIMAL" if gap <= 1e-12 else "FEASIBLE",
        source=source,
        solver_status=solver_status,
        solver_bound=solver_bound,
        model_complete=model_complete,
        moved_slots=moved,
        solve_seconds=time.monotonic() - started,
        per_sample_max=per_sample,
    )
