"""``microep_fsep``: MicroEP with ``--microep-expert-sharding fsep`` (docs/fsep.md), as the runtime runs it.

The layout (``home_slots + redundant_slots`` slots per GPU, any expert anywhere, every copy gathered
from shards each micro-batch) is re-planned from history by the runtime's FSEP planner
(``PlanTarget("fsep")``), and every micro-batch is balanced over it by the exact scheduler. With
``burst_slots`` D > 0, ``planning.burst.plan_burst`` adds up to D copies per GPU from the
micro-batch's own counts (on any GPU: each is gathered from every GPU's shard, as the layout's
copies are), for that micro-batch only (``Assignment.gathered_copies``; none is held for later
micro-batches). The cost model charges the layout's gathers as prefetched and the burst copies'
gather as issued after the count read beside the dispatch all-to-all (``simulator.cost``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from megatron_microep.planning.burst import NO_COPIES
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.plan import PlanTarget, plan_from_history
from megatron_microep.planning.policies.base import Assignment, History, PolicyError, param
from megatron_microep.planning.policies.microep import MicroEpParams, MicroEpPolicy


@dataclass(frozen=True)
class MicroEpFsepParams(MicroEpParams):
    burst_node_confined: bool = param(
        False, "must stay false: an FSEP copy is gathered from every GPU, it has no home node"
    )

    def validate(self):
        super().validate()
        if self.burst_node_confined or self.node_confined:
            raise PolicyError(
                "microep_fsep: copies are gathered from every GPU's shard: node confinement does not apply"
            )


class MicroEpFsepPolicy(MicroEpPolicy):
    name = "microep_fsep"
    summary = "MicroEP over FSEP: layout planned from history, exact scheduler, burst copies gathered on demand"
    fully_sharded = True
    Params = MicroEpFsepParams

    def place(self, history: History, current: Placement) -> Placement:
        loads = history.loads.window(self.params.history_micro_batches)
        if len(loads) == 0:
            return current
        target = PlanTarget("fsep", self.layout.num_gpus, self.layout.slot_limit)
        try:
            return plan_from_history(loads, target, self.planner_settings(), current)
        except ValueError as err:
            raise PolicyError(f"microep_fsep planner: {err}") from None

    def assign_in_step(self, tokens: np.ndarray, placement: Placement, held: np.ndarray) -> Assignment:
        # microep's decision with nothing held and no node rule (validated); its copies live one micro-batch.
        assignment = super().assign_in_step(tokens, placement, NO_COPIES)
        return dataclasses.replace(assignment, step_copies=NO_COPIES, gathered_copies=assignment.step_copies)
