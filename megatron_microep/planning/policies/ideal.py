"""``ideal``: force-balanced routing, the ceiling (Megatron's ``--moe-router-force-load-balancing``).

The routed counts are replaced by a round-robin routing with the same per-source totals: the
global token sequence (sources in order) visits experts 0, 1, ..., E-1, 0, ... so every expert gets
``total / E`` tokens up to one, and with the contiguous layout every GPU gets its share of the
mean. With more GPUs than experts, each expert runs on its own block of ``G / E`` GPUs (copies that
cost nothing) and is split evenly over them. Nothing moves, nothing is planned. It changes the
routing itself, so it is a bound, not a policy one could deploy without changing the model.
"""

from __future__ import annotations

import numpy as np

from megatron_microep.planning.placement import Placement
from megatron_microep.planning.policies.base import (
    Assignment,
    Policy,
    even_split_assignment,
    single_copy_assignment,
)


def force_balanced(tokens: np.ndarray) -> np.ndarray:
    """int64 [G, E] -> int64 [G, E] with the same row sums, columns equal up to one.

    Source s owns global token positions [start_s, end_s); position t goes to expert t mod E, so
    ``out[s, e]`` counts the positions in that range congruent to e, in closed form.
    """
    num_experts = tokens.shape[1]
    rows = tokens.sum(axis=1)
    end = np.cumsum(rows)
    start = end - rows
    e = np.arange(num_experts)[None, :]

    # Positions t < x with t mod E == e: ceil((x - e) / E) for x >= e, else 0.
    def below(x):
        return np.maximum(-(-(x[:, None] - e) // num_experts), 0)

    return (below(end) - below(start)).astype(np.int64)


class IdealPolicy(Policy):
    name = "ideal"
    summary = "force-balanced routing: every expert gets the mean (the ceiling)"
    weightless = True

    def initial_placement(self) -> Placement:
        lay = self.layout
        if lay.num_gpus <= lay.num_experts:
            return lay.contiguous()
        owner = np.arange(lay.num_gpus) * lay.num_experts // lay.num_gpus
        return Placement.from_lists([np.flatnonzero(owner == e).tolist() for e in range(lay.num_experts)], lay.num_gpus)

    def assign(self, tokens: np.ndarray, placement: Placement) -> Assignment:
        balanced = force_balanced(tokens)
        if placement.num_slots == placement.num_experts:
            return single_copy_assignment(balanced, placement)
        return even_split_assignment(balanced, placement)
