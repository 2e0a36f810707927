"""Token exchange of one MoE layer: count exchange, schedule, index maps, all-to-all and combine.

Per micro-batch (``route``):

1. Device, before the schedule is known: each rank's routed-token counts per expert go into one
   small int tensor that is all-gathered over the expert domain (expert-TP x EP ranks) and copied
   to the host without blocking (``runtime.device``); meanwhile the device orders the rank's
   (token, expert) pairs by expert with a fixed-size top-k and a stable sort (no ``nonzero``:
   every token has exactly top-k experts, checked on the device and reported with the counts).
2. The one host boundary, ``CountExchange.wait``: the host waits for the gathered counts, as
   late as possible. Nothing else in the forward or the backward reads device values.
3. Host: every rank solves the same schedule and computes only its own tables
   (``runtime.routing.rank_tables``): its per-slot send counts, the rows arriving at its slots,
   the split sizes of the collectives (host ints, no further agreement), and a small int table.
   With a ``plan`` (the layer's burst copies) the same host values also decide this micro-batch's
   layout first, identically on every rank.
4. Device: that table arrives with one non-blocking copy and the index maps are built from it
   with fixed-size device ops (``repeat_interleave`` with ``output_size``, ``scatter`` for
   inverses).

Tokens then travel as in Megatron's all-to-all dispatcher, but addressed to physical slots (home
or replica) instead of logical experts: permute by (destination rank, local slot), variable-size
all-to-all over EP, all-gather over expert-TP, regroup by local slot; combine runs the same steps
backwards and sums each token's expert outputs (unweighted: probabilities are applied inside the
experts). Every gather of rows has a custom backward that gathers again (a permutation's inverse,
or each token's top-k rows summed in ascending expert order), so neither direction scatters with
atomics: forward and backward are bitwise reproducible.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from megatron_microep.planning.scheduler import Schedule, schedule_quotas
from megatron_microep.runtime.collectives import (
    all_gather_rows,
    all_gather_uneven,
    all_to_all,
    reduce_scatter_uneven,
)
from megatron_microep.runtime.device import HostCopy, copy_to_device, copy_to_host
from megatron_microep.runtime.layout import PhysicalLayout
from megatron_microep.runtime.routing import RankTables, rank_tables


class TokenConservationError(RuntimeError):
    """A rank's routing map does not give every token exactly top-k experts."""


@dataclass(frozen=True)
class Groups:
    """The process groups of the expert domain and this rank's position in them."""

    ep: object
    etp: object
    tp_ep: object
    ep_rank: int
    ep_size: int
    etp_rank: int
    etp_size: int


# --- before the schedule ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PairOrder:
    """This rank's (token, expert) pairs, P = tokens * topk of them; flat pair index f = token*topk + j."""

    experts: torch.Tensor  # int64 [tokens, topk]: each token's experts, ascending
    by_expert: torch.Tensor  # int64 [P]: flat index of each pair in (expert, token) order


def order_pairs(routing_map: torch.Tensor, topk: int) -> PairOrder:
    """Fixed-size replacement of ``routing_map.T.nonzero()``: top-k of a descending expert score
    picks each token's experts in ascending order; a stable sort by expert orders the pairs."""
    num_experts = routing_map.shape[1]
    # float32 holds these small integers exactly (up to 2**24 experts) and its top-k is the fast one.
    descending = torch.arange(num_experts, 0, -1, dtype=torch.float32, device=routing_map.device)
    score = routing_map.to(torch.float32) * descending
    experts = torch.topk(score, topk, dim=1, sorted=True).indices
    by_expert = torch.sort(experts.reshape(-1), stable=True).indices
    return PairOrder(experts=experts, by_expert=by_expert)


