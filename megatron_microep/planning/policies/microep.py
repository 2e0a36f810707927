"""``microep``: MicroEP. OR-Tools replica placement from history, exact min-max scheduling per micro-batch.

Every ``replan_interval`` steps ``planning.planner.plan_placement`` chooses the replicas that
minimise the scheduler's expected optimal max load over the last ``history_micro_batches``
micro-batches plus ``forecast_samples`` samples drawn from them by
``planning.forecast.forecast_samples`` (level of the last ``forecast_recent``, noise of the whole
window, every expert once at its level times the level rule's largest error in the window, at most
``forecast_burst``), starting from the
current placement, ``move_penalty`` tokens per moved copy, within ``time_limit_s``. Every micro-batch ``planning.scheduler.schedule`` splits each expert's
tokens over its copies with the exact min-max solve, local copies first.

``planner="eplb"`` places replicas with the EPLB-style greedy instead (same scheduler), a cheaper
planner for very large layouts; reports label it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_microep.planning.eplb import eplb_placement
from megatron_microep.planning.forecast import check_settings, planner_input
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.planner import plan_placement
from megatron_microep.planning.policies.base import Assignment, History, Policy, PolicyError, param
from megatron_microep.planning.scheduler import schedule
from megatron_microep.settings import simulator_defaults

# The runtime's defaults (megatron_microep.settings), so the simulator replays what a MicroEP run does by default.
_RUNTIME = simulator_defaults()


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

    def validate(self):
        if self.planner not in ("ortools", "eplb"):
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

    def place(self, history: History, current: Placement) -> Placement:
        loads = history.expert_loads[-self.params.history_micro_batches :]
        if len(loads) == 0:
            return current
        lay = self.layout
        p = self.params
        loads = planner_input(loads, p.forecast_samples, p.forecast_recent, p.forecast_burst)
        node_size = lay.gpus_per_node if p.node_confined else None
        if p.planner == "eplb":
            return eplb_placement(loads, lay.num_gpus, lay.redundant_slots, node_size)
        try:
            return plan_placement(
                loads,
                lay.num_gpus,
                lay.redundant_slots,
                node_size,
                time_limit_s=p.time_limit_s,
                current=current,
                move_penalty=p.move_penalty,
                use_solver=p.use_solver,
            ).placement
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
