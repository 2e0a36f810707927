"""``microep``: MicroEP. OR-Tools replica placement from history, exact min-max scheduling per micro-batch.

Every ``replan_interval`` steps the runtime's own planning path, ``planning.plan.plan_from_history``,
plans the layer from the last ``history_micro_batches`` micro-batches of its history (the runtime's
history type, ``planning.history.LoadHistory``): ``planning.planner.plan_placement`` chooses the
replicas that minimise the scheduler's expected optimal max load over those micro-batches plus
``forecast_samples`` samples drawn from them by ``planning.forecast.forecast_samples`` (level of the
last ``forecast_recent``, noise of the whole window, every expert once at its level times the level
rule's largest error in the window, at most ``forecast_burst``), starting from the current
placement, ``move_penalty`` tokens per moved copy, within ``time_limit_s``. Every micro-batch
``planning.scheduler.schedule`` splits each expert's tokens over its copies with the exact min-max
solve, local copies first.

``planner="eplb"`` places replicas with the EPLB-style greedy instead (the runtime's
``--microep-planner greedy``; same scheduler), a cheaper planner for very large layouts; reports
label it.

With ``burst_slots`` D > 0, every GPU also has D burst slots per step (beyond the redundant slots):
``planning.burst.plan_burst`` adds temporary copies from the micro-batch's own counts while the exact
optimum is above ``burst_tolerance`` times the mean, inside the expert's home node unless
``burst_node_confined`` is false; copies made earlier in the step are reused, and all are dropped
at the step's end (``Assignment.step_copies``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_microep.planning.burst import NO_COPIES, plan_burst
from megatron_microep.planning.forecast import check_settings
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.plan import PlannerSettings, PlanTarget, plan_from_history
from megatron_microep.planning.policies.base import Assignment, History, Policy, PolicyError, param
from megatron_microep.planning.scheduler import schedule
from megatron_microep.settings import simulator_defaults

# The runtime's defaults (megatron_microep.settings), so the simulator replays what a MicroEP run does by default.
_RUNTIME = simulator_defaults()

# The policy's planner names -> the shared planner's methods.
PLANNER_METHODS = {"ortools": "ortools", "eplb": "greedy"}


@dataclass(frozen=True)
class MicroEpParams:
    replan_interval: int = param(_RUNTIME["replan_interval"], "steps between re-plans")
    history_micro_batches: int = param(16, "micro-batches of expert loads the planner scores plans on")
    forecast_samples: int = param(
        _RUNTIME["forecast_samples"], "forecast samples scored with the history (0: the history alone)"
    )
    forecast_recent: int = param(_RUNTIME["forecast_recent"], "latest micro-batches whose mean is the forecast's level")
    forecast_burst: float = param(
        _RUNTIME["forecast_burst"],
        "cap on the burst each expert gets once in the forecast, a multiple of its level (0: off)",
    )
    time_limit_s: float = param(_RUNTIME["time_limit_s"], "planner wall-time limit per layer and re-plan")
    use_solver: bool = param(True, "run CP-SAT after the greedy starts and local search")
    move_penalty: float = param(_RUNTIME["move_penalty"], "tokens of expected max load one moved replica is worth")
    node_confined: bool = param(
        _RUNTIME["node_confined"], "keep replicas in their home expert's node (needs --gpus-per-node)"
    )
    planner: str = param(_RUNTIME["planner"], "'ortools' (plan_placement) or 'eplb' (EPLB-style greedy placement)")
    burst_slots: int = param(0, "burst slots per GPU and step for copies chosen per micro-batch (0: off)")
    burst_tolerance: float = param(1.02, "add burst copies while max load > this times the mean (>= 1)")
    burst_node_confined: bool = param(True, "burst copies stay in their expert's home node (NVLink pushes)")

    def validate(self):
        if self.planner not in PLANNER_METHODS:
            raise PolicyError(f"microep: planner must be 'ortools' or 'eplb', got {self.planner!r}")
        if self.replan_interval < 1:
            raise PolicyError(f"microep: replan_interval must be >= 1, got {self.replan_interval}")
        try:
            check_settings(
                self.forecast_samples,
                self.forecast_recent,
                self.forecast_burst,
                ("forecast_samples", "forecast_recent", "forecast_burst"),
            )
        except ValueError as err:
            raise PolicyError(f"microep: {err}") from None
        if self.history_micro_batches < 1:
            raise PolicyError(f"microep: history_micro_batches must be >= 1, got {self.history_micro_batches}")
        if self.time_limit_s <= 0:
            raise PolicyError(f"microep: time_limit_s must be > 0, got {self.time_limit_s}")
        if self.move_penalty < 0:
            raise PolicyError(f"microep: move_penalty must be >= 0, got {self.move_penalty}")
        if self.burst_slots < 0:
            raise PolicyError(f"microep: burst_slots must be >= 0, got {self.burst_slots}")
        if self.burst_tolerance < 1.0:
            raise PolicyError(f"microep: burst_tolerance must be >= 1, got {self.burst_tolerance}")


class MicroEpPolicy(Policy):
    name = "microep"
    summary = "MicroEP: OR-Tools placement from history + exact min-max scheduler per micro-batch"
    replans = True
    decides_per_micro_batch = True
    Params = MicroEpParams

    def history_needs(self) -> tuple[int, int]:
        return (self.params.history_micro_batches, 1)

    def planner_settings(self) -> PlannerSettings:
        """The shared planner's settings for these parameters."""
        p = self.params
        return PlannerSettings(
            method=PLANNER_METHODS[p.planner],
            time_limit_s=p.time_limit_s,
            move_penalty=p.move_penalty,
            gpus_per_node=self.layout.gpus_per_node if p.node_confined else None,
            forecast_samples=p.forecast_samples,
            forecast_recent=p.forecast_recent,
            forecast_burst=p.forecast_burst,
            use_solver=p.use_solver,
        )

    def place(self, history: History, current: Placement) -> Placement:
        loads = history.loads.window(self.params.history_micro_batches)
        if len(loads) == 0:
            return current
        target = PlanTarget("replicas", self.layout.num_gpus, self.layout.redundant_slots)
        try:
            return plan_from_history(loads, target, self.planner_settings(), current)
        except ValueError as err:
            raise PolicyError(f"microep planner: {err}") from None

    def assign(self, tokens: np.ndarray, placement: Placement) -> Assignment:
        return self.assign_in_step(tokens, placement, NO_COPIES)

    def assign_in_step(self, tokens: np.ndarray, placement: Placement, held: np.ndarray) -> Assignment:
        p = self.params
        copies = NO_COPIES
        if p.burst_slots == 0:
            result = schedule(tokens, placement)
        else:
            node_size = self.layout.node_size if p.burst_node_confined else None
            plan = plan_burst(tokens, placement, held, p.burst_slots, node_size, p.burst_tolerance)
            placement, result, copies = plan.placement, plan.schedule, plan.copies
        return Assignment(
            tokens,
            placement,
            result.slot_tokens,
            result.piece_src,
            result.piece_slot,
            result.piece_count,
            np.zeros((0, 2), dtype=np.int64),
            copies,
        )
