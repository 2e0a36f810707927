"""A planner for tests that must see the layout change every step (imported by the planner process)."""

from dataclasses import dataclass

import numpy as np

from megatron_microep.planning.fsep_layout import placement_from_holds
from megatron_microep.planning.plan import HistoryPlanner


@dataclass(frozen=True)
class ChangingPlanner:
    """``real``'s plan; a plan equal to the current layout gets one slot swap (seeded by the window)."""

    real: HistoryPlanner
    seed: int

    @property
    def time_limit_s(self) -> float:
        return self.real.time_limit_s

    def __call__(self, window, current, time_limit_s=None):
        placement = self.real(window, current, time_limit_s)
        if placement.to_lists() != current.to_lists():
            return placement
        num_gpus = placement.num_gpus
        holds = np.zeros((placement.num_experts, num_gpus), dtype=bool)
        holds[np.repeat(np.arange(placement.num_experts), placement.replica_counts()), placement.gpus] = True
        rng = np.random.default_rng(self.seed + len(window))
        while True:
            g, h = rng.choice(num_gpus, 2, replace=False)
            a = np.flatnonzero(holds[:, g] & ~holds[:, h])
            b = np.flatnonzero(holds[:, h] & ~holds[:, g])
            if a.size and b.size:
                ea, eb = rng.choice(a), rng.choice(b)
                holds[ea, g], holds[eb, h], holds[ea, h], holds[eb, g] = False, False, True, True
                return placement_from_holds(holds)
