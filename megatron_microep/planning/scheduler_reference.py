"""Slow exact reference for the scheduler: the min-max LP solved by OR-Tools (GLOP).

Variables ``x[r] >= 0`` (tokens processed by copy ``r``) and ``z``; minimise ``z`` subject to
``sum_{r of e} x[r] = load[e]`` and ``sum_{r on g} x[r] <= z``. The integral optimum is
``ceil(z*)`` (a flow problem), which the fast solver must reach exactly.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np
from ortools.linear_solver import pywraplp

from megatron_microep.planning.placement import Placement

# GLOP's optimum is exact to ~1e-9 relative; ceil must not round a 12.0000000001 up to 13.
_CEIL_TOLERANCE = 1e-6


def _solver() -> pywraplp.Solver:
    solver = pywraplp.Solver.CreateSolver("GLOP")
    if solver is None:
        raise RuntimeError("OR-Tools GLOP is unavailable")
    return solver


def _routing_lp(solver, load: np.ndarray, placement: Placement):
    x = [solver.NumVar(0.0, solver.infinity(), f"x{r}") for r in range(placement.num_slots)]
    for e in range(placement.num_experts):
        solver.Add(sum(x[r] for r in range(placement.ptr[e], placement.ptr[e + 1])) == float(load[e]))
    per_gpu: list[list] = [[] for _ in range(placement.num_gpus)]
    for r, g in enumerate(placement.gpus):
        per_gpu[g].append(x[r])
    return x, per_gpu


class LPSolution(NamedTuple):
    value: float  # LP optimum z*
    optimum: int  # integral optimum ceil(z*)
    build_seconds: float  # building the model through the Python API
    solve_seconds: float  # GLOP alone


def lp_min_max_load(tokens: np.ndarray, placement: Placement) -> LPSolution:
    """The min-max LP for ``tokens`` int [G, E] over ``placement``."""
    start = time.perf_counter()
    load = np.asarray(tokens, dtype=np.int64).sum(axis=0)
    solver = _solver()
    _, per_gpu = _routing_lp(solver, load, placement)
    z = solver.NumVar(0.0, solver.infinity(), "z")
    for terms in per_gpu:
        solver.Add(sum(terms) <= z)
    solver.Minimize(z)
    built = time.perf_counter()
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        raise RuntimeError("reference LP did not reach optimality")
    solved = time.perf_counter()
    value = z.solution_value()
    return LPSolution(value, max(0, math.ceil(value - _CEIL_TOLERANCE)), built - start, solved - built)


def lp_min_remote_tokens(tokens: np.ndarray, placement: Placement, max_load: int) -> int:
    """Fewest tokens that must leave their source GPU with every GPU load <= ``max_load``.

    Copy ``r`` on GPU ``g`` may serve up to ``tokens[g, e]`` local tokens; the rest is remote.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    load = tokens.sum(axis=0)
    solver = _solver()
    x, per_gpu = _routing_lp(solver, load, placement)
    local = []
    for e in range(placement.num_experts):
        for r in range(placement.ptr[e], placement.ptr[e + 1]):
            g = placement.gpus[r]
            kept = solver.NumVar(0.0, float(tokens[g, e]), f"l{r}")
            solver.Add(kept <= x[r])
            local.append(kept)
    for terms in per_gpu:
        solver.Add(sum(terms) <= float(max_load))
    solver.Maximize(sum(local))
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        raise RuntimeError("reference locality LP did not reach optimality")
    return int(load.sum()) - int(round(solver.Objective().Value()))
