"""``laer``: LAER-MoE's planner over fully sharded experts (FSEP), from the paper's description.

Every expert is sharded over all GPUs, so any layout of full copies can be restored each step by
an all-to-all of shards: copies cost no optimizer state and no home moves, only the per-step
gathers (charged by the cost model as FSEP traffic). Every ``replan_interval`` steps, from the
per-(GPU, expert) counts of the last ``history_steps`` steps:

1. Two candidate replica counts over the ``G * slot_limit`` slots: *even* (every expert the same
   number of copies, the remainder to the heaviest) and *priority queue* (start at one copy each,
   repeatedly give a copy to the expert with the largest load per copy).
2. Greedy placement of each candidate: experts by descending load, each copy to the node with the
   fewest copies of that expert, then to that node's least-loaded GPU with a free slot.
3. Keep the candidate with the smaller routing cost ``T = 4 * max comm + 3 * max comp`` (four
   all-to-alls and three expert GEMM passes per layer and micro-batch, forward and backward), where
   a GPU's comm is ``intra_cost * intra tokens + inter_cost * inter tokens`` (sent plus received) and
   comp is its tokens, both under the even intra-node split below.

Tokens: each source splits its tokens of an expert evenly over that expert's copies in its own
node, or over all copies when its node has none.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numba
import numpy as np

from megatron_microep.planning.placement import Placement
from megatron_microep.planning.policies.base import (
    Assignment,
    History,
    Policy,
    PolicyError,
    even_split_assignment,
    param,
    traffic,
)


@dataclass(frozen=True)
class LaerParams:
    replan_interval: int = param(1, "steps between re-plans (the paper re-plans every iteration)")
    history_steps: int = param(5, "steps of per-(GPU, expert) counts the planner reads (paper: last <= 5)")
    intra_cost: float = param(
        0.33,
        "cost of one token sent or received within a node, in units of one "
        "token of expert compute (the simulator sets it from its cost model)",
    )
    inter_cost: float = param(
        3.0, "cost of one token sent or received across nodes, same units (the simulator sets it from its cost model)"
    )

    def validate(self):
        if self.replan_interval < 1:
            raise PolicyError(f"laer: replan_interval must be >= 1, got {self.replan_interval}")
        if self.history_steps < 1:
            raise PolicyError(f"laer: history_steps must be >= 1, got {self.history_steps}")
        if self.intra_cost < 0 or self.inter_cost < 0:
            raise PolicyError("laer: intra_cost and inter_cost must be >= 0")


def even_counts(load: np.ndarray, slots: int, num_gpus: int) -> np.ndarray:
    """int64 [E]: ``slots // E`` copies each, one more for the heaviest ``slots % E`` experts (<= G)."""
    num_experts = len(load)
    base, extra = divmod(slots, num_experts)
    counts = np.full(num_experts, min(base, num_gpus), dtype=np.int64)
    if base < num_gpus and extra:
        counts[np.argsort(-load, kind="stable")[:extra]] += 1
    return counts


def priority_counts(load: np.ndarray, slots: int, num_gpus: int) -> np.ndarray:
    """int64 [E]: one copy each, then each further slot to the expert with the largest load per copy
    (ties: lower expert id), never more than ``num_gpus`` copies."""
    counts = np.ones(len(load), dtype=np.int64)
    heap = [(-float(load[e]), e) for e in range(len(load)) if load[e] > 0 and num_gpus > 1]
    heapq.heapify(heap)
    for _ in range(slots - len(load)):
        if not heap:
            break
        _, e = heapq.heappop(heap)
        counts[e] += 1
        if counts[e] < num_gpus:
            heapq.heappush(heap, (-float(load[e]) / counts[e], e))
    return counts


