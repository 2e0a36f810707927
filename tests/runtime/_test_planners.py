"""Planners for the planner-process tests; importable (and light) in the planner process."""

import sys
import time
from dataclasses import dataclass

from megatron_microep.planning.placement import Placement


@dataclass(frozen=True)
class SleepingPlanner:
    """Answers ``lists`` (GPU ids per expert) after ``sleep_s``, whatever its ``time_limit_s`` says."""

    lists: tuple
    num_gpus: int
    sleep_s: float
    time_limit_s: float

    def __call__(self, window, current, time_limit_s=None):
        time.sleep(self.sleep_s)
        return Placement.from_lists([list(copies) for copies in self.lists], self.num_gpus)


def loaded(module: str) -> bool:
    """Whether ``module`` is imported in the process this runs in."""
    return module in sys.modules
