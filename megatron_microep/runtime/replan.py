"""Routing history, re-planning in a planner process and synchronized placement changes for one layer.

Every rank of the layer's expert domain sees the same per-micro-batch counts (they are gathered for
scheduling), so every rank keeps the same history (``planning.history.LoadHistory``, E integers per
micro-batch) and takes the same decisions from it. Layers are planned by different ranks of the
domain: layer ``i`` (Megatron's 1-based layer number) by rank ``(i - 1) mod D`` of the group, the
layer's *planner rank*. Every ``replan_interval`` steps the planner rank sends the last
``history_window`` steps and the current placement to its planner process
(``runtime.planner_pool``: a separate interpreter, started at the first re-plan, never holding this
process's GIL), which runs the layer's ``HistoryPlanner`` (``planning.plan.plan_from_history``). The
result is adopted ``replan_lag`` steps later, at the first forward of that step, by every rank at
once: the planner rank collects it and broadcasts the placement. Step numbers come from the caller
and are equal on every rank, so all ranks take the same branch at the same collective.

Time limits. A rank's planner process runs its layers' plans one after another, and they must be
back by the adoption step. So each plan gets ``min(planner time limit, FIT_SHARE * replan_lag *
(the last step's seconds) / (layers this process plans))``, at least ``MIN_TIME_LIMIT_S`` (the
configured limit alone before a step has been timed).

Failures. A plan that raises, returns an invalid placement, comes from a planner process that
died, or is late (no answer by its due time, ``runtime.planner_pool``: the planner rank waits at
most that long at the adoption step) is logged with the reason, and every rank keeps the current
placement. ``state``/``load_state`` carry placement, history, step and a pending plan's outcome
across a restart (FSEP layers save them in Megatron checkpoints).
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_microep.planning.history import LoadHistory
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.plan import HistoryPlanner
from megatron_microep.runtime.layout import PhysicalLayout
from megatron_microep.runtime.planner_pool import PlanJob, planner_process

logger = logging.getLogger(__name__)

FIT_SHARE = 0.5  # of the lag's time, what this process's plans may take together (the rest is slack)
MIN_TIME_LIMIT_S = 0.05

# Controllers of this process, to count the layers its planner process plans per re-plan.
_CONTROLLERS: weakref.WeakSet = weakref.WeakSet()


def fitted_time_limit(configured_s: float, lag_seconds: float | None, plans: int) -> float:
    """A plan's time limit: ``min(configured_s, FIT_SHARE * lag_seconds / plans)``, at least
    ``MIN_TIME_LIMIT_S`` (and ``configured_s`` when ``lag_seconds`` is unknown)."""
    if lag_seconds is None:
        return configured_s
    return min(configured_s, max(MIN_TIME_LIMIT_S, FIT_SHARE * lag_seconds / max(plans, 1)))


def encode_placement(placement: Placement, num_experts: int, max_slots: int) -> np.ndarray:
    """Fixed-size int64 [E + 1 + max_slots] (ptr, then GPU ids padded with -1) for a broadcast."""
    out = np.full(num_experts + 1 + max_slots, -1, dtype=np.int64)
    out[: num_experts + 1] = placement.ptr
    out[num_experts + 1 : num_experts + 1 + placement.num_slots] = placement.gpus
    return out


def decode_placement(buffer: np.ndarray, num_experts: int, num_gpus: int) -> Placement:
    ptr = buffer[: num_experts + 1]
    gpus = buffer[num_experts + 1 : num_experts + 1 + int(ptr[-1])]
    return Placement.from_lists([gpus[ptr[e] : ptr[e + 1]].tolist() for e in range(num_experts)], num_gpus)


@dataclass
class _Pending:
    adopt_step: int
    job: PlanJob | None  # on the planner rank only


class PlacementController:
    """History and re-planning for one layer; ``group`` spans the layer's expert domain (tp_ep).

    ``planner``: a ``HistoryPlanner`` (or any picklable ``planner(window, current, time_limit_s)``
    with a ``time_limit_s`` attribute). ``layer_number``: Megatron's layer number, which picks the
    planner rank (``set_layer_number`` when it is known only later).
    """

    def __init__(
        self,
        layout: PhysicalLayout,
        planner: HistoryPlanner,
        replan_interval: int,
        history_window: int,
        replan_lag: int,
        group,
        device: torch.device,
        name: str = "",
        layer_number: int | None = None,
    ):
        self.layout = layout
        self.planner = planner
        self.replan_interval = replan_interval
        self.replan_lag = replan_lag
        self.group = group
        self.device = device
        self.name = name
        self.layer_number = layer_number
        self.version = 0  # bumped on every adopted placement
        self.loads = LoadHistory(layout.placement.num_experts, steps=history_window)
        self.step_seconds: float | None = None  # the last step's wall time on this rank
        self._step_began: float | None = None
        self._step: int | None = None
        self._pending: _Pending | None = None
        self._replan_next_step = False  # set when a restored state's placement could not apply
        _CONTROLLERS.add(self)

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number
        self.name = f" layer {layer_number}"

    @property
    def planner_rank(self) -> int:
        """The rank of ``group`` that plans this layer."""
        return (self.layer_number - 1) % dist.get_world_size(self.group) if self.layer_number else 0

    @property
    def is_planner(self) -> bool:
        return dist.get_rank(self.group) == self.planner_rank

    def record(self, expert_load: np.ndarray) -> None:
        """Expert loads int64 [E] of one training micro-batch (summed over the group's sources)."""
        self.loads.record(expert_load)

    def history(self) -> np.ndarray:
        """int64 [S, E]: micro-batch rows of the completed steps in the window."""
        return self.loads.window()

    def on_step(self, step: int) -> PhysicalLayout | None:
        """Call at the first forward of ``step`` on every rank. Returns a new layout when one takes effect."""
        if self._step is not None and step == self._step:
            return None
        now = time.monotonic()
        if self._step_began is not None:
            self.step_seconds = now - self._step_began
        self._step_began = now
        self.loads.end_step()
        self._step = step
        adopted = None
        if self._pending is not None and step >= self._pending.adopt_step:
            adopted = self._adopt()
        replan_now, self._replan_next_step = self._replan_next_step, False
        if (
            self.replan_interval > 0
            and self._pending is None
            and (step % self.replan_interval == 0 or replan_now)
            and len(self.loads) > 0
        ):
            self._start(step)
        return adopted

    def has_state(self) -> bool:
        """Whether there is a state worth saving: a step has begun or a saved state was restored."""
        return self._step is not None or len(self.loads) > 0 or len(self.loads.current()) > 0

    def state(self) -> dict:
        """The state a resumed run needs to take the same decisions, as plain Python and numpy:
        ``placement`` (GPU ids per expert), ``history`` (int64 [micro-batches, E] per completed step
        in the window), ``current_rows`` int64 [n, E] (this step's micro-batches so far), ``step``
        (None before the first) and ``pending`` (None, or the plan awaiting adoption:
        ``{"adopt_step", "placement"}``, its outcome as GPU ids per expert, None for a failed plan).
        Only the planner rank knows a pending plan's outcome (None on the others); a plan still
        being computed is waited for there (at most until it is late).
        """
        pending = None
        if self._pending is not None:
            outcome = None
            if self.is_planner:
                result = self._outcome(self._pending.job)
                outcome = result.to_lists() if isinstance(result, Placement) else None
            pending = {"adopt_step": self._pending.adopt_step, "placement": outcome}
        return {
            "placement": self.layout.placement.to_lists(),
            "history": self.loads.blocks(),
            "current_rows": self.loads.current(),
            "step": self._step,
            "pending": pending,
        }

    def load_state(self, state: dict, layout: PhysicalLayout | None) -> None:
        """Continue from a ``state`` of the same model (same call on every rank; the caller has
        validated it, with the pending plan's placement as a ``Placement`` or None). ``layout`` is
        the saved placement's layout for this controller, None when it cannot apply (another EP
        size or slot count): then the history is kept, the current layout stays, the pending plan is
        dropped and the next step re-plans."""
        self.loads.restore(state["history"], state["current_rows"])
        self._step = state["step"]
        self._pending = None
        if layout is None:
            self._replan_next_step = True
            return
        self.set_layout(layout)
        pending = state["pending"]
        if pending is None:
            return
        job = None
        if self.is_planner:  # a plan that answers at once with the saved outcome; none: a failed plan
            outcome = pending["placement"]
            job = PlanJob.answered(
                outcome if outcome is not None else RuntimeError("the plan pending at the checkpoint had failed")
            )
        self._pending = _Pending(adopt_step=pending["adopt_step"], job=job)

    def _start(self, step: int) -> None:
        job = None
        if self.is_planner:
            # Every MoE layer of a process has the same domain group; others (e.g. tests) are not counted.
            plans = sum(
                1 for c in list(_CONTROLLERS) if c.group is self.group and c.replan_interval > 0 and c.is_planner
            )
            lag_seconds = None if self.step_seconds is None else self.replan_lag * self.step_seconds
            limit = fitted_time_limit(self.planner.time_limit_s, lag_seconds, plans)
            try:
                job = planner_process().submit(self.planner, (self.history(), self.layout.placement, limit), limit)
            except Exception as err:  # noqa: BLE001 - e.g. no process could be started; surfaced on adoption
                job = PlanJob.answered(err)
        self._pending = _Pending(adopt_step=step + self.replan_lag, job=job)

    @staticmethod
    def _outcome(job: PlanJob) -> Placement | BaseException:
        planner_process().wait(job)
        try:
            return job.result()
        except Exception as err:  # noqa: BLE001 - the caller decides what a failed plan means
            return err

    def _adopt(self) -> PhysicalLayout | None:
        pending, self._pending = self._pending, None
        E = self.layout.placement.num_experts
        max_slots = E + self.layout.num_ranks * self.layout.redundant_slots
        buffer = np.full(E + 1 + max_slots, -1, dtype=np.int64)  # all -1: no plan, keep the current one
        if self.is_planner:
            if not pending.job.done():
                logger.info("MicroEP%s: plan not back at its adoption step; waiting for it", self.name)
            outcome = self._outcome(pending.job)
            try:
                if isinstance(outcome, BaseException):
                    raise outcome
                self.build_layout(outcome)  # reject an invalid plan here, before anyone adopts it
                buffer = encode_placement(outcome, E, max_slots)
            except Exception as err:  # noqa: BLE001 - every rank must still reach the broadcast
                logger.warning(
                    "MicroEP%s: placement planning failed, keeping the current placement: %s: %s",
                    self.name,
                    type(err).__name__,
                    err,
                )
        tensor = torch.from_numpy(buffer).to(self.device)
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, self.planner_rank), group=self.group)
        received = tensor.cpu().numpy()
        if received[0] < 0:
            return None
        placement = decode_placement(received, E, self.layout.num_ranks)
        layout = self.build_layout(placement)
        if self.is_planner:
            logger.info(
                "MicroEP%s: new placement with %d replicas after %.1f s of planning",
                self.name,
                placement.num_slots - E,
                pending.job.seconds,
            )
        self.layout = layout
        self.version += 1
        return layout

    def build_layout(self, placement: Placement) -> PhysicalLayout:
        """The physical layout of an adopted placement (FSEP's controller overrides the layout rules)."""
        return PhysicalLayout.build(placement, self.layout.experts_per_rank, self.layout.redundant_slots)

    def set_layout(self, layout: PhysicalLayout) -> None:
        """Adopt ``layout`` now (same call on every rank), e.g. a placement restored by the user."""
        self.layout = layout
        self.version += 1
