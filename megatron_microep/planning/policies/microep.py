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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_microep.planning.forecast import check_settings
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.plan import PlannerSettings, PlanTarget, plan_from_history
from megatron_microep.planning.policies.base import Assignment, History, Policy, PolicyError, param
from megatron_microep.planning.scheduler import schedule

# The policy's planner names -> the shared planner's methods.
PLANNER_METHODS = {"ortools": "ortools", "eplb": "greedy"}


@dataclass(frozen=True)
class MicroEpParams:
    replan_interval: int = param(1, "steps between re-plans")
    history_micro_batches: int = param(16, "micro-batches of expert loads the planner scores plans on")
    forecast_samples: int = param(32, "forecast samples scored with the history (0: the history alone)")
    forecast_recent: int = param(4, "latest micro-batches whose mean is the forecast's level")
    forecast_burst: float = param(
        3.0, "cap on the burst each expert gets once in the forecast, a multiple of its level (0: off)"
    )
    time_limit_s: float = param(0.5, "planner wall-time limit per layer and re-plan")
    use_solver: bool = param(True, "run CP-SAT after the greedy starts and local search")
    move_penalty: float = param(0.0, "tokens of expected max load one moved replica is worth")
    node_confined: bool = param(False, "keep replicas in their home expert's node (needs --gpus-per-node)")
    planner: str = param("ortools", "'ortools' (plan_placement) or 'eplb' (EPLB-style greedy placement)")

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
        result = schedule(tokens, placement)
        return Assignment(
            tokens,
            placement,
            result.slot_tokens,
            result.piece_src,
            result.piece_slot,
            result.piece_count,
            np.zeros((0, 2), dtype=np.int64),
        )
