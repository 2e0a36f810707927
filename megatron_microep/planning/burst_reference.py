"""Slow exact reference for burst copies: the best choice of copies as a mixed-integer program (SCIP).

Binary ``y[e, g]`` for every admissible new copy (GPU ``g`` does not hold ``e``, has a free burst
slot and, with ``node_size``, shares the node of ``e``'s home), continuous ``x`` for the tokens of
every copy, old and new (``x[e, g] <= load[e] * y[e, g]``), at most ``free[g]`` new copies on GPU
``g``. ``min_max_load`` minimises the largest GPU load ``z``; its integral optimum is ``ceil(z*)``
(for fixed copies it is the scheduler's flow LP). ``fewest_copies`` minimises the number of new
copies that bring every GPU load to at most a given cap.
"""

from __future__ import annotations

import math

import numpy as np
from ortools.linear_solver import pywraplp

from megatron_microep.planning.burst import NO_COPIES, check_burst_copies, with_copies
from megatron_microep.planning.placement import Placement

# SCIP's optimum is exact to ~1e-9 relative; ceil must not round a 12.0000000001 up to 13.
_CEIL_TOLERANCE = 1e-6


def admissible_copies(placement: Placement, held: np.ndarray, slots: int, node_size: int | None) -> np.ndarray:
    """int64 [C, 2] (expert, gpu): every new burst copy the rules allow, in (expert, gpu) order."""
    current = with_copies(placement, check_burst_copies(held, placement, slots))
    free = slots - np.bincount(np.asarray(held, dtype=np.int64).reshape(-1, 2)[:, 1], minlength=placement.num_gpus)
    home = placement.gpus[placement.ptr[:-1]]
    rows = []
    for e in range(placement.num_experts):
        holders = set(current.copies(e).tolist())
        for g in range(placement.num_gpus):
            same_node = node_size is None or g // node_size == home[e] // node_size
            if free[g] > 0 and g not in holders and same_node:
                rows.append((e, g))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _model(tokens, placement, held, slots, node_size):
    current = with_copies(placement, check_burst_copies(held, placement, slots))
    load = np.asarray(tokens, dtype=np.int64).sum(axis=0)
    free = slots - np.bincount(np.asarray(held, dtype=np.int64).reshape(-1, 2)[:, 1], minlength=placement.num_gpus)
    candidates = admissible_copies(placement, held, slots, node_size)
    solver = pywraplp.Solver.CreateSolver("SCIP")
    if solver is None:
        raise RuntimeError("OR-Tools SCIP is unavailable")
    per_expert: list[list] = [[] for _ in range(placement.num_experts)]
    per_gpu: list[list] = [[] for _ in range(placement.num_gpus)]
    for e in range(placement.num_experts):
        for g in current.copies(e):
            x = solver.NumVar(0.0, solver.infinity(), "")
            per_expert[e].append(x)
            per_gpu[g].append(x)
    y = []
    new_per_gpu: list[list] = [[] for _ in range(placement.num_gpus)]
    for e, g in candidates:
        use = solver.BoolVar("")
        x = solver.NumVar(0.0, float(load[e]), "")
        solver.Add(x <= float(load[e]) * use)
        per_expert[e].append(x)
        per_gpu[g].append(x)
        new_per_gpu[g].append(use)
        y.append(use)
    for e in range(placement.num_experts):
        solver.Add(sum(per_expert[e]) == float(load[e]))
    for g in range(placement.num_gpus):
        if new_per_gpu[g]:
            solver.Add(sum(new_per_gpu[g]) <= float(free[g]))
    return solver, per_gpu, y, candidates


def min_max_load(
    tokens: np.ndarray, placement: Placement, held: np.ndarray = NO_COPIES, slots: int = 1, node_size: int | None = None
) -> tuple[int, np.ndarray]:
    """The optimal max GPU load over every admissible choice of burst copies, and one such choice
    (int64 [N, 2] (expert, gpu) new copies). tokens int [G, E]; the rest as ``burst.plan_burst``."""
    solver, per_gpu, y, candidates = _model(tokens, placement, held, slots, node_size)
    z = solver.NumVar(0.0, solver.infinity(), "z")
    for terms in per_gpu:
        if terms:
            solver.Add(sum(terms) <= z)
    solver.Minimize(z)
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        raise RuntimeError("burst reference MIP did not reach optimality")
    chosen = candidates[[v.solution_value() > 0.5 for v in y]] if len(y) else NO_COPIES
    return max(0, math.ceil(z.solution_value() - _CEIL_TOLERANCE)), chosen.reshape(-1, 2)


def fewest_copies(
    tokens: np.ndarray,
    placement: Placement,
    cap: int,
    held: np.ndarray = NO_COPIES,
    slots: int = 1,
    node_size: int | None = None,
) -> int | None:
    """The fewest admissible new copies that bring every GPU load to at most ``cap`` (None if none do)."""
    solver, per_gpu, y, _ = _model(tokens, placement, held, slots, node_size)
    for terms in per_gpu:
        if terms:
            solver.Add(sum(terms) <= float(cap))
    solver.Minimize(sum(y) if y else 0)
    status = solver.Solve()
    if status == pywraplp.Solver.INFEASIBLE:
        return None
    if status != pywraplp.Solver.OPTIMAL:
        raise RuntimeError("burst reference MIP did not reach optimality")
    return int(round(solver.Objective().Value()))
