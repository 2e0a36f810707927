"""Routing history, background re-planning and synchronized placement changes for one layer.

Every rank of the layer's expert domain sees the same per-micro-batch counts (they are gathered for
scheduling), so every rank keeps the same history (E integers per micro-batch) and takes the same
decisions from it; only the planner rank (rank 0 of the group) runs the planner. Every
``replan_interval`` steps it starts the planner in a background thread on the last
``history_window`` steps; the result is adopted ``replan_lag`` steps later, at the first forward of
that step, by every rank at once: the planner rank waits for its thread if it is still running
(logged), then broadcasts the placement. A planner that fails or returns an invalid placement is
logged with its traceback and every rank keeps the current placement. Step numbers come from the
caller and are equal on every rank, so all ranks take the same branch at the same collective.
``state``/``load_state`` carry placement, history, step and a pending plan's outcome across a
restart (FSEP layers save them in Megatron checkpoints).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_microep.planning.forecast import planner_input
from megatron_microep.planning.placement import Placement
from megatron_microep.runtime.layout import PhysicalLayout

logger = logging.getLogger(__name__)

# history int64 [S, E], num_gpus, redundant_slots, current Placement -> new Placement. Both planners
# score the history plus ``forecast_samples`` forecast samples (planning.forecast.planner_input).
PlannerFn = Callable[[np.ndarray, int, int, Placement], Placement]


def ortools_planner(
    time_limit_s: float,
    move_penalty: float,
    gpus_per_node: int | None,
    forecast_samples: int = 0,
    forecast_recent: int = 1,
    forecast_burst: float = 0.0,
) -> PlannerFn:
    def plan(history, num_gpus, redundant_slots, current):
        from megatron_microep.planning.planner import plan_placement

        return plan_placement(
            planner_input(history, forecast_samples, forecast_recent, forecast_burst),
            num_gpus,
            redundant_slots,
            gpus_per_node=gpus_per_node,
            time_limit_s=time_limit_s,
            current=current,
            move_penalty=move_penalty,
        ).placement

    return plan


def greedy_planner(
    time_limit_s: float,
    move_penalty: float,
    gpus_per_node: int | None,
    forecast_samples: int = 0,
    forecast_recent: int = 1,
    forecast_burst: float = 0.0,
) -> PlannerFn:
    def plan(history, num_gpus, redundant_slots, current):
        from megatron_microep.planning.eplb import eplb_placement

        return eplb_placement(
            planner_input(history, forecast_samples, forecast_recent, forecast_burst),
            num_gpus,
            redundant_slots,
            gpus_per_node,
        )

    return plan


PLANNERS = {"ortools": ortools_planner, "greedy": greedy_planner}


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
    thread: threading.Thread | None
    result: list[object]  # [Placement] or [BaseException] once the thread is done
    started: float


class PlacementController:
    """History and re-planning for one layer; ``group`` spans the layer's expert domain (tp_ep)."""

    def __init__(
        self,
        layout: PhysicalLayout,
        planner: PlannerFn,
        replan_interval: int,
        history_window: int,
        replan_lag: int,
        group,
        device: torch.device,
        name: str = "",
    ):
        self.layout = layout
        self.planner = planner
        self.replan_interval = replan_interval
        self.history_window = history_window
        self.replan_lag = replan_lag
        self.group = group
        self.device = device
        self.name = name
        self.is_planner = dist.get_rank(group) == 0
        self.version = 0  # bumped on every adopted placement
        self._steps: deque[np.ndarray] = deque(maxlen=history_window)  # int64 [micro-batches, E] per step
        self._current_rows: list[np.ndarray] = []
        self._step: int | None = None
        self._pending: _Pending | None = None
        self._replan_next_step = False  # set when a restored state's placement could not apply

    def record(self, expert_load: np.ndarray) -> None:
        """Expert loads int64 [E] of one training micro-batch (summed over the group's sources)."""
        self._current_rows.append(np.asarray(expert_load, dtype=np.int64))

    def history(self) -> np.ndarray:
        """int64 [S, E]: micro-batch rows of the completed steps in the window."""
        rows = [block for block in self._steps if block.size]
        if not rows:
            return np.zeros((0, self.layout.placement.num_experts), dtype=np.int64)
        return np.concatenate(rows)

    def on_step(self, step: int) -> PhysicalLayout | None:
        """Call at the first forward of ``step`` on every rank. Returns a new layout when one takes effect."""
        if self._step is not None and step == self._step:
            return None
        if self._current_rows:
            self._steps.append(np.stack(self._current_rows))
            self._current_rows = []
        self._step = step
        adopted = None
        if self._pending is not None and step >= self._pending.adopt_step:
            adopted = self._adopt()
        replan_now, self._replan_next_step = self._replan_next_step, False
        if (
            self.replan_interval > 0
            and self._pending is None
            and (step % self.replan_interval == 0 or replan_now)
            and len(self._steps) > 0
        ):
            self._start(step)
        return adopted

    def has_state(self) -> bool:
        """Whether there is a state worth saving: a step has begun or a saved state was restored."""
        return self._step is not None or len(self._steps) > 0 or len(self._current_rows) > 0

    def state(self) -> dict:
        """The state a resumed run needs to take the same decisions, as plain Python and numpy:
        ``placement`` (GPU ids per expert), ``history`` (int64 [micro-batches, E] per completed step
        in the window), ``current_rows`` int64 [n, E] (this step's micro-batches so far), ``step``
        (None before the first) and ``pending`` (None, or the plan awaiting adoption:
        ``{"adopt_step", "placement"}``, its outcome as GPU ids per expert, None for a failed plan).
        Only the planner rank knows a pending plan's outcome (None on the others); a plan still
        being computed is waited for there (at most the planner's time limit).
        """
        E = self.layout.placement.num_experts
        pending = None
        if self._pending is not None:
            outcome = None
            if self.is_planner:
                self._pending.thread.join()
                result = self._pending.result[0]
                outcome = result.to_lists() if isinstance(result, Placement) else None
            pending = {"adopt_step": self._pending.adopt_step, "placement": outcome}
        current = np.stack(self._current_rows) if self._current_rows else np.zeros((0, E), dtype=np.int64)
        return {
            "placement": self.layout.placement.to_lists(),
            "history": [block.copy() for block in self._steps],
            "current_rows": current,
            "step": self._step,
            "pending": pending,
        }

    def load_state(self, state: dict, layout: PhysicalLayout | None) -> None:
        """Continue from a ``state`` of the same model (same call on every rank; the caller has
        validated it, with the pending plan's placement as a ``Placement`` or None). ``layout`` is
        the saved placement's layout for this controller, None when it cannot apply (another EP
        size or slot count): then the history is kept, the current layout stays, the pending plan is
        dropped and the next step re-plans."""
        self._steps.clear()
        self._steps.extend(np.asarray(block, dtype=np.int64) for block in state["history"][-self.history_window :])
        self._current_rows = [np.asarray(row, dtype=np.int64) for row in state["current_rows"]]
        self._step = state["step"]
        self._pending = None
        if layout is None:
            self._replan_next_step = True
            return
        self.set_layout(layout)
        pending = state["pending"]
        if pending is None:
            return
        result: list[object] = []
        thread = None
        if self.is_planner:
            # A planner that answers at once with the saved outcome; no outcome: a failed plan.
            outcome = (
                pending["placement"]
                if pending["placement"] is not None
                else RuntimeError("the plan pending at the checkpoint had failed")
            )
            thread = threading.Thread(target=result.append, args=(outcome,), daemon=True)
            thread.start()
        self._pending = _Pending(
            adopt_step=pending["adopt_step"], thread=thread, result=result, started=time.monotonic()
        )

    def _start(self, step: int) -> None:
        result: list[object] = []
        thread = None
        if self.is_planner:
            history = self.history()
            current = self.layout.placement
            G, R = self.layout.num_ranks, self.layout.redundant_slots

            def work():
                try:
                    result.append(self.planner(history, G, R, current))
                except BaseException as err:  # noqa: BLE001 - surfaced on adoption, on the training thread
                    result.append(err)

            thread = threading.Thread(target=work, name=f"microep-planner{self.name}", daemon=True)
            thread.start()
        self._pending = _Pending(
            adopt_step=step + self.replan_lag, thread=thread, result=result, started=time.monotonic()
        )

    def _adopt(self) -> PhysicalLayout | None:
        pending, self._pending = self._pending, None
        E = self.layout.placement.num_experts
        max_slots = E + self.layout.num_ranks * self.layout.redundant_slots
        buffer = np.full(E + 1 + max_slots, -1, dtype=np.int64)  # all -1: no plan, keep the current one
        if self.is_planner:
            if pending.thread.is_alive():
                logger.warning("MicroEP%s: planner still running at its adoption step; waiting", self.name)
            pending.thread.join()
            outcome = pending.result[0]
            try:
                if isinstance(outcome, BaseException):
                    raise outcome
                self.build_layout(outcome)  # reject an invalid plan here, before anyone adopts it
                buffer = encode_placement(outcome, E, max_slots)
            except Exception:  # noqa: BLE001 - every rank must still reach the broadcast
                logger.exception("MicroEP%s: placement planning failed; keeping the current placement", self.name)
        tensor = torch.from_numpy(buffer).to(self.device)
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, 0), group=self.group)
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
                time.monotonic() - pending.started,
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
