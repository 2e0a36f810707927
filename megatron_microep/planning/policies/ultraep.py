"""``ultraep``: UltraEP-style per-micro-batch quotas, from its public description (arXiv 2606.04101).

Every layer and micro-batch, from the global expert counts: find the smallest per-GPU cap T for
which a greedy check succeeds, then run with the replicas and quotas that check built. The fast
path tries ``ceil((1 + epsilon) * mean)`` first and takes it when feasible; otherwise T is found by
binary search between the proven lower bound and the plain-EP maximum.

The greedy check at cap T, node by node (replicas stay inside the NVLink domain): every GPU over T
sheds load from its hottest home experts to replicas on GPUs of its node that are under T, most
headroom first; a GPU holds at most ``redundant_slots`` replicas and at most one copy of an expert.
T is feasible when no GPU is left over it.

Replicas found for one micro-batch stay cached for the next ones; weights are pushed (home -> GPU)
only for replicas not already cached, and the cost model refreshes cached replicas after each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from megatron_microep.planning.placement import Placement
from megatron_microep.planning.policies.base import (
    Assignment,
    Policy,
    PolicyError,
    param,
    quota_assignment,
    single_copy_assignment,
)


@dataclass(frozen=True)
class UltraEpParams:
    epsilon: float = param(0.01, "fast path: try the cap ceil((1 + epsilon) * mean) first")

    def validate(self):
        if self.epsilon < 0:
            raise PolicyError(f"ultraep: epsilon must be >= 0, got {self.epsilon}")


@numba.njit(cache=True, nogil=True)
def _greedy_quotas(load, home_ptr, home_experts, num_gpus, node_size, redundant, cap):
    """Greedy check at cap ``cap``. Returns (feasible, keep int64 [E] home quotas,
    rep_expert, rep_gpu, rep_tokens (int64 [n] each)) for the replicas it made."""
    gpu_load = np.zeros(num_gpus, np.int64)
    for g in range(num_gpus):
        for i in range(home_ptr[g], home_ptr[g + 1]):
            gpu_load[g] += load[home_experts[i]]
    keep = load.copy()
    free = np.full(num_gpus, redundant, np.int64)
    rep_expert = np.empty(num_gpus * redundant, np.int64)
    rep_gpu = np.empty(num_gpus * redundant, np.int64)
    rep_tokens = np.empty(num_gpus * redundant, np.int64)
    holds = np.zeros(num_gpus, np.bool_)
    n = 0
    for g in range(num_gpus):
        if gpu_load[g] <= cap:
            continue
        first = (g // node_size) * node_size
        # Hottest home experts first (selection order over this GPU's few experts).
        count = home_ptr[g + 1] - home_ptr[g]
        order = np.empty(count, np.int64)
        for i in range(count):
            order[i] = home_experts[home_ptr[g] + i]
        for i in range(count):
            for j in range(i + 1, count):
                if load[order[j]] > load[order[i]]:
                    tmp = order[i]
                    order[i] = order[j]
                    order[j] = tmp
        for i in range(count):
            e = order[i]
            holds[:] = False
            while gpu_load[g] > cap and keep[e] > 0:
                target = -1
                room = 0
                for h in range(first, first + node_size):
                    if h != g and free[h] > 0 and not holds[h] and cap - gpu_load[h] > room:
                        room = cap - gpu_load[h]
                        target = h
                if target < 0:
                    break
                amount = min(gpu_load[g] - cap, room, keep[e])
                rep_expert[n] = e
                rep_gpu[n] = target
                rep_tokens[n] = amount
                n += 1
                keep[e] -= amount
                gpu_load[g] -= amount
                gpu_load[target] += amount
                free[target] -= 1
                holds[target] = True
            if gpu_load[g] <= cap:
                break
        if gpu_load[g] > cap:
            return False, keep, rep_expert[:n], rep_gpu[:n], rep_tokens[:n]
    return True, keep, rep_expert[:n], rep_gpu[:n], rep_tokens[:n]


class UltraEpPolicy(Policy):
    name = "ultraep"
    summary = "UltraEP-style: per micro-batch min cap search, replicas and quotas inside the node"
    decides_per_micro_batch = True
    keeps_assign_placement = True
    Params = UltraEpParams

    def __init__(self, layout, params):
        super().__init__(layout, params)
        home = layout.home()
        self._home = home
        self._home_experts = np.argsort(home, kind="stable").astype(np.int64)
        self._home_ptr = np.searchsorted(home[self._home_experts], np.arange(layout.num_gpus + 1)).astype(np.int64)

    def quotas(self, load: np.ndarray, cap: int):
        lay = self.layout
        return _greedy_quotas(
            load, self._home_ptr, self._home_experts, lay.num_gpus, lay.node_size, lay.redundant_slots, cap
        )

    def min_cap(self, load: np.ndarray) -> int:
        """The smallest cap the greedy check accepts (fast path first), as the policy searches it."""
        lay = self.layout
        total = int(load.sum())
        native = np.bincount(self._home, weights=load, minlength=lay.num_gpus).astype(np.int64)
        node_totals = native.reshape(lay.num_nodes, lay.node_size).sum(axis=1)
        lower = max(math.ceil(total / lay.num_gpus), int(-(-node_totals.max(initial=0) // lay.node_size)))
        upper = int(native.max(initial=0))
        fast = max(lower, math.ceil((1.0 + self.params.epsilon) * total / lay.num_gpus))
        if fast >= upper:
            return upper
        if self.quotas(load, fast)[0]:
            return fast
        low, high = fast + 1, upper  # high is always feasible (no replicas needed)
        while low < high:
            mid = (low + high) // 2
            if self.quotas(load, mid)[0]:
                high = mid
            else:
                low = mid + 1
        return high

    def assign(self, tokens: np.ndarray, placement: Placement) -> Assignment:
        lay = self.layout
        load = tokens.sum(axis=0).astype(np.int64)
        if lay.redundant_slots == 0 or load.sum() == 0:
            return single_copy_assignment(tokens, lay.contiguous())
        ok, keep, rep_e, rep_g, rep_n = self.quotas(load, self.min_cap(load))
        if not ok:
            raise PolicyError("ultraep: the greedy check rejected the cap it accepted")
        order = np.lexsort((rep_g, rep_e))
        rep_e, rep_g, rep_n = rep_e[order], rep_g[order], rep_n[order]
        counts = 1 + np.bincount(rep_e, minlength=lay.num_experts)
        ptr = np.zeros(lay.num_experts + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        gpus = np.empty(ptr[-1], dtype=np.int64)
        slot_tokens = np.empty(ptr[-1], dtype=np.int64)
        gpus[ptr[:-1]] = self._home
        slot_tokens[ptr[:-1]] = keep
        rep_slot = ptr[rep_e] + 1 + (np.arange(len(rep_e)) - np.searchsorted(rep_e, rep_e))
        gpus[rep_slot] = rep_g
        slot_tokens[rep_slot] = rep_n
        extended = Placement(num_gpus=lay.num_gpus, ptr=ptr, gpus=gpus)
        cached = _pairs(placement, lay.num_gpus)
        new = rep_e * lay.num_gpus + rep_g
        pushed = ~np.isin(new, cached)
        moves = np.stack([self._home[rep_e[pushed]], rep_g[pushed]], axis=1).astype(np.int64)
        return quota_assignment(tokens, extended, slot_tokens, moves)


def _pairs(placement: Placement, num_gpus: int) -> np.ndarray:
    """int64 [nnz - E]: expert * G + gpu of every non-home copy."""
    expert = np.repeat(np.arange(placement.num_experts), placement.replica_counts())
    is_replica = np.ones(placement.num_slots, dtype=bool)
    is_replica[placement.ptr[:-1]] = False
    return expert[is_replica] * num_gpus + placement.gpus[is_replica]