class CountExchange:
    """The gathered routed-token counts of the expert domain, on their way to the host."""

    def __init__(self, pending: HostCopy, groups: Groups, num_experts: int) -> None:
        self._pending = pending
        self._groups = groups
        self._num_experts = num_experts

    def wait(self) -> np.ndarray:
        """int64 [T, G, E] routed tokens of every (expert-TP rank, EP rank) per expert.

        The single point per layer forward where the host waits for the device. Raises
        TokenConservationError on every rank if any rank's routing map gave a token other than
        top-k experts.
        """
        rows = self._pending.wait()
        bad = np.flatnonzero(rows[:, 2])
        if bad.size:
            where = ", ".join(f"(etp {rows[i, 0]}, ep {rows[i, 1]}): {rows[i, 2]} tokens" for i in bad)
            raise TokenConservationError(f"routing maps with tokens not routed to exactly top-k experts: {where}")
        g = self._groups
        counts = np.zeros((g.etp_size, g.ep_size, self._num_experts), dtype=np.int64)
        counts[rows[:, 0], rows[:, 1]] = rows[:, 3:]
        return counts


def exchange_counts(routing_map: torch.Tensor, topk: int, groups: Groups) -> CountExchange:
    """Start the count exchange: all-gather over ``groups.tp_ep`` of (expert-TP rank, EP rank,
    tokens without exactly ``topk`` experts, tokens per expert), then a non-blocking host copy.

    Rows carry their sender's position, so the result does not depend on the group's rank order.
    """
    num_experts = routing_map.shape[1]
    local = torch.empty(3 + num_experts, dtype=torch.int64, device=routing_map.device)
    local[0].fill_(groups.etp_rank)  # scalar fills: no host-to-device copy
    local[1].fill_(groups.ep_rank)
    local[2] = (routing_map.sum(dim=1) != topk).sum()
    local[3:] = routing_map.sum(dim=0)
    return CountExchange(copy_to_host(all_gather_rows(local, groups.tp_ep)), groups, num_experts)


# --- after the schedule -----------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexMaps:
    """This rank's device index maps for one micro-batch. P pairs (send rows), N tokens, k = topk,
    ``rows`` rows after the expert-TP all-gather, L row groups (local slots in group order).

    int32 (gather indices; autograd keeps them for backward, so half the bytes of int64 count).
    """

    send_tokens: torch.Tensor  # [P]: token of each send row
    token_rows: torch.Tensor  # [k, N]: send row of each token's j-th expert (ascending expert)
    probs_index: torch.Tensor  # [P]: token * E + expert of each send row
    to_grouped: torch.Tensor  # [rows]: arrival row of each grouped row
    from_grouped: torch.Tensor  # [rows]: inverse of to_grouped
    group_offsets: torch.Tensor  # [L]: rows up to the end of each group (grouped GEMM offsets)


def build_index_maps(order: PairOrder, tables: RankTables, num_experts: int) -> IndexMaps:
    """Index maps from the pair order and this rank's tables; one non-blocking host-to-device copy,
    then fixed-size device ops (sizes are host ints, so nothing waits for the device)."""
    device = order.by_expert.device
    num_tokens, topk = order.experts.shape
    pairs, rows = tables.pairs, tables.rows
    if pairs != num_tokens * topk:
        raise TokenConservationError(f"send plan covers {pairs} pairs, the rank routed {num_tokens * topk}")
    nnz, groups = tables.send_counts.size, len(tables.group_rows)
    chunks = tables.received.size
    table = copy_to_device(tables.device_table, device)
    delta, send_counts, shift, sizes, ends = torch.split(table, [nnz, nnz, chunks, chunks, groups])
    # Pair at expert-order position p belongs to the slot whose range covers p; its send row is p
    # plus that slot's shift from expert order to (destination rank, local slot) order.
    send_pos = torch.arange(pairs, device=device) + torch.repeat_interleave(delta, send_counts, output_size=pairs)
    flat = order.by_expert
    row_of_pair = torch.empty_like(flat).scatter_(0, flat, send_pos)
    pair_of_row = torch.empty_like(flat).scatter_(0, send_pos, flat)
    send_tokens = torch.div(pair_of_row, topk, rounding_mode="floor")
    expert_of_row = order.experts.reshape(-1).index_select(0, pair_of_row)
    arange_rows = torch.arange(rows, device=device)
    to_grouped = arange_rows + torch.repeat_interleave(shift, sizes, output_size=rows)
    from_grouped = torch.empty_like(to_grouped).scatter_(0, to_grouped, arange_rows)
    index = torch.int32
    return IndexMaps(
        send_tokens=send_tokens.to(index),
        token_rows=row_of_pair.view(num_tokens, topk).t().to(index, memory_format=torch.contiguous_format),
        probs_index=(send_tokens * num_experts + expert_of_row).to(index),
        to_grouped=to_grouped.to(index),
        from_grouped=from_grouped.to(index),
        group_offsets=ends.to(index),
    )


