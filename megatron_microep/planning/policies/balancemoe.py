"""``balancemoe``: BalanceMoE's pairwise knapsack expert moves, from the paper's description.

Every micro-batch, from the global expert counts under the contiguous layout: sort GPUs by load
and pair the i-th heaviest with the i-th lightest. For each pair (H, L), choose the set S of H's
experts to *move* (not replicate) to L that minimises the pair's time

    max(load_H - w(S), load_L + w(S)) + move_cost * |S|,

a 0/1 knapsack solved exactly by enumerating every set of at most ``max_moves_per_pair`` experts
(the weight transfer is not hidden behind compute, so each move costs ``move_cost_intra`` or
``move_cost_inter``, the transfer time of weights and returned gradients within or across nodes, in
units of one token of expert compute, forward plus backward). Moved experts run on L with all their
tokens; their weights go H -> L before the forward pass and their gradients back after it.
``max_moves_per_pair`` defaults to the layout's redundant slots (L's spare memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from megatron_microep.planning.placement import Placement
from megatron_microep.planning.policies.base import (
    Assignment,
    Policy,
    PolicyError,
    param,
    single_copy_assignment,
)


@dataclass(frozen=True)
class BalanceMoeParams:
    max_moves_per_pair: int = param(-1, "experts one pair may move; -1 means the redundant slots")
    move_cost_intra: float = param(
        0.0,
        "time to move one expert within a node (weights there, gradients back), "
        "in tokens of expert compute; the simulator sets it from its cost model",
    )
    move_cost_inter: float = param(0.0, "the same across nodes; the simulator sets it from its cost model")

    def validate(self):
        if self.max_moves_per_pair < -1:
            raise PolicyError(f"balancemoe: max_moves_per_pair must be >= -1, got {self.max_moves_per_pair}")
        if self.move_cost_intra < 0 or self.move_cost_inter < 0:
            raise PolicyError("balancemoe: move_cost_intra and move_cost_inter must be >= 0")


def best_move(
    heavy_load: int, light_load: int, item_loads: np.ndarray, max_items: int, move_cost: float
) -> tuple[int, ...]:
    """Indices into ``item_loads`` of the exact best set to move (empty if nothing helps)."""
    best_set: tuple[int, ...] = ()
    best_time = float(max(heavy_load, light_load))
    for size in range(1, min(max_items, len(item_loads)) + 1):
        for subset in combinations(range(len(item_loads)), size):
            moved = int(item_loads[list(subset)].sum())
            time = max(heavy_load - moved, light_load + moved) + move_cost * size
            if time < best_time:
                best_set, best_time = subset, time
    return best_set


class BalanceMoePolicy(Policy):
    name = "balancemoe"
    summary = "BalanceMoE: heaviest/lightest GPU pairs, exact knapsack of expert moves per micro-batch"
    decides_per_micro_batch = True
    temporary_copies = True
    Params = BalanceMoeParams

    def _max_moves(self) -> int:
        limit = self.params.max_moves_per_pair
        return self.layout.redundant_slots if limit < 0 else min(limit, self.layout.redundant_slots)

    def assign(self, tokens: np.ndarray, placement: Placement) -> Assignment:
        lay = self.layout
        max_moves = self._max_moves()
        load = tokens.sum(axis=0)
        home = placement.gpus[placement.ptr[:-1]]
        gpu_load = np.bincount(home, weights=load, minlength=lay.num_gpus).astype(np.int64)
        if max_moves == 0:
            return single_copy_assignment(tokens, placement)
        order = np.argsort(gpu_load, kind="stable")
        owner = home.copy()
        moves = []
        for i in range(lay.num_gpus // 2):
            light, heavy = int(order[i]), int(order[-1 - i])
            if gpu_load[heavy] <= gpu_load[light]:
                break
            mine = np.flatnonzero((home == heavy) & (load > 0))
            same_node = heavy // lay.node_size == light // lay.node_size
            cost = self.params.move_cost_intra if same_node else self.params.move_cost_inter
            chosen = best_move(int(gpu_load[heavy]), int(gpu_load[light]), load[mine], max_moves, cost)
            for j in chosen:
                owner[mine[j]] = light
                moves.append((heavy, light))
        moved = Placement.from_lists([[int(g)] for g in owner], lay.num_gpus)
        return single_copy_assignment(tokens, moved, np.asarray(moves, dtype=np.int64).reshape(-1, 2))
