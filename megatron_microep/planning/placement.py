"""Replica placements: which GPUs hold a copy of each logical expert.

A placement is stored in CSR form so compiled solvers can walk it without Python objects:
``ptr`` [E+1] and ``gpus`` [nnz]; the copies of expert ``e`` are ``gpus[ptr[e]:ptr[e+1]]``,
home copy first. Slot index ``r`` in ``range(nnz)`` names one physical copy (replica slot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class PlacementError(ValueError):
    """A placement that violates an invariant (named in the message)."""


def home_gpu(expert: int, num_experts: int, num_gpus: int) -> int:
    """Megatron's contiguous EP layout: expert e lives on GPU e*G//E."""
    return expert * num_gpus // num_experts


@dataclass(frozen=True)
class Placement:
    num_gpus: int
    ptr: np.ndarray  # int64 [E+1]
    gpus: np.ndarray  # int64 [nnz]

    @property
    def num_experts(self) -> int:
        return len(self.ptr) - 1

    @property
    def num_slots(self) -> int:
        return len(self.gpus)

    def copies(self, expert: int) -> np.ndarray:
        return self.gpus[self.ptr[expert] : self.ptr[expert + 1]]

    def replica_counts(self) -> np.ndarray:
        """int64 [E]: number of copies of each expert."""
        return np.diff(self.ptr)

    def slots_per_gpu(self) -> np.ndarray:
        """int64 [G]: physical experts (home + replicas) held by each GPU."""
        return np.bincount(self.gpus, minlength=self.num_gpus)

    def to_lists(self) -> list[list[int]]:
        return [self.copies(e).tolist() for e in range(self.num_experts)]

    @classmethod
    def from_lists(cls, replicas: Sequence[Sequence[int]], num_gpus: int) -> Placement:
        """Validate and pack ``replicas[e]`` (GPU ids, home first).

        Raises PlacementError when an expert has no copy, a GPU id is out of range, or
        two copies of one expert sit on the same GPU.
        """
        if num_gpus < 1:
            raise PlacementError(f"num_gpus must be >= 1, got {num_gpus}")
        ptr = np.zeros(len(replicas) + 1, dtype=np.int64)
        flat: list[int] = []
        for e, copies in enumerate(replicas):
            copies = [int(g) for g in copies]
            if not copies:
                raise PlacementError(f"expert {e} has no copy")
            bad = [g for g in copies if not 0 <= g < num_gpus]
            if bad:
                raise PlacementError(f"expert {e}: GPU id {bad[0]} outside 0..{num_gpus - 1}")
            if len(set(copies)) != len(copies):
                raise PlacementError(f"expert {e}: two copies on one GPU ({copies})")
            flat.extend(copies)
            ptr[e + 1] = len(flat)
        return cls(num_gpus=num_gpus, ptr=ptr, gpus=np.asarray(flat, dtype=np.int64))

    @classmethod
    def contiguous(cls, num_experts: int, num_gpus: int) -> Placement:
        """Stock Megatron EP: one copy per expert, contiguous blocks per GPU."""
        return cls.from_lists([[home_gpu(e, num_experts, num_gpus)] for e in range(num_experts)], num_gpus)
