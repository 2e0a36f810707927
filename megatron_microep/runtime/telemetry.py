"""Per-layer, per-micro-batch balance figures, and their summary over a logging interval.

"Before" is stock Megatron EP on the same routing (every token on its expert's home rank); "after"
is the MicroEP schedule. Loads are tokens per EP rank; remote tokens are tokens processed on an EP
rank other than the one that routed them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from megatron_microep.planning.scheduler import Schedule
from megatron_microep.runtime.layout import PhysicalLayout


@dataclass(frozen=True)
class MicroBatchStats:
    step: int  # -1 when no step clock is known
    layer: int
    max_before: int
    mean_before: float
    max_after: int
    mean_after: float
    remote_before: int
    remote_after: int
    replicas: int  # replica slots in the placement
    replica_tokens: int  # tokens processed by replica slots
    scheduling_ms: float  # count gather + solve + split computation
    gather_ms: float
    solve_ms: float
    split_ms: float

    @property
    def imbalance_before(self) -> float:
        return self.max_before / self.mean_before if self.mean_before else 1.0

    @property
    def imbalance_after(self) -> float:
        return self.max_after / self.mean_after if self.mean_after else 1.0


def micro_batch_stats(
    step: int,
    layer: int,
    tokens: np.ndarray,
    schedule: Schedule,
    layout: PhysicalLayout,
    phase_seconds: tuple[float, float, float],
) -> MicroBatchStats:
    """``tokens`` int64 [G, E]: routed tokens per source EP rank and expert (what was scheduled);
    ``phase_seconds``: count gather, solve and split computation times."""
    n, G = layout.experts_per_rank, layout.num_ranks
    home_load = tokens.sum(axis=0).reshape(G, n).sum(axis=1)
    own_home = sum(int(tokens[g, g * n : (g + 1) * n].sum()) for g in range(G))
    home_slots = layout.placement.ptr[:-1]
    replica_tokens = int(schedule.slot_tokens.sum() - schedule.slot_tokens[home_slots].sum())
    return MicroBatchStats(
        step=step,
        layer=layer,
        max_before=int(home_load.max(initial=0)),
        mean_before=float(home_load.mean()),
        max_after=int(schedule.max_load),
        mean_after=float(schedule.gpu_load.mean()),
        remote_before=int(tokens.sum()) - own_home,
        remote_after=int(schedule.remote_tokens),
        replicas=layout.placement.num_slots - layout.placement.num_experts,
        replica_tokens=replica_tokens,
        scheduling_ms=1e3 * sum(phase_seconds),
        gather_ms=1e3 * phase_seconds[0],
        solve_ms=1e3 * phase_seconds[1],
        split_ms=1e3 * phase_seconds[2],
    )


class TelemetryLog:
    """Micro-batch stats of one layer since the last ``drain``."""

    def __init__(self) -> None:
        self.rows: list[MicroBatchStats] = []

    def add(self, stats: MicroBatchStats) -> None:
        self.rows.append(stats)

    def drain(self) -> list[MicroBatchStats]:
        rows, self.rows = self.rows, []
        return rows


def summarize(rows: list[MicroBatchStats]) -> dict[str, float]:
    """Means over micro-batches of the figures a log line and a metrics writer show."""
    if not rows:
        return {}
    return {
        "imbalance_before": float(np.mean([r.imbalance_before for r in rows])),
        "imbalance_after": float(np.mean([r.imbalance_after for r in rows])),
        "max_before": float(np.mean([r.max_before for r in rows])),
        "max_after": float(np.mean([r.max_after for r in rows])),
        "remote_before": float(np.mean([r.remote_before for r in rows])),
        "remote_after": float(np.mean([r.remote_after for r in rows])),
        "replicas": float(rows[-1].replicas),
        "replica_tokens": float(np.mean([r.replica_tokens for r in rows])),
        "scheduling_ms": float(np.mean([r.scheduling_ms for r in rows])),
        "micro_batches": float(len(rows)),
    }


def as_dict(stats: MicroBatchStats) -> dict[str, float]:
    return asdict(stats)
