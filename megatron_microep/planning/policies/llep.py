"""``llep``: Least-Loaded Expert Parallelism, from the paper's description (arXiv 2601.17111).

Per micro-batch, from the global expert counts: if the GPU loads of plain EP are within
``imbalance_threshold`` (lambda) of their mean, run plain EP. Otherwise cap every GPU at
``capacity_factor * total / G`` (alpha) and visit experts by descending load: the home GPU keeps
what fits under its cap; the rest is spilled to the least-loaded GPUs in chunks of at least
``min_chunk`` tokens (a last remainder below ``min_chunk`` stays home), and the expert's weights
are sent point-to-point to every helper (its gradients come back after the backward pass). A GPU
hosts at most ``max_foreign_experts`` spilled experts (default: the layout's redundant slots, the
memory budget every policy shares).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_microep.planning.placement import Placement
from megatron_microep.planning.policies.base import (
    Assignment, Policy, PolicyError, param, quota_assignment, single_copy_assignment,
)


@dataclass(frozen=True)
class LlepParams:
    imbalance_threshold: float = param(1.3, "lambda: plain EP while max/mean GPU load is below this")
    capacity_factor: float = param(1.0, "alpha: per-GPU cap is alpha * total / G")
    min_chunk: int = param(1024, "m: smallest number of tokens spilled to a helper GPU")
    max_foreign_experts: int = param(-1, "spilled experts one GPU may host; -1 means the redundant slots")

    def validate(self):
        if self.imbalance_threshold < 1.0:
            raise PolicyError(f"llep: imbalance_threshold must be >= 1, got {self.imbalance_threshold}")
        if self.capacity_factor <= 0:
            raise PolicyError(f"llep: capacity_factor must be > 0, got {self.capacity_factor}")
        if self.min_chunk < 1:
            raise PolicyError(f"llep: min_chunk must be >= 1, got {self.min_chunk}")
        if self.max_foreign_experts < -1:
            raise PolicyError(f"llep: max_foreign_experts must be >= -1, got {self.max_foreign_experts}")


class LlepPolicy(Policy):
    name = "llep"
    summary = "LLEP: per micro-batch LPT spill of excess tokens and weights to least-loaded GPUs"
    decides_per_micro_batch = True
    temporary_copies = True
    Params = LlepParams

    def _foreign_limit(self) -> int:
        limit = self.params.max_foreign_experts
        return self.layout.redundant_slots if limit < 0 else min(limit, self.layout.redundant_slots)

    def assign(self, tokens: np.ndarray, placement: Placement) -> Assignment:
        lay = self.layout
        load = tokens.sum(axis=0)
        home = placement.gpus[placement.ptr[:-1]]
        native = np.bincount(home, weights=load, minlength=lay.num_gpus)
        total = int(load.sum())
        mean = total / lay.num_gpus
        foreign_left = self._foreign_limit()
        if total == 0 or native.max() < self.params.imbalance_threshold * mean or foreign_left == 0:
            return single_copy_assignment(tokens, placement)
        cap = self.params.capacity_factor * mean
        assigned = np.zeros(lay.num_gpus, dtype=np.int64)
        foreign = np.zeros(lay.num_gpus, dtype=np.int64)
        copies: list[list[int]] = [[int(g)] for g in home]
        quotas: list[list[int]] = [[0] for _ in home]
        for e in np.argsort(-load, kind="stable"):
            g = int(home[e])
            keep = int(min(load[e], max(cap - assigned[g], 0)))
            assigned[g] += keep
            quotas[e][0] = keep
            rest = int(load[e]) - keep
            while rest >= self.params.min_chunk:
                eligible = foreign < self._foreign_limit()
                eligible[copies[e]] = False
                if not eligible.any():
                    break
                candidates = np.flatnonzero(eligible)
                h = int(candidates[np.argmin(assigned[candidates])])
                chunk = int(min(rest, max(cap - assigned[h], self.params.min_chunk)))
                copies[e].append(h)
                quotas[e].append(chunk)
                assigned[h] += chunk
                foreign[h] += 1
                rest -= chunk
            quotas[e][0] += rest
            assigned[g] += rest
        extended = Placement.from_lists(copies, lay.num_gpus)
        slot_tokens = np.asarray([q for qs in quotas for q in qs], dtype=np.int64)
        moves = np.asarray([(copies[e][0], h) for e in range(len(copies)) for h in copies[e][1:]],
                           dtype=np.int64).reshape(-1, 2)
        return quota_assignment(tokens, extended, slot_tokens, moves)
