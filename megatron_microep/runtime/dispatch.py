"""Token exchange of one MoE layer: count gather, schedule, permutation, all-to-all and combine.

Per micro-batch: each rank's routed-token counts per expert are all-gathered over the expert
domain (expert-TP x EP ranks; one small collective), every rank solves the same schedule, and the
per-source send plan follows from it with no further agreement. Tokens then travel as in
Megatron's all-to-all dispatcher, but addressed to physical slots (home or replica) instead of
logical experts: permute by (destination rank, local slot), variable-size all-to-all over EP,
all-gather over expert-TP, regroup by local slot; combine runs the same steps backwards and sums
each token's expert outputs (unweighted: probabilities are applied inside the experts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from megatron_microep.planning.scheduler import Schedule, schedule
from megatron_microep.runtime.collectives import (
    all_gather_rows,
    all_gather_uneven,
    all_to_all,
    reduce_scatter_uneven,
)
from megatron_microep.runtime.layout import PhysicalLayout
from megatron_microep.runtime.routing import RankPlan, rank_plan, source_slot_counts


class TokenConservationError(RuntimeError):
    """The send plan does not cover this rank's routed tokens exactly once."""


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


@dataclass(frozen=True)
class MicroBatchRouting:
    """One micro-batch of one layer: the agreed counts and schedule, and this rank's index maps."""

    layout: PhysicalLayout
    counts: np.ndarray  # int64 [T, G, E]: routed tokens of each source rank per expert
    schedule: Schedule
    plan: RankPlan
    send_tokens: torch.Tensor  # int64 [pairs]: local token index of each sent row
    send_experts: torch.Tensor  # int64 [pairs]: logical expert of each sent row
    to_slot_major: torch.Tensor  # int64 [rows]
    from_slot_major: torch.Tensor  # int64 [rows]: inverse of to_slot_major
    scheduling_seconds: float  # count gather + solve + split computation
    phase_seconds: tuple[float, float, float]  # (count gather, solve, split computation)


Solver = Callable[[np.ndarray, object], Schedule]


def gather_counts(local_counts: torch.Tensor, groups: Groups) -> np.ndarray:
    """int64 [T, G, E] routed-token counts of every rank of the expert domain.

    Each rank contributes (expert-TP rank, EP rank, counts...), so the result does not depend on
    how the tp_ep group orders its ranks.
    """
    header = torch.tensor([groups.etp_rank, groups.ep_rank], dtype=torch.int64, device=local_counts.device)
    rows = all_gather_rows(torch.cat([header, local_counts.to(torch.int64)]), groups.tp_ep).cpu().numpy()
    counts = np.zeros((groups.etp_size, groups.ep_size, local_counts.numel()), dtype=np.int64)
    counts[rows[:, 0], rows[:, 1]] = rows[:, 2:]
    return counts


def route(
    routing_map: torch.Tensor, layout: PhysicalLayout, groups: Groups, solver: Solver = schedule
) -> MicroBatchRouting:
    """Agree on counts, solve, and build this rank's index maps. ``routing_map`` bool [tokens, E]."""
    start = time.perf_counter()
    counts = gather_counts(routing_map.sum(dim=0), groups)
    gathered = time.perf_counter()
    sched = solver(counts.sum(axis=0), layout.placement)
    solved = time.perf_counter()
    per_source = source_slot_counts(counts, sched, layout)
    plan = rank_plan(per_source, layout, groups.etp_rank, groups.ep_rank)
    inverse = np.empty_like(plan.to_slot_major)
    inverse[plan.to_slot_major] = np.arange(plan.to_slot_major.size)
    done = time.perf_counter()

    device = routing_map.device
    pairs = routing_map.t().nonzero()  # (expert, token), ordered by expert then token
    if pairs.shape[0] != plan.send_pairs.size:
        raise TokenConservationError(
            f"rank (etp {groups.etp_rank}, ep {groups.ep_rank}) routes {pairs.shape[0]} token-expert pairs "
            f"but its send plan covers {plan.send_pairs.size}"
        )
    send = torch.from_numpy(plan.send_pairs).to(device)
    return MicroBatchRouting(
        layout=layout,
        counts=counts,
        schedule=sched,
        plan=plan,
        send_tokens=pairs[:, 1].index_select(0, send),
        send_experts=pairs[:, 0].index_select(0, send),
        to_slot_major=torch.from_numpy(plan.to_slot_major).to(device),
        from_slot_major=torch.from_numpy(inverse).to(device),
        scheduling_seconds=done - start,
        phase_seconds=(gathered - start, solved - gathered, done - solved),
    )


def permute(hidden: torch.Tensor, probs: torch.Tensor, routing: MicroBatchRouting):
    """Rows to send, in send order: tokens [pairs, H] and their routing probabilities [pairs]."""
    tokens = hidden.index_select(0, routing.send_tokens)
    return tokens, probs[routing.send_tokens, routing.send_experts]


def exchange(tokens: torch.Tensor, probs: torch.Tensor, routing: MicroBatchRouting, groups: Groups):
    """EP all-to-all of tokens and probabilities."""
    plan = routing.plan
    return (
        all_to_all(tokens, plan.output_splits, plan.input_splits, groups.ep),
        all_to_all(probs, plan.output_splits, plan.input_splits, groups.ep),
    )


def regroup(tokens: torch.Tensor, probs: torch.Tensor, routing: MicroBatchRouting, groups: Groups):
    """Expert-TP all-gather, then rows grouped by local slot: (tokens, tokens_per_slot [L], probs)."""
    sizes = routing.plan.etp_sizes
    tokens = all_gather_uneven(tokens, sizes, groups.etp)
    probs = all_gather_uneven(probs, sizes, groups.etp)
    order = routing.to_slot_major
    return tokens.index_select(0, order), routing.plan.tokens_per_slot, probs.index_select(0, order)


def ungroup(expert_out: torch.Tensor, routing: MicroBatchRouting, groups: Groups, reduce_dtype: torch.dtype):
    """Back to arrival order, then the expert-TP partial sums reduced onto their source ranks.

    The reduction runs in ``reduce_dtype`` (Megatron reduces in the routing-probability dtype).
    """
    out = expert_out.index_select(0, routing.from_slot_major)
    if groups.etp_size == 1:
        return out
    dtype = out.dtype
    return reduce_scatter_uneven(out.to(reduce_dtype), routing.plan.etp_sizes, groups.etp).to(dtype)


def exchange_back(rows: torch.Tensor, routing: MicroBatchRouting, groups: Groups) -> torch.Tensor:
    plan = routing.plan
    return all_to_all(rows, plan.input_splits, plan.output_splits, groups.ep)


def unpermute(rows: torch.Tensor, routing: MicroBatchRouting, num_tokens: int) -> torch.Tensor:
    """Sum each token's expert outputs: rows [pairs, H] in send order -> [num_tokens, H]."""
    out = rows.new_zeros((num_tokens, rows.shape[1]))
    return out.index_add(0, routing.send_tokens, rows)
