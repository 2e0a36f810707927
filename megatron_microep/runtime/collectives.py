"""Differentiable variable-size collectives for token exchange (any backend: NCCL or gloo).

Split sizes are Python ints known on every rank (they follow from the shared schedule), so no
collective is spent exchanging them. Uneven all-gather and reduce-scatter are done by padding every
chunk to the largest one: gloo rejects uneven ``all_gather`` lists, and the padded form is the one
implementation that runs, and is tested, everywhere.

Also: ``start_all_to_all`` (an asynchronous flat all-to-all, ``Pending.wait()`` for its output) and
``dedicated_group`` (a communicator of a group's ranks for one kind of traffic), which replica
weights and gradients use.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# torch 2.13 renamed the flat collectives (the old names still work but warn); older torch has only the old.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_to_all(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group) -> torch.Tensor:
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), list(output_splits), list(input_splits), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _all_to_all(grad, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group) -> torch.Tensor:
    """Rows ``x`` [sum(input_splits), ...] -> [sum(output_splits), ...]; rank-ordered chunks."""
    return _AllToAll.apply(x, [int(s) for s in output_splits], [int(s) for s in input_splits], group)


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    pad = x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))
    return torch.cat([x, pad])


def _gather_uneven(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    width = max(sizes)
    gathered = x.new_empty((width * len(sizes),) + tuple(x.shape[1:]))
    _all_gather_flat(gathered, _padded(x, width), group=group)
    if all(s == width for s in sizes):
        return gathered
    return torch.cat([gathered[i * width : i * width + s] for i, s in enumerate(sizes)])


def _reduce_scatter_uneven(x: torch.Tensor, sizes: Sequence[int], rank: int, group) -> torch.Tensor:
    width = max(sizes)
    chunks = torch.split(x, list(sizes))
    stacked = torch.cat([_padded(c, width) for c in chunks])
    out = x.new_empty((width,) + tuple(x.shape[1:]))
    _reduce_scatter_flat(out, stacked, group=group)
    return out[: sizes[rank]]


class _AllGatherUneven(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.args = (sizes, rank, group)
        return _gather_uneven(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, rank, group = ctx.args
        return _reduce_scatter_uneven(grad.contiguous(), sizes, rank, group), None, None, None


class _ReduceScatterUneven(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.args = (sizes, group)
        return _reduce_scatter_uneven(x, sizes, rank, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, group = ctx.args
        return _gather_uneven(grad.contiguous(), sizes, group), None, None, None


def all_gather_uneven(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Concatenate every rank's rows (rank i contributes ``sizes[i]``); backward reduce-scatters."""
    sizes = [int(s) for s in sizes]
    if len(sizes) == 1:
        return x
    return _AllGatherUneven.apply(x, sizes, dist.get_rank(group), group)


def reduce_scatter_uneven(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Sum ``x`` [sum(sizes), ...] over ranks and keep this rank's ``sizes[rank]`` rows."""
    sizes = [int(s) for s in sizes]
    if len(sizes) == 1:
        return x
    return _ReduceScatterUneven.apply(x, sizes, dist.get_rank(group), group)


def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """[W, *x.shape] stack of every rank's equally shaped ``x`` (no autograd: metadata only)."""
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_flat(out, x.contiguous(), group=group)
    return out.view((world,) + tuple(x.shape))


# --- asynchronous transfers on a group of their own ---------------------------------------------


class Pending:
    """An asynchronous collective in flight: ``wait()`` returns its output.

    Keeps its input and output alive until then. On NCCL, c10d runs the collective on its own
    stream after the issuing stream's earlier work and ``wait()`` makes the calling stream wait for
    it (the host is not blocked); on gloo ``wait()`` blocks until the data is there. Either way the
    caller's code is the same.
    """

    def __init__(self, work, output: torch.Tensor, keep: torch.Tensor):
        self._work = work
        self._output = output
        self._keep = keep

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work, self._keep = None, None
        return self._output


def start_all_to_all(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group) -> Pending:
    """``all_to_all`` of a flat ``x`` [sum(input_splits)] without waiting (no autograd)."""
    out = x.new_empty(sum(output_splits))
    work = dist.all_to_all_single(
        out, x.contiguous(), [int(s) for s in output_splits], [int(s) for s in input_splits], group=group, async_op=True
    )
    return Pending(work, out, x)


_DEDICATED: dict[tuple[str, object], object] = {}


def dedicated_group(group, purpose: str):
    """A communicator of ``group``'s ranks for ``purpose`` alone, created once per (purpose, group).

    Traffic on it does not queue behind ``group``'s own collectives (on NCCL: its own stream), so
    e.g. replica weights can move while tokens are exchanged. Only ``group``'s ranks create it
    (``use_local_synchronization``); they must reach their first use for a purpose in the same
    order, which holds when they run the same layers. Where the default process group is bound to
    a device (``init_process_group(device_id=...)``), torch would create the group by splitting the
    world's communicator, which every rank must join; ``group`` itself is used then (logged).
    """
    key = (purpose, group)
    if key not in _DEDICATED:
        if getattr(dist.group.WORLD, "bound_device_id", None) is not None:
            logger.warning(
                "MicroEP %s: the default process group is bound to a device, so a group of the EP ranks alone "
                "cannot be created; this traffic shares the EP group with the token all-to-alls",
                purpose,
            )
            _DEDICATED[key] = group
        else:
            _DEDICATED[key] = dist.new_group(
                dist.get_process_group_ranks(group),
                backend=dist.get_backend(group),
                use_local_synchronization=True,
                group_desc=f"MICROEP_{purpose.upper()}",
            )
    return _DEDICATED[key]
