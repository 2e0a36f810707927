"""Plan from history: the one path from a layer's routing history to its next placement.

The runtime (``runtime.replan`` for replica layers, the FSEP layer's controller) and the simulator's
``microep`` policy all call ``plan_from_history``:

    history window int [S, E] -> planner input (``forecast.planner_input``: the window plus
    forecast samples) -> the planner ``settings.method`` names for the layout ``target`` describes.

| target | ``ortools`` | ``greedy`` |
|---|---|---|
| ``replicas``: Megatron's home experts + ``slots`` replica slots per GPU | ``planner.plan_placement`` | ``eplb.eplb_placement`` |
| ``fsep``: ``slots`` slots per GPU, any expert anywhere | ``fsep_layout.plan_fsep_layout`` | ``fsep_layout.greedy_layout`` |

``PlannerSettings`` has no defaults on purpose: every caller passes the values of its one settings
source (the runtime's ``--microep-*`` settings, the simulator's ``microep`` parameters), so the
planner cannot silently run with settings of its own. ``HistoryPlanner`` binds a target and settings
into a picklable callable, which is what the runtime ships to its planner processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_microep.planning.eplb import eplb_placement
from megatron_microep.planning.forecast import check_settings, planner_input
from megatron_microep.planning.fsep_layout import greedy_layout, placement_from_holds, plan_fsep_layout
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.planner import plan_placement

METHODS = ("ortools", "greedy")
TARGETS = ("replicas", "fsep")


@dataclass(frozen=True)
class PlannerSettings:
    """How a placement is planned from history (all explicit; see the module doc).

    ``method``: ``ortools`` (the time-limited exact-objective planner) or ``greedy`` (EPLB-style).
    ``time_limit_s``: wall-time limit of one plan (callers may pass a smaller one per plan).
    ``move_penalty``: tokens of expected max load one moved replica is worth (replicas only).
    ``gpus_per_node``: keep replicas inside their home expert's node of this many GPUs (replicas
    only; None: anywhere). ``forecast_samples`` / ``forecast_recent`` / ``forecast_burst``: the
    planner input (``forecast.planner_input``). ``use_solver``: CP-SAT after the local search.
    """

    method: str
    time_limit_s: float
    move_penalty: float
    gpus_per_node: int | None
    forecast_samples: int
    forecast_recent: int
    forecast_burst: float
    use_solver: bool

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"planner method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0, got {self.time_limit_s}")
        if self.move_penalty < 0:
            raise ValueError(f"move_penalty must be >= 0, got {self.move_penalty}")
        if self.gpus_per_node is not None and self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {self.gpus_per_node}")
        check_settings(self.forecast_samples, self.forecast_recent, self.forecast_burst)


@dataclass(frozen=True)
class PlanTarget:
    """The layout a plan fills: ``kind`` ``replicas`` (Megatron's contiguous home experts plus
    ``slots`` replica slots per GPU) or ``fsep`` (``slots`` slots per GPU, any expert on any GPU)."""

    kind: str
    num_gpus: int
    slots: int

    def __post_init__(self):
        if self.kind not in TARGETS:
            raise ValueError(f"plan target must be one of {', '.join(TARGETS)}, got {self.kind!r}")
        if self.num_gpus < 1 or self.slots < 0:
            raise ValueError(f"plan target needs num_gpus >= 1 and slots >= 0, got {self.num_gpus}, {self.slots}")


def _replicas_ortools(loads, target, settings, current, time_limit_s):
    return plan_placement(
        loads,
        target.num_gpus,
        target.slots,
        settings.gpus_per_node,
        time_limit_s=time_limit_s,
        current=current,
        move_penalty=settings.move_penalty,
        use_solver=settings.use_solver,
    ).placement


def _replicas_greedy(loads, target, settings, current, time_limit_s):
    return eplb_placement(loads, target.num_gpus, target.slots, settings.gpus_per_node)


def _fsep_ortools(loads, target, settings, current, time_limit_s):
    return plan_fsep_layout(
        loads, target.num_gpus, target.slots, time_limit_s=time_limit_s, current=current, use_solver=settings.use_solver
    ).placement


def _fsep_greedy(loads, target, settings, current, time_limit_s):
    return placement_from_holds(greedy_layout(loads, target.num_gpus, target.slots))


_PLANNERS = {
    ("replicas", "ortools"): _replicas_ortools,
    ("replicas", "greedy"): _replicas_greedy,
    ("fsep", "ortools"): _fsep_ortools,
    ("fsep", "greedy"): _fsep_greedy,
}


def plan_from_history(
    window,
    target: PlanTarget,
    settings: PlannerSettings,
    current: Placement | None = None,
    time_limit_s: float | None = None,
) -> Placement:
    """The next placement of a layer from its history ``window`` int [S, E] (S >= 1, oldest first).

    ``current``: the placement in use (the OR-Tools planners start from it). ``time_limit_s``: this
    plan's limit, at most ``settings.time_limit_s`` (None: that). Raises ValueError for bad inputs.
    """
    limit = settings.time_limit_s if time_limit_s is None else min(time_limit_s, settings.time_limit_s)
    if not limit > 0:
        raise ValueError(f"time_limit_s must be > 0, got {time_limit_s}")
    window = np.asarray(window)
    if window.ndim != 2 or len(window) == 0:
        raise ValueError(f"the history window must be a non-empty [micro-batches, experts] matrix, got {window.shape}")
    loads = planner_input(window, settings.forecast_samples, settings.forecast_recent, settings.forecast_burst)
    return _PLANNERS[target.kind, settings.method](loads, target, settings, current, limit)


@dataclass(frozen=True)
class HistoryPlanner:
    """``plan_from_history`` bound to a target and settings: ``planner(window, current, time_limit_s)``."""

    target: PlanTarget
    settings: PlannerSettings

    @property
    def time_limit_s(self) -> float:
        return self.settings.time_limit_s

    def __call__(self, window, current: Placement | None = None, time_limit_s: float | None = None) -> Placement:
        return plan_from_history(window, self.target, self.settings, current, time_limit_s)


def warm_up() -> None:
    """Load (or compile) the planners' numba kernels once, e.g. in a fresh planner process."""
    window = np.array([[3, 1, 1, 1], [1, 3, 1, 1]], dtype=np.int64)
    settings = PlannerSettings("ortools", 0.05, 0.0, None, 0, 1, 0.0, False)
    plan_from_history(window, PlanTarget("replicas", 2, 1), settings)
    plan_from_history(window, PlanTarget("fsep", 2, 3), settings)