def greedy_place(load: np.ndarray, counts: np.ndarray, num_gpus: int, node_size: int, slot_limit: int) -> Placement:
    """Place ``counts[e]`` copies of each expert (most copies, then heaviest, first); each copy goes to
    the node with the fewest copies of the expert (ties: least loaded node), then to the least-loaded
    GPU of that node with a free slot and no copy of the expert. Load per copy is ``load[e] / counts[e]``."""
    order = np.lexsort((-load, -counts)).astype(np.int64)
    expert, gpu = _greedy_place(
        np.asarray(load, dtype=np.float64), np.asarray(counts, dtype=np.int64), order, num_gpus, node_size, slot_limit
    )
    if len(expert) < counts.sum():
        raise PolicyError(
            f"laer: no free slot left for a copy of expert {int(order[_first_short(expert, counts, order)])}"
        )
    ptr = np.zeros(len(load) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    by_expert = np.argsort(expert, kind="stable")
    return Placement(num_gpus=num_gpus, ptr=ptr, gpus=gpu[by_expert].astype(np.int64))


def _first_short(expert: np.ndarray, counts: np.ndarray, order: np.ndarray) -> int:
    placed = np.bincount(expert, minlength=len(counts))
    return int(np.flatnonzero(placed[order] < counts[order])[0])


@numba.njit(cache=True, nogil=True)
def _greedy_place(load, counts, order, num_gpus, node_size, slot_limit):
    """Returns (expert, gpu) int64 arrays of the copies placed, in placement order; stops early when a
    copy finds no GPU."""
    num_nodes = num_gpus // node_size
    gpu_load = np.zeros(num_gpus)
    node_load = np.zeros(num_nodes)
    free = np.full(num_gpus, slot_limit, np.int64)
    total = counts.sum()
    out_expert = np.empty(total, np.int64)
    out_gpu = np.empty(total, np.int64)
    holds = np.zeros(num_gpus, np.bool_)
    node_copies = np.zeros(num_nodes, np.int64)
    n = 0
    for e in order:
        share = load[e] / counts[e]
        holds[:] = False
        node_copies[:] = 0
        for _ in range(counts[e]):
            best_node = -1
            for node in range(num_nodes):
                open_gpu = False
                for g in range(node * node_size, (node + 1) * node_size):
                    if free[g] > 0 and not holds[g]:
                        open_gpu = True
                        break
                if not open_gpu:
                    continue
                if (
                    best_node < 0
                    or node_copies[node] < node_copies[best_node]
                    or (node_copies[node] == node_copies[best_node] and node_load[node] < node_load[best_node])
                ):
                    best_node = node
            if best_node < 0:
                return out_expert[:n], out_gpu[:n]
            best = -1
            for g in range(best_node * node_size, (best_node + 1) * node_size):
                if free[g] > 0 and not holds[g] and (best < 0 or gpu_load[g] < gpu_load[best]):
                    best = g
            out_expert[n] = e
            out_gpu[n] = best
            n += 1
            holds[best] = True
            free[best] -= 1
            gpu_load[best] += share
            node_load[best_node] += share
            node_copies[best_node] += 1
    return out_expert[:n], out_gpu[:n]


class LaerPolicy(Policy):
    name = "laer"
    summary = "LAER-MoE: FSEP layout re-planned every step from the last 5 steps, even intra-node split"
    replans = True
    fully_sharded = True
    Params = LaerParams

    def history_needs(self) -> tuple[int, int]:
        return (1, self.params.history_steps)

    def _cost(self, counts: np.ndarray, placement: Placement) -> float:
        assignment = even_split_assignment(counts, placement, self.layout.node_size)
        flow = traffic(assignment, self.layout.node_size)
        comm = self.params.intra_cost * (flow.send_intra + flow.recv_intra) + self.params.inter_cost * (
            flow.send_inter + flow.recv_inter
        )
        return 4.0 * float(comm.max()) + 3.0 * float(assignment.gpu_load().max())

    def place(self, history: History, current: Placement) -> Placement:
        if len(history.step_tokens) == 0:
            return current
        counts = history.step_tokens[-self.params.history_steps :].sum(axis=0)
        load = counts.sum(axis=0).astype(np.float64)
        lay = self.layout
        slots = lay.num_gpus * lay.slot_limit
        best, best_cost = current, np.inf
        for candidate in (even_counts(load, slots, lay.num_gpus), priority_counts(load, slots, lay.num_gpus)):
            placement = greedy_place(load, candidate, lay.num_gpus, lay.node_size, lay.slot_limit)
            cost = self._cost(counts, placement)
            if cost < best_cost:
                best, best_cost = placement, cost
        return best

    def assign(self, tokens: np.ndarray, placement: Placement) -> Assignment:
        return even_split_assignment(tokens, placement, self.layout.node_size)
