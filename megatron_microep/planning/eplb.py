"""EPLB-style greedy replica placement: the baseline the planner is compared with.

Written from the published description of DeepSeek's EPLB, adapted to our placement rules:
1. Replica counts: give one extra copy at a time to the expert with the highest mean load per copy,
   until every redundant slot is spoken for (an expert never gets more copies than GPUs it may use;
   with ``gpus_per_node``, each node's slots go to that node's experts).
2. Packing: home copies stay where Megatron's contiguous layout put them, each carrying load/copies;
   the extra copies, largest load per copy first, go to the least-loaded GPU that still has a free
   slot, does not hold that expert yet and (with ``gpus_per_node``) lies in the expert's home node.
   When the only free slots are on GPUs that cannot take a copy, another extra copy is moved onto one
   of them to make room; a copy that still fits nowhere is dropped, and any slot left free goes to the
   expert with the highest load per copy among those allowed there.
EPLB's own token split is even over copies (``even_split_gpu_loads``); the MicroEP scheduler instead
solves the split exactly per micro-batch, so the same placement can be scored either way.
"""

from __future__ import annotations

import heapq

import numpy as np

from megatron_microep.planning.placement import Placement, home_gpu


def allowed_replica_gpus(num_experts: int, num_gpus: int, gpus_per_node: int | None = None) -> np.ndarray:
    """bool [E, G]: GPUs that may hold an extra copy of each expert (not its home; its home node if given)."""
    home = np.array([home_gpu(e, num_experts, num_gpus) for e in range(num_experts)])
    allowed = np.ones((num_experts, num_gpus), dtype=bool)
    if gpus_per_node:
        node = np.arange(num_gpus) // gpus_per_node
        allowed &= node[None, :] == node[home][:, None]
    allowed[np.arange(num_experts), home] = False
    return allowed


def eplb_placement(
    history: np.ndarray, num_gpus: int, redundant_slots: int, gpus_per_node: int | None = None
) -> Placement:
    """EPLB-style placement from ``history`` int [S, E] (or [E]) tokens per expert.

    Returns a Placement with home copies first and at most ``redundant_slots`` extra copies per GPU.
    """
    load = np.atleast_2d(np.asarray(history, dtype=np.float64)).mean(axis=0)
    num_experts = load.size
    allowed = allowed_replica_gpus(num_experts, num_gpus, gpus_per_node)
    max_copies = 1 + allowed.sum(axis=1)

    # With nodes, a node's slots can only take copies of its own experts, so each node has its own budget.
    node_size = gpus_per_node or num_gpus
    node_of = np.array([home_gpu(e, num_experts, num_gpus) for e in range(num_experts)]) // node_size
    node_slots = np.full(num_gpus // node_size, node_size * redundant_slots, dtype=np.int64)
    copies = np.ones(num_experts, dtype=np.int64)
    heap = [(-load[e], e) for e in range(num_experts) if max_copies[e] > 1]
    heapq.heapify(heap)
    while heap:
        _, e = heapq.heappop(heap)
        if node_slots[node_of[e]] == 0:
            continue
        copies[e] += 1
        node_slots[node_of[e]] -= 1
        if copies[e] < max_copies[e]:
            heapq.heappush(heap, (-load[e] / copies[e], e))

    replicas = [[home_gpu(e, num_experts, num_gpus)] for e in range(num_experts)]
    share = load / copies
    gpu_load = np.bincount([r[0] for r in replicas], weights=share, minlength=num_gpus)
    free = np.full(num_gpus, redundant_slots, dtype=np.int64)
    extra = sorted(
        ((share[e], e) for e in range(num_experts) for _ in range(copies[e] - 1)), key=lambda item: (-item[0], item[1])
    )
    for copy_load, e in extra:
        ok = allowed[e] & (free > 0)
        ok[replicas[e]] = False
        if ok.any():
            g = int(np.flatnonzero(ok)[np.argmin(gpu_load[ok])])
        else:
            g = _swap_for_slot(e, replicas, allowed, free, share, gpu_load)
            if g < 0:
                continue
        replicas[e].append(g)
        gpu_load[g] += copy_load
        free[g] -= 1
    # Slots left over when the counts did not fit: the highest load per copy among experts that may go there.
    for g in np.flatnonzero(free > 0):
        while free[g] > 0:
            ok = allowed[:, g] & np.array([g not in r for r in replicas])
            if not ok.any():
                break
            per_copy = np.where(ok, load / (np.array([len(r) for r in replicas]) + 1), -1.0)
            e = int(per_copy.argmax())
            replicas[e].append(int(g))
            free[g] -= 1
    return Placement.from_lists(replicas, num_gpus)


def _swap_for_slot(expert, replicas, allowed, free, share, gpu_load) -> int:
    """The only free slots are on GPUs that cannot take ``expert``: move some other extra copy from a GPU
    that can onto a free slot, and return the GPU it vacated (or -1 when no such move exists)."""
    for f in np.flatnonzero(free > 0):
        for e2, copies in enumerate(replicas):
            for h in copies[1:]:
                if allowed[expert, h] and h not in replicas[expert] and allowed[e2, f] and f not in copies:
                    copies[copies.index(h)] = int(f)
                    gpu_load[h] -= share[e2]
                    gpu_load[f] += share[e2]
                    free[f] -= 1
                    free[h] += 1
                    return int(h)
    return -1


def even_split_gpu_loads(expert_load: np.ndarray, placement: Placement) -> np.ndarray:
    """EPLB's token split: each expert's load int [E] divided evenly over its copies -> float [G] GPU loads."""
    load = np.asarray(expert_load, dtype=np.float64)
    counts = placement.replica_counts()
    per_copy = np.repeat(load / counts, counts)
    return np.bincount(placement.gpus, weights=per_copy, minlength=placement.num_gpus)
