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
        load = tokens.sum(axis=0).astype(np.int64)
        home = placement.gpus[placement.ptr[:-1]]
        native = np.bincount(home, weights=load, minlength=lay.num_gpus)
        total = int(load.sum())
        mean = total / lay.num_gpus
        foreign_limit = self._foreign_limit()
        if total == 0 or native.max() < self.params.imbalance_threshold * mean or foreign_limit == 0:
            return single_copy_assignment(tokens, placement)
        order = np.argsort(-load, kind="stable").astype(np.int64)
        keep, rep_expert, rep_gpu, rep_tokens = _spill(
            load, home, order, lay.num_gpus, self.params.capacity_factor * mean, self.params.min_chunk, foreign_limit
        )
        counts = 1 + np.bincount(rep_expert, minlength=lay.num_experts)
        ptr = np.zeros(lay.num_experts + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        gpus = np.empty(ptr[-1], dtype=np.int64)
        slot_tokens = np.empty(ptr[-1], dtype=np.int64)
        gpus[ptr[:-1]] = home
        slot_tokens[ptr[:-1]] = keep
        # Helpers of an expert follow its home copy in the order they were chosen (_spill emits them so).
        by_expert = np.argsort(rep_expert, kind="stable")
        rep_expert, rep_gpu, rep_tokens = rep_expert[by_expert], rep_gpu[by_expert], rep_tokens[by_expert]
        rank = np.arange(len(rep_expert)) - np.searchsorted(rep_expert, rep_expert)
        gpus[ptr[rep_expert] + 1 + rank] = rep_gpu
        slot_tokens[ptr[rep_expert] + 1 + rank] = rep_tokens
        extended = Placement(num_gpus=lay.num_gpus, ptr=ptr, gpus=gpus)
        moves = np.stack([home[rep_expert], rep_gpu], axis=1).astype(np.int64)
        return quota_assignment(tokens, extended, slot_tokens, moves)


@numba.njit(cache=True, nogil=True)
def _spill(load, home, order, num_gpus, cap, min_chunk, foreign_limit):
    """LPT spill over experts in ``order``. Returns (keep int64 [E] tokens left at home, and per
    helper copy: expert, GPU, tokens)."""
    assigned = np.zeros(num_gpus, np.float64)
    foreign = np.zeros(num_gpus, np.int64)
    keep = np.zeros(load.size, np.int64)
    bound = num_gpus * foreign_limit
    rep_expert = np.empty(bound, np.int64)
    rep_gpu = np.empty(bound, np.int64)
    rep_tokens = np.empty(bound, np.int64)
    holds = np.zeros(num_gpus, np.bool_)
    n = 0
    for e in order:
        g = home[e]
        room = cap - assigned[g]
        kept = min(load[e], max(int(room), 0))
        assigned[g] += kept
        rest = load[e] - kept
        holds[:] = False
        holds[g] = True
        while rest >= min_chunk:
            helper = -1
            for h in range(num_gpus):
                if not holds[h] and foreign[h] < foreign_limit and (helper < 0 or assigned[h] < assigned[helper]):
                    helper = h
            if helper < 0:
                break
            chunk = min(rest, max(int(cap - assigned[helper]), min_chunk))
            rep_expert[n] = e
            rep_gpu[n] = helper
            rep_tokens[n] = chunk
            n += 1
            assigned[helper] += chunk
            foreign[helper] += 1
            holds[helper] = True
            rest -= chunk
        keep[e] = kept + rest
        assigned[g] += rest
    return keep, rep_expert[:n], rep_gpu[:n], rep_tokens[:n]
