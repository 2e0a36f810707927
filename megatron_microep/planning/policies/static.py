"""``static``: stock Megatron expert parallelism. Contiguous layout, one copy per expert, no balancing."""

from __future__ import annotations

import numpy as np

from megatron_microep.planning.placement import Placement
from megatron_microep.planning.policies.base import Assignment, Policy, single_copy_assignment


class StaticPolicy(Policy):
    name = "static"
    summary = "Megatron EP: expert e on GPU e*G//E, no replicas"

    def assign(self, tokens: np.ndarray, placement: Placement) -> Assignment:
        return single_copy_assignment(tokens, placement)
