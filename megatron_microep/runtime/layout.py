"""Physical expert layout of one EP group: which local expert index each placement slot occupies.

Every EP rank ``g`` runs ``n + R`` physical experts in one grouped GEMM: its ``n`` home experts
exactly as Megatron lays them out (global experts ``g*n .. g*n+n-1``, local indices ``0..n-1``),
then up to ``R`` replica slots (local indices ``n..n+R-1``) holding copies of experts homed
elsewhere, in ascending expert order. Unused replica slots stay empty. A micro-batch's layout with
burst copies (``with_burst``) has ``D`` more local slots, ``n+R..n+R+D-1``: the burst slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_microep.planning.placement import Placement, PlacementError


@dataclass(frozen=True)
class PhysicalLayout:
    """A placement checked against Megatron's home layout, with local slot indices.

    Shapes: G EP ranks, E = G*n experts, nnz placement slots, L = n + R local slots per rank.
    """

    placement: Placement
    experts_per_rank: int  # n
    redundant_slots: int  # R
    slot_local: np.ndarray  # int64 [nnz]: local index of slot r on rank placement.gpus[r]
    local_slot: np.ndarray  # int64 [G, L]: placement slot at each local index, -1 if empty
    slot_expert: np.ndarray  # int64 [nnz]: logical expert of each slot
    burst_slots: int = 0  # D: local slots n+R.. hold this step's burst copies (``with_burst``)

    @property
    def num_ranks(self) -> int:
        return self.placement.num_gpus

    @property
    def local_slots(self) -> int:
        return self.experts_per_rank + self.redundant_slots + self.burst_slots

    @property
    def has_replicas(self) -> bool:
        return self.placement.num_slots > self.placement.num_experts

    def replica_experts(self, rank: int) -> np.ndarray:
        """int64 [R]: logical expert held in each replica slot of ``rank`` (-1 where empty)."""
        slots = self.local_slot[rank, self.experts_per_rank :]
        return np.where(slots >= 0, self.slot_expert[np.maximum(slots, 0)], -1)

    @classmethod
    def build(cls, placement: Placement, experts_per_rank: int, redundant_slots: int) -> PhysicalLayout:
        """Raises PlacementError if a home copy is not Megatron's home or a rank holds more than R replicas."""
        n, G = experts_per_rank, placement.num_gpus
        if placement.num_experts != n * G:
            raise PlacementError(f"placement has {placement.num_experts} experts, expected {n} per rank x {G} ranks")
        slot_expert = np.repeat(np.arange(placement.num_experts, dtype=np.int64), placement.replica_counts())
        homes = placement.gpus[placement.ptr[:-1]]
        wrong = np.flatnonzero(homes != np.arange(placement.num_experts) // n)
        if wrong.size:
            e = int(wrong[0])
            raise PlacementError(
                f"expert {e}: first copy on rank {int(homes[e])}, but Megatron homes it on rank {e // n}"
            )
        local_slot = np.full((G, n + redundant_slots), -1, dtype=np.int64)
        slot_local = np.empty(placement.num_slots, dtype=np.int64)
        home_slots = placement.ptr[:-1]
        slot_local[home_slots] = np.arange(placement.num_experts) % n
        local_slot[homes, slot_local[home_slots]] = home_slots
        is_replica = np.ones(placement.num_slots, dtype=bool)
        is_replica[home_slots] = False
        replica_slots = np.flatnonzero(is_replica)  # ascending slot index == ascending expert order
        replica_gpu = placement.gpus[replica_slots]
        per_gpu = np.bincount(replica_gpu, minlength=G)
        if per_gpu.max(initial=0) > redundant_slots:
            g = int(np.argmax(per_gpu))
            raise PlacementError(
                f"rank {g} holds {int(per_gpu[g])} replicas, more than redundant_slots={redundant_slots}"
            )
        order = np.argsort(replica_gpu, kind="stable")
        starts = np.concatenate(([0], np.cumsum(per_gpu)[:-1]))
        rank_in_gpu = np.arange(order.size) - starts[replica_gpu[order]]
        slot_local[replica_slots[order]] = n + rank_in_gpu
        local_slot[replica_gpu[order], n + rank_in_gpu] = replica_slots[order]
        return cls(placement, n, redundant_slots, slot_local, local_slot, slot_expert)

    @classmethod
    def stock(cls, num_ranks: int, experts_per_rank: int, redundant_slots: int) -> PhysicalLayout:
        """Megatron's layout with every replica slot empty."""
        return cls.build(
            Placement.contiguous(num_ranks * experts_per_rank, num_ranks), experts_per_rank, redundant_slots
        )

    def with_burst(
        self, placement: Placement, copies: np.ndarray, burst_slot: np.ndarray, slots: int
    ) -> PhysicalLayout:
        """This (persistent) layout plus burst copies, for one micro-batch.

        ``placement``: this layout's placement with the K burst ``copies`` int64 [K, 2] (expert, gpu)
        appended after each expert's other copies, in ``copies`` order (``planning.burst.BurstPlan``);
        ``burst_slot`` int64 [K]: the burst slot (< ``slots``) each copy occupies on its GPU. The
        persistent slots keep their local indices, so replica weights and group order carry over.
        """
        base = self.placement
        n, R = self.experts_per_rank, self.redundant_slots
        extra = placement.replica_counts() - base.replica_counts()
        if (extra < 0).any() or int(extra.sum()) != len(copies):
            raise PlacementError("the burst placement is not this layout's placement plus the burst copies")
        slot_expert = np.repeat(np.arange(placement.num_experts, dtype=np.int64), placement.replica_counts())
        # A persistent slot r of expert e keeps its offset r - ptr[e] among e's copies.
        offset = np.arange(placement.num_slots) - placement.ptr[slot_expert]
        persistent = offset < base.replica_counts()[slot_expert]
        slot_local = np.empty(placement.num_slots, dtype=np.int64)
        slot_local[persistent] = self.slot_local[base.ptr[slot_expert[persistent]] + offset[persistent]]
        # Burst copies of one expert appear in ``copies`` order after its persistent ones.
        order = np.lexsort((np.arange(len(copies)), copies[:, 0]))
        burst = np.flatnonzero(~persistent)  # ascending: by expert, then copy order
        slot_local[burst] = n + R + np.asarray(burst_slot, dtype=np.int64)[order]
        if len(copies) and (np.asarray(burst_slot).max() >= slots or (placement.gpus[burst] != copies[order, 1]).any()):
            raise PlacementError("burst copies do not match their slots or GPUs")
        local_slot = np.full((self.num_ranks, n + R + slots), -1, dtype=np.int64)
        local_slot[placement.gpus, slot_local] = np.arange(placement.num_slots)
        return PhysicalLayout(placement, n, R, slot_local, local_slot, slot_expert, slots)
