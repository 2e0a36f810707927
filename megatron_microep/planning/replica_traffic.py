"""Bytes of replica upkeep per optimizer step and layer: what the runtime moves, for the simulator to charge.

The runtime (``runtime/replicas.py``) refreshes every replica of a layer once per step, straight
from its home GPU (one all-to-all over the EP group, in the parameters' dtype), and returns every
replica's gradient once per step, accumulated over the step's micro-batches in fp32, along the
same pairs reversed. Nothing of it depends on the number of micro-batches. The simulator's cost
model charges these bytes (``simulator/cost.py``), and a test checks them against the bytes the
runtime's collectives are handed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_microep.planning.placement import Placement

GRADIENT_BYTES = 4.0  # replica gradients travel home in fp32


@dataclass(frozen=True)
class ReplicaTraffic:
    """One step of one layer: K copies, each returning its gradient holder -> home; the ``refreshed``
    ones (persistent replicas) also refreshed home -> holder. Burst copies are pushed when a micro-batch
    first needs them (charged with the dispatch), so they are not refreshed."""

    home: np.ndarray  # int64 [K]: GPU holding the expert's home copy
    holder: np.ndarray  # int64 [K]: GPU holding the copy
    refreshed: np.ndarray  # bool [K]: refreshed at the step's start (persistent replicas)
    refresh_bytes: float  # bytes of one replica's weights
    gradient_bytes: float  # bytes of one replica's gradient

    def sent(self, num_gpus: int) -> np.ndarray:
        """float64 [G]: bytes each GPU sends (weights of its home experts' replicas, gradients of the copies it holds)."""
        refresh = np.bincount(self.home[self.refreshed], minlength=num_gpus) * self.refresh_bytes
        gradients = np.bincount(self.holder, minlength=num_gpus) * self.gradient_bytes
        return (refresh + gradients).astype(np.float64)

    @property
    def total(self) -> float:
        return int(self.refreshed.sum()) * self.refresh_bytes + len(self.home) * self.gradient_bytes


def replicas_of(placement: Placement) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(expert, home GPU, holder GPU), int64 [K] each, of every copy beyond an expert's first (its home)."""
    counts = placement.replica_counts()
    expert = np.repeat(np.arange(placement.num_experts), counts)
    is_replica = np.ones(placement.num_slots, dtype=bool)
    is_replica[placement.ptr[:-1]] = False
    home = placement.gpus[placement.ptr[:-1]]
    return expert[is_replica], home[expert[is_replica]], placement.gpus[is_replica]


def replica_step_traffic(
    home: np.ndarray,
    holder: np.ndarray,
    params_per_expert: int,
    param_bytes: float,
    gradient_bytes: float = GRADIENT_BYTES,
    refreshed: np.ndarray | None = None,
) -> ReplicaTraffic:
    """The replica traffic of one step and layer for copies ``(home, holder)`` (int [K] each) of
    experts with ``params_per_expert`` parameters of ``param_bytes`` bytes each; ``refreshed`` bool [K]
    (default all) marks the persistent replicas, the others are the step's burst copies."""
    home = np.asarray(home, dtype=np.int64)
    holder = np.asarray(holder, dtype=np.int64)
    if home.shape != holder.shape:
        raise ValueError(f"home {home.shape} and holder {holder.shape} must have the same shape")
    refreshed = np.ones(home.shape, dtype=bool) if refreshed is None else np.asarray(refreshed, dtype=bool)
    if refreshed.shape != home.shape:
        raise ValueError(f"refreshed {refreshed.shape} must have the shape of home {home.shape}")
    return ReplicaTraffic(home, holder, refreshed, params_per_expert * param_bytes, params_per_expert * gradient_bytes)
