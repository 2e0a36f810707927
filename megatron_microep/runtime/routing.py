"""Per-source send plans derived from one schedule, identical on every rank.

Sources. With expert-tensor parallelism ``T`` ranks share one EP position ``g`` (an expert-TP
group); each holds different tokens, and all of them receive every token bound for EP rank ``g``
(Megatron all-gathers over expert-TP after the EP all-to-all). The scheduler balances EP ranks, so
it sees ``counts.sum(0)`` ([G, E]); its per-(EP rank, slot) quotas are then cut among the ``T``
sources of that EP rank by prefix ranges in expert-TP rank order. With ``T == 1`` the cut is trivial.

Token order. Every rank numbers its routed (token, expert) pairs by expert, then token (the order
of ``routing_map.T.nonzero()``). Copies of an expert are consecutive slots, so the pairs of slot
``r`` are the contiguous range ``[cum[r] - x[r], cum[r])`` of that numbering, ``x`` being the
source's per-slot counts: no per-token search is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_microep.planning.scheduler import Schedule
from megatron_microep.runtime.layout import PhysicalLayout


def aggregate_slot_counts(tokens: np.ndarray, schedule: Schedule, layout: PhysicalLayout) -> np.ndarray:
    """int64 [G, nnz]: tokens of EP rank ``s`` (all its expert-TP sources) assigned to slot ``r``.

    ``tokens`` int64 [G, E] is what ``schedule`` was solved for.
    """
    placement = layout.placement
    out = np.zeros((placement.num_gpus, placement.num_slots), dtype=np.int64)
    single = placement.replica_counts() == 1
    out[:, placement.ptr[:-1][single]] = tokens[:, single]
    np.add.at(out, (schedule.piece_src, schedule.piece_slot), schedule.piece_count)
    return out


def source_slot_counts(counts: np.ndarray, schedule: Schedule, layout: PhysicalLayout) -> np.ndarray:
    """int64 [T, G, nnz]: tokens source (expert-TP rank t, EP rank g) sends to each slot.

    ``counts`` int64 [T, G, E] are the per-source routed token counts; ``schedule`` was solved for
    ``counts.sum(0)``. Source t of EP rank g takes the t-th prefix range of EP rank g's tokens of
    each expert; the copies of that expert are filled in slot order.
    """
    per_rank = aggregate_slot_counts(counts.sum(axis=0), schedule, layout)  # [G, nnz]
    if counts.shape[0] == 1:
        return per_rank[None]
    expert = layout.slot_expert
    # Slot ranges within each (rank, expert): [slot_lo, slot_hi) in the expert's token numbering.
    slot_cum = np.cumsum(per_rank, axis=1)
    first = layout.placement.ptr[:-1]
    expert_start = slot_cum[:, first] - per_rank[:, first]  # [G, E]
    slot_hi = slot_cum - expert_start[:, expert]
    slot_lo = slot_hi - per_rank
    # Source ranges within each (rank, expert): [src_lo, src_hi) over expert-TP ranks in order.
    src_hi = np.cumsum(counts, axis=0)[:, :, expert]  # [T, G, nnz]
    src_lo = src_hi - counts[:, :, expert]
    overlap = np.minimum(src_hi, slot_hi[None]) - np.maximum(src_lo, slot_lo[None])
    return np.maximum(overlap, 0)


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """int64 [sum(lengths)]: ``concat(arange(s, s + l) for s, l in zip(starts, lengths))``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    out_start = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - out_start, lengths) + np.arange(total, dtype=np.int64)


@dataclass(frozen=True)
class RankPlan:
    """What one rank (expert-TP rank t, EP rank g) does with one micro-batch. L = local slots.

    Dispatch: its pairs, numbered by (expert, token), are sent in the order ``send_pairs`` (grouped
    by destination EP rank, then destination local slot); ``input_splits[d]`` go to EP rank d and
    ``output_splits[d]`` arrive from EP rank d. Expert-TP all-gather (T > 1): rank t' contributes
    ``etp_sizes[t']`` rows. The gathered rows, ordered (t', source EP rank, local slot), are
    reordered to (local slot, t', source) by ``to_slot_major``; ``tokens_per_slot`` [L] are the
    rows each local slot processes.
    """

    send_pairs: np.ndarray  # int64 [pairs]
    input_splits: np.ndarray  # int64 [G]
    output_splits: np.ndarray  # int64 [G]
    etp_sizes: np.ndarray  # int64 [T]
    to_slot_major: np.ndarray  # int64 [rows]
    tokens_per_slot: np.ndarray  # int64 [L]


def rank_plan(per_source: np.ndarray, layout: PhysicalLayout, etp_rank: int, ep_rank: int) -> RankPlan:
    """The plan of rank (etp_rank, ep_rank) from ``per_source`` int64 [T, G, nnz] (``source_slot_counts``)."""
    placement = layout.placement
    mine = per_source[etp_rank, ep_rank]
    slot_rank = placement.gpus
    order = np.lexsort((layout.slot_local, slot_rank))  # by destination rank, then local slot
    pair_start = np.cumsum(mine) - mine
    send_pairs = concat_ranges(pair_start[order], mine[order])
    input_splits = np.bincount(slot_rank, weights=mine, minlength=layout.num_ranks).astype(np.int64)

    # Rows arriving at this EP rank: received[t', s, j] from source (t', s) for local slot j.
    local = layout.local_slot[ep_rank]
    present = local >= 0
    received = np.zeros(per_source.shape[:2] + (layout.local_slots,), dtype=np.int64)
    received[:, :, present] = per_source[:, :, local[present]]
    output_splits = received[etp_rank].sum(axis=1)
    etp_sizes = received.sum(axis=(1, 2))
    chunk_start = (np.cumsum(received.ravel()) - received.ravel()).reshape(received.shape)
    slot_major = np.transpose(received, (2, 0, 1)).ravel()
    to_slot_major = concat_ranges(np.transpose(chunk_start, (2, 0, 1)).ravel(), slot_major)
    return RankPlan(
        send_pairs=send_pairs,
        input_splits=input_splits,
        output_splits=output_splits,
        etp_sizes=etp_sizes,
        to_slot_major=to_slot_major,
        tokens_per_slot=received.sum(axis=(0, 1)),
    )