@dataclass(frozen=True)
class MicroBatchRouting:
    """One micro-batch of one layer: the agreed counts and schedule, this rank's tables and maps."""

    layout: PhysicalLayout
    counts: np.ndarray  # int64 [T, G, E]: routed tokens of each source rank per expert
    schedule: Schedule
    tables: RankTables
    maps: IndexMaps
    phase_seconds: tuple[float, float, float]  # host: count exchange (incl. the wait), solve, own tables

    @property
    def group_rows(self) -> list[int]:
        """Rows per row group (local slots in ``tables.group_order``), host ints."""
        return self.tables.group_rows


Solver = Callable[[np.ndarray, object], Schedule]
# tokens int64 [G, E] -> (the micro-batch's layout, its schedule, group order or None): e.g. burst copies.
LayoutPlanner = Callable[[np.ndarray], tuple[PhysicalLayout, Schedule, "np.ndarray | None"]]


def route(
    routing_map: torch.Tensor,
    layout: PhysicalLayout,
    groups: Groups,
    topk: int,
    solver: Solver = schedule_quotas,
    group_order: np.ndarray | None = None,
    plan: LayoutPlanner | None = None,
) -> MicroBatchRouting:
    """Agree on counts, solve, and build this rank's index maps. ``routing_map`` bool [tokens, E]
    with exactly ``topk`` experts per token; ``group_order`` int64 [L]: local slot of each row
    group after ``regroup`` (default: local slot order). ``plan``: decides the layout too, from the
    gathered counts (host values: every rank decides the same), instead of ``layout``, ``solver``
    and ``group_order``."""
    start = time.perf_counter()
    pending = exchange_counts(routing_map, topk, groups)
    order = order_pairs(routing_map, topk)  # queued before the host waits
    counts = pending.wait()
    gathered = time.perf_counter()
    if plan is None:
        sched = solver(counts.sum(axis=0), layout.placement)
    else:
        layout, sched, group_order = plan(counts.sum(axis=0))
    solved = time.perf_counter()
    tables = rank_tables(counts, sched, layout, groups.etp_rank, groups.ep_rank, group_order)
    planned = time.perf_counter()
    return MicroBatchRouting(
        layout=layout,
        counts=counts,
        schedule=sched,
        tables=tables,
        maps=build_index_maps(order, tables, routing_map.shape[1]),
        phase_seconds=(gathered - start, solved - gathered, planned - solved),
    )


# --- row movement without atomics -------------------------------------------------------------------


