"""``eplb``: DeepSeek-EPLB-style replicate + pack from history, tokens split evenly over copies.

Every ``replan_interval`` steps the placement is rebuilt by ``planning.eplb.eplb_placement`` from the
mean expert loads of the last ``history_micro_batches`` micro-batches (replicate the expert with
the highest load per copy, one copy at a time; pack copies largest first onto the least-loaded GPU
with a free slot; home copies stay on Megatron's contiguous layout). Every micro-batch, each source
splits its tokens of an expert evenly over the expert's copies, as EPLB's inference engines do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_microep.planning.eplb import eplb_placement
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.policies.base import (
    Assignment,
    History,
    Policy,
    PolicyError,
    even_split_assignment,
    param,
)


@dataclass(frozen=True)
class EplbParams:
    replan_interval: int = param(1, "steps between re-plans")
    history_micro_batches: int = param(16, "micro-batches of expert loads averaged for the plan")
    node_confined: bool = param(False, "keep replicas in their home expert's node (needs --gpus-per-node)")

    def validate(self):
        if self.replan_interval < 1:
            raise PolicyError(f"eplb: replan_interval must be >= 1, got {self.replan_interval}")
        if self.history_micro_batches < 1:
            raise PolicyError(f"eplb: history_micro_batches must be >= 1, got {self.history_micro_batches}")


class EplbPolicy(Policy):
    name = "eplb"
    summary = "DeepSeek EPLB-style: replicate + pack from history, even split over copies"
    replans = True
    Params = EplbParams

    def history_needs(self) -> tuple[int, int]:
        return (self.params.history_micro_batches, 1)

    def place(self, history: History, current: Placement) -> Placement:
        loads = history.expert_loads[-self.params.history_micro_batches :]
        if len(loads) == 0:
            return current
        lay = self.layout
        return eplb_placement(
            loads, lay.num_gpus, lay.redundant_slots, lay.gpus_per_node if self.params.node_confined else None
        )

    def assign(self, tokens: np.ndarray, placement: Placement) -> Assignment:
        return even_split_assignment(tokens, placement)
