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

Two implementations. ``rank_tables`` (the runtime's) computes only what one rank needs from the
schedule's slot quotas, by the scheduler's own split rule: its own row of per-slot send counts and
the columns of its own local slots (rows arriving from every source), in O(G*E + T*G*L), plus the
small tables from which the device builds the index maps (``runtime.dispatch``). ``source_slot_counts`` + ``rank_plan`` compute every source's plan and
the full index maps in numpy: the slow reference the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
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


# --- this rank's tables (the runtime's path) ---------------------------------------------------------


@dataclass(frozen=True)
class RankTables:
    """One rank's share of one schedule, from ``rank_tables``. nnz slots, L local slots.

    Host ints drive the collectives; ``device_table`` (int64, one host-to-device copy) is what the
    device needs to build the index maps: ``[delta (nnz) | send_counts (nnz) | chunk_shift (L*T*G)
    | chunk_sizes (L*T*G) | group_ends (L)]`` (see ``runtime.dispatch.build_index_maps``). Rows are
    grouped by local slot in ``group_order`` (a permutation of the L local slots).
    """

    send_counts: np.ndarray  # int64 [nnz]: this rank's pairs per slot (its row of source_slot_counts)
    received: np.ndarray  # int64 [T, G, L]: rows arriving from source (t', EP rank s) per local slot
    input_splits: list[int]  # [G] rows sent to each EP rank
    output_splits: list[int]  # [G] rows received from each EP rank (this expert-TP rank's share)
    etp_sizes: list[int]  # [T] rows each expert-TP rank contributes to the all-gather
    group_order: np.ndarray  # int64 [L]: local slot of each row group
    group_rows: list[int]  # [L] rows per group, in group order
    device_table: np.ndarray  # int64, layout above

    @property
    def pairs(self) -> int:
        return int(sum(self.input_splits))

    @property
    def rows(self) -> int:
        return int(sum(self.etp_sizes))


@numba.njit(cache=True, nogil=True)
def _overlap(lo_a, hi_a, lo_b, hi_b):
    return max(0, min(hi_a, hi_b) - max(lo_a, lo_b))


@numba.njit(cache=True, nogil=True)
def _tokens(counts, s, e):
    """Tokens of EP rank ``s`` (all its expert-TP sources) for expert ``e``."""
    total = 0
    for t in range(counts.shape[0]):
        total += counts[t, s, e]
    return total


@numba.njit(cache=True, nogil=True)
def _rank_tables(counts, slot_tokens, ptr, gpus, slot_expert, slot_local, local_slots, group_order, t_me, g_me):
    T, G, E = counts.shape
    nnz = gpus.size
    L = local_slots.size
    # The scheduler's split of each replicated expert's quotas over EP ranks (planning.scheduler,
    # _split_by_source): every copy first keeps its own rank's tokens (``kept``); the other tokens
    # fill the copies' remaining quotas with EP ranks in order, copies in slot order. So EP rank s
    # takes the interval [A_s, A_s + left_s) of the expert's remote tokens, A_s the sum of left over
    # ranks before s, and copy r covers [B_r, B_r + rest_r): their overlap is what s sends to r.
    kept = np.zeros(nnz, np.int64)
    for r in range(nnz):
        kept[r] = min(_tokens(counts, gpus[r], slot_expert[r]), slot_tokens[r])
    before = np.zeros(E, np.int64)  # A of this EP rank per expert (row by row: memory order)
    for t in range(T):
        for s in range(g_me):
            for e in range(E):
                before[e] += counts[t, s, e]
    own_kept = np.zeros(E, np.int64)
    for r in range(nnz):
        if ptr[slot_expert[r] + 1] - ptr[slot_expert[r]] > 1:
            if gpus[r] < g_me:
                before[slot_expert[r]] -= kept[r]
            elif gpus[r] == g_me:
                own_kept[slot_expert[r]] = kept[r]
    # This EP rank's tokens per slot (all its expert-TP sources).
    agg_row = np.zeros(nnz, np.int64)
    for e in range(E):
        if ptr[e + 1] - ptr[e] == 1:
            agg_row[ptr[e]] = _tokens(counts, g_me, e)
            continue
        start = before[e]
        end = start + _tokens(counts, g_me, e) - own_kept[e]
        covered = 0
        for r in range(ptr[e], ptr[e + 1]):
            rest = slot_tokens[r] - kept[r]
            agg_row[r] = (kept[r] if gpus[r] == g_me else 0) + _overlap(start, end, covered, covered + rest)
            covered += rest
    # Arrivals need every EP rank's share of each copy of the replicated experts held here.
    column = np.full(nnz, -1, np.int64)
    num_columns = 0
    for j in range(L):
        r = local_slots[j]
        if r >= 0 and ptr[slot_expert[r] + 1] - ptr[slot_expert[r]] > 1 and column[r] < 0:
            e = slot_expert[r]
            for r2 in range(ptr[e], ptr[e + 1]):
                column[r2] = num_columns
                num_columns += 1
    quota = np.zeros((G, num_columns), np.int64)
    holder = np.full(G, -1, np.int64)
    for j in range(L):  # a rank holds at most one copy of an expert: each expert once
        r0 = local_slots[j]
        if r0 < 0 or column[r0] < 0:
            continue
        e = slot_expert[r0]
        for r in range(ptr[e], ptr[e + 1]):
            holder[gpus[r]] = r
        start = 0
        for s in range(G):
            left = _tokens(counts, s, e) - (kept[holder[s]] if holder[s] >= 0 else 0)
            covered = 0
            for r in range(ptr[e], ptr[e + 1]):
                rest = slot_tokens[r] - kept[r]
                share = _overlap(start, start + left, covered, covered + rest)
                quota[s, column[r]] = (kept[r] if gpus[r] == s else 0) + share
                covered += rest
            start += left
        for r in range(ptr[e], ptr[e + 1]):
            holder[gpus[r]] = -1
    # This source's prefix range of each expert's numbering, cut by the slots' ranges.
    send = np.zeros(nnz, np.int64)
    for e in range(E):
        lo = 0
        for t in range(t_me):
            lo += counts[t, g_me, e]
        hi = lo + counts[t_me, g_me, e]
        slot_lo = 0
        for r in range(ptr[e], ptr[e + 1]):
            slot_hi = slot_lo + agg_row[r]
            send[r] = max(0, min(hi, slot_hi) - max(lo, slot_lo))
            slot_lo = slot_hi

    # Arrivals: per local slot, every source's share (replicated experts: cut by all copies' quotas).
    received = np.zeros((T, G, L), np.int64)
    for j in range(L):
        r = local_slots[j]
        if r < 0:
            continue
        e = slot_expert[r]
        if ptr[e + 1] - ptr[e] == 1:
            for t in range(T):
                for s in range(G):
                    received[t, s, j] = counts[t, s, e]
            continue
        for s in range(G):
            slot_lo = 0
            for r2 in range(ptr[e], r):
                slot_lo += quota[s, column[r2]]
            slot_hi = slot_lo + quota[s, column[r]]
            src_lo = 0
            for t in range(T):
                src_hi = src_lo + counts[t, s, e]
                received[t, s, j] = max(0, min(src_hi, slot_hi) - max(src_lo, slot_lo))
                src_lo = src_hi

    # Host split sizes.
    input_splits = np.zeros(G, np.int64)
    for r in range(nnz):
        input_splits[gpus[r]] += send[r]
    output_splits = np.zeros(G, np.int64)
    etp_sizes = np.zeros(T, np.int64)
    for t in range(T):
        for s in range(G):
            for j in range(L):
                etp_sizes[t] += received[t, s, j]
                if t == t_me:
                    output_splits[s] += received[t, s, j]

    chunks = L * T * G
    table = np.empty(2 * nnz + 2 * chunks + L, np.int64)
    # delta: send position minus expert-order position of each slot's first pair; send order is
    # (destination EP rank, destination local slot).
    send_start = np.zeros(G * L, np.int64)
    for r in range(nnz):
        send_start[gpus[r] * L + slot_local[r]] = send[r]
    running = 0
    for i in range(G * L):
        size = send_start[i]
        send_start[i] = running
        running += size
    slot_start = 0
    for r in range(nnz):
        table[r] = send_start[gpus[r] * L + slot_local[r]] - slot_start
        table[nnz + r] = send[r]
        slot_start += send[r]
    # Arrival order is (t', s, local slot); grouped order is (group, t', s).
    arrival_start = np.zeros((T, G, L), np.int64)
    running = 0
    for t in range(T):
        for s in range(G):
            for j in range(L):
                arrival_start[t, s, j] = running
                running += received[t, s, j]
    group_rows = np.zeros(L, np.int64)
    out = 0
    c = 0
    for i in range(L):
        j = group_order[i]
        for t in range(T):
            for s in range(G):
                size = received[t, s, j]
                table[2 * nnz + c] = arrival_start[t, s, j] - out
                table[2 * nnz + chunks + c] = size
                out += size
                group_rows[i] += size
                c += 1
        table[2 * nnz + 2 * chunks + i] = out
    return send, received, input_splits, output_splits, etp_sizes, group_rows, table


def rank_tables(
    counts: np.ndarray,
    schedule: Schedule,
    layout: PhysicalLayout,
    etp_rank: int,
    ep_rank: int,
    group_order: np.ndarray | None = None,
) -> RankTables:
    """This rank's ``RankTables`` from ``counts`` int64 [T, G, E] and the schedule solved for
    ``counts.sum(0)`` (its slot quotas; per-source pieces are not needed, ``schedule_quotas`` gives
    none); ``group_order`` int64 [L] (default: local slot order)."""
    if group_order is None:
        group_order = np.arange(layout.local_slots, dtype=np.int64)
    placement = layout.placement
    send, received, input_splits, output_splits, etp_sizes, group_rows, table = _rank_tables(
        counts,
        schedule.slot_tokens,
        placement.ptr,
        placement.gpus,
        layout.slot_expert,
        layout.slot_local,
        layout.local_slot[ep_rank],
        group_order,
        etp_rank,
        ep_rank,
    )
    return RankTables(
        send_counts=send,
        received=received,
        input_splits=input_splits.tolist(),
        output_splits=output_splits.tolist(),
        etp_sizes=etp_sizes.tolist(),
        group_order=group_order,
        group_rows=group_rows.tolist(),
        device_table=table,
    )