def fold_rows(x: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
    """out[i] = x[owners[0, i]] + x[owners[1, i]] + ... summed left to right (in float32 for
    16-bit inputs, rounded once): the fixed-order sum that replaces ``index_add``. owners [m, N]."""
    if owners.shape[0] == 1:
        return x.index_select(0, owners.select(0, 0))
    wide = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    out = x.index_select(0, owners.select(0, 0)).to(wide)
    for j in range(1, owners.shape[0]):
        out = out + x.index_select(0, owners.select(0, j))
    return out.to(x.dtype)


class _Expand(torch.autograd.Function):
    """rows = x[index], every row of x appearing m times, at ``owners[:, i]`` [m, X]; the
    gradient of row i of x is the fixed-order sum of its m rows' gradients."""

    @staticmethod
    def forward(ctx, x, index, owners):
        ctx.save_for_backward(owners)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (owners,) = ctx.saved_tensors
        return fold_rows(grad.contiguous(), owners), None, None


class _Fold(torch.autograd.Function):
    """out = fold_rows(x, owners); every row of x belongs to out row ``index`` [rows of x]."""

    @staticmethod
    def forward(ctx, x, owners, index):
        ctx.save_for_backward(index)
        return fold_rows(x, owners)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.contiguous().index_select(0, index), None, None


class _TakeProbs(torch.autograd.Function):
    """probs [N, E] -> probs at each send row's (token, expert); backward writes each gradient to its
    own entry (distinct entries: no accumulation)."""

    @staticmethod
    def forward(ctx, probs, index):
        ctx.save_for_backward(index)
        ctx.shape = probs.shape
        return probs.reshape(-1).index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        flat = grad.new_zeros(ctx.shape[0] * ctx.shape[1]).index_put_((index,), grad)
        return flat.view(ctx.shape), None


def permute(hidden: torch.Tensor, probs: torch.Tensor, routing: MicroBatchRouting):
    """Rows to send, in send order: tokens [pairs, H] and their routing probabilities [pairs]."""
    maps = routing.maps
    tokens = _Expand.apply(hidden, maps.send_tokens, maps.token_rows)
    return tokens, _TakeProbs.apply(probs, maps.probs_index)


def exchange(tokens: torch.Tensor, probs: torch.Tensor, routing: MicroBatchRouting, groups: Groups):
    """EP all-to-all of tokens and probabilities."""
    tables = routing.tables
    return (
        all_to_all(tokens, tables.output_splits, tables.input_splits, groups.ep),
        all_to_all(probs, tables.output_splits, tables.input_splits, groups.ep),
    )


def regroup(tokens: torch.Tensor, probs: torch.Tensor, routing: MicroBatchRouting, groups: Groups):
    """Expert-TP all-gather, then rows grouped by local slot in group order:
    (tokens, rows per group as host ints [L], probs)."""
    sizes = routing.tables.etp_sizes
    tokens = all_gather_uneven(tokens, sizes, groups.etp)
    probs = all_gather_uneven(probs, sizes, groups.etp)
    maps = routing.maps
    inverse = maps.from_grouped.unsqueeze(0)
    return (
        _Expand.apply(tokens, maps.to_grouped, inverse),
        routing.group_rows,
        _Expand.apply(probs, maps.to_grouped, inverse),
    )


def ungroup(expert_out: torch.Tensor, routing: MicroBatchRouting, groups: Groups, reduce_dtype: torch.dtype):
    """Back to arrival order, then the expert-TP partial sums reduced onto their source ranks.

    The reduction runs in ``reduce_dtype`` (Megatron reduces in the routing-probability dtype).
    """
    maps = routing.maps
    out = _Expand.apply(expert_out, maps.from_grouped, maps.to_grouped.unsqueeze(0))
    if groups.etp_size == 1:
        return out
    dtype = out.dtype
    return reduce_scatter_uneven(out.to(reduce_dtype), routing.tables.etp_sizes, groups.etp).to(dtype)


def exchange_back(rows: torch.Tensor, routing: MicroBatchRouting, groups: Groups) -> torch.Tensor:
    tables = routing.tables
    return all_to_all(rows, tables.input_splits, tables.output_splits, groups.ep)


def unpermute(rows: torch.Tensor, routing: MicroBatchRouting) -> torch.Tensor:
    """Each token's expert outputs summed in ascending expert order: rows [pairs, H] in send order
    -> [tokens, H]."""
    maps = routing.maps
    return _Fold.apply(rows, maps.token_rows, maps.send_tokens)
