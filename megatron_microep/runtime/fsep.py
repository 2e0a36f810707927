"""FSEP (fully sharded expert parallel, after LAER-MoE): experts stored as shards, gathered per layout.

Every EP rank stores a 1/G shard of every expert of a layer in one contiguous buffer ``[E, S]``
(``ShardSpec``); gradients and optimizer state live on the same shards. A layout (a placement
with C slots per rank, any expert anywhere, at most one copy of an expert per rank) says which
full experts each rank runs in a micro-batch. Before the expert GEMM, one all-to-all of shards
builds this rank's C experts (``ShardExchange.start_gather``); after the backward GEMMs, the reverse
all-to-all sends each copy's gradient back as shards, and every rank adds, per expert, the
contributions of all copies in a fixed order (source rank ascending) to the shard's gradient. A
new layout changes only which shards are sent where: no parameter, gradient or optimizer state moves.

Cut. Each expert tensor is cut along its first dimension into G row blocks, shard r holding block
r; a gated fc1 (weight and bias) is cut per half (gate rows, then linear rows), so shard r holds
block r of each half. Every shard piece is then a rectangular block of Megatron's checkpoint
layout of that tensor, which is what lets FSEP save and load the stock expert checkpoint format.

Memory policies (``MEMORY_POLICIES``), per layer and micro-batch:
- ``keep``: the gathered experts stay alive (autograd saves them) until this layer's backward,
  which uses them and returns the gradients: one gather and one gradient return.
- ``regather``: the gathered experts and the expert activations are freed right after the forward;
  the backward gathers again, recomputes the expert forward, then returns the gradients: two
  gathers, one gradient return, one extra expert forward, and at most one layer's experts alive
  (plus one prefetched).

Communication and streams. Gathers and gradient returns run on their own process group over the EP
ranks (``shard_group``), so that on NCCL they do not queue behind the token all-to-alls on the EP
communicator. A gather is issued from a side stream (``side_streams``: a CUDA stream with events
and ``record_stream`` for the buffers that cross streams; on CPU every stream operation is a no-op
and the same code runs in issue order), so a prefetched gather overlaps the compute queued before
it. The gradient return is started asynchronously by the experts' backward and finished (added
into the fp32 ``main_grad``) by the backward of ``attach_shard_gradients``, which the layer applies
to its tokens before the token dispatch: the return overlaps the dispatch's backward all-to-all.

Burst copies. A micro-batch may add copies to its layout (``--microep-burst-slots``): a second
``ShardExchange`` over the burst slots (``first_slot``), built every micro-batch that has them (its
index copied without blocking), gathered on demand and passed to ``run_sharded_experts`` as
``burst``; its gradient return follows the layout's and ``finish_return`` adds both.

Host synchronisation. A ``ShardExchange`` copies its index tensors to the device once, when it is
built for a layout (in a forward); the gather, the return and both backward passes read no device
value on the host and copy nothing from host to device.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_microep.planning.placement import Placement, PlacementError
from megatron_microep.runtime.device import copy_to_device
from megatron_microep.runtime.layout import PhysicalLayout

logger = logging.getLogger(__name__)

MEMORY_POLICIES = ("keep", "regather")


class ShardSpec:
    """How one expert's tensors are cut into ``num_ranks`` shards; identical on every rank.

    ``shapes``: the expert's tensors in a fixed order (fc1 weight [F1, H], fc2 weight [H, F], then
    optionally fc1 bias [F1] and fc2 bias [H]); ``parts[i]`` is 2 for a gated tensor cut per half,
    else 1. Shard r holds, for each tensor i and half p, rows ``p*R_i + r*b_i .. p*R_i + (r+1)*b_i``
    (``R_i = rows_i / parts_i``, ``b_i = R_i / G``), flattened, concatenated in (tensor, half) order.
    """

    def __init__(
        self, shapes: Sequence[Sequence[int]], parts: Sequence[int], num_ranks: int, names: Sequence[str] | None = None
    ):
        self.shapes = tuple(torch.Size(s) for s in shapes)
        self.parts = tuple(int(p) for p in parts)
        self.num_ranks = int(num_ranks)
        self.names = tuple(names) if names is not None else tuple(f"tensor{i}" for i in range(len(self.shapes)))
        if len(self.parts) != len(self.shapes) or len(self.names) != len(self.shapes):
            raise ValueError("ShardSpec: shapes, parts and names must have the same length")
        if self.num_ranks < 1:
            raise ValueError(f"ShardSpec: num_ranks must be >= 1, got {self.num_ranks}")
        for name, shape, part in zip(self.names, self.shapes, self.parts):
            if len(shape) < 1 or shape[0] % (part * self.num_ranks):
                raise ValueError(
                    f"FSEP cannot cut expert tensor {name} of shape {list(shape)} into {self.num_ranks} row blocks"
                    f"{' per half' if part == 2 else ''}: its first dimension must be divisible by "
                    f"{part * self.num_ranks} (expert-parallel size {self.num_ranks})"
                )
        self.piece_numel = tuple(s.numel() // self.num_ranks for s in self.shapes)
        self.piece_offset = tuple(int(x) for x in np.cumsum((0,) + self.piece_numel)[:-1])
        self.shard_numel = int(sum(self.piece_numel))

    @property
    def expert_numel(self) -> int:
        return self.shard_numel * self.num_ranks

    def block_rows(self, i: int) -> int:
        """Rows of tensor ``i`` in one (half, shard) block."""
        return self.shapes[i][0] // (self.parts[i] * self.num_ranks)

    def _blocked(self, i: int, lead: tuple[int, ...]) -> tuple[int, ...]:
        rest = tuple(self.shapes[i][1:])
        return lead + (self.parts[i], self.num_ranks, self.block_rows(i)) + rest

    def to_shards(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """[..., G, S]: every shard of experts given as tensors [..., *shape_i] (shared leading dims)."""
        lead = tuple(tensors[0].shape[: tensors[0].dim() - len(self.shapes[0])])
        pieces = []
        for i, t in enumerate(tensors):
            blocked = t.reshape(self._blocked(i, lead)).transpose(len(lead), len(lead) + 1)  # [..., G, parts, b, ...]
            pieces.append(blocked.reshape(lead + (self.num_ranks, self.piece_numel[i])))
        return torch.cat(pieces, dim=-1)

    def from_shards(self, shards: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of ``to_shards``: [..., G, S] -> tensors [..., *shape_i] (differentiable copies)."""
        lead = tuple(shards.shape[:-2])
        out = []
        for i, shape in enumerate(self.shapes):
            piece = shards[..., self.piece_offset[i] : self.piece_offset[i] + self.piece_numel[i]]
            blocked = piece.reshape(lead + (self.num_ranks, self.parts[i], self.block_rows(i)) + tuple(shape[1:]))
            out.append(blocked.transpose(len(lead), len(lead) + 1).reshape(lead + tuple(shape)))
        return out

    def pieces(self, shard: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        """(tensor index, half, view [b_i, *rest]) of every piece of one shard [S] (views, not copies)."""
        out = []
        for i, shape in enumerate(self.shapes):
            per_part = self.piece_numel[i] // self.parts[i]
            for p in range(self.parts[i]):
                start = self.piece_offset[i] + p * per_part
                out.append((i, p, shard[start : start + per_part].view((self.block_rows(i),) + tuple(shape[1:]))))
        return out

    def _rank_major_view(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        """Tensor ``i``'s pieces of ``buffer`` [G, C, S] as a view [G, C, parts, b, *rest]."""
        G, C = buffer.shape[:2]
        piece = buffer.narrow(2, self.piece_offset[i], self.piece_numel[i])
        return piece.view((G, C, self.parts[i], self.block_rows(i)) + tuple(self.shapes[i][1:]))

    def from_rank_major(self, received: torch.Tensor) -> list[torch.Tensor]:
        """C full experts [C, *shape_i] from their shards as a gather receives them, ``received`` [G, C, S]
        (source rank major): one copy per tensor."""
        C = received.shape[1]
        out = []
        for i, shape in enumerate(self.shapes):
            blocked = self._rank_major_view(received, i)  # [G, C, parts, b, *rest]
            order = (1, 2, 0, 3) + tuple(range(4, blocked.dim()))  # -> [C, parts, G, b, *rest]
            out.append(blocked.permute(order).reshape((C,) + tuple(shape)))
        return out

    def into_rank_major(self, tensors: Sequence[torch.Tensor | None], out: torch.Tensor) -> torch.Tensor:
        """Inverse of ``from_rank_major``: write C experts' tensors [C, *shape_i] (None: zeros) into
        ``out`` [G, C, S] (destination rank major) and return it."""
        G, C = out.shape[:2]
        for i, t in enumerate(tensors):
            dst = self._rank_major_view(out, i)
            if t is None:
                dst.zero_()
                continue
            blocked = t.reshape((C, self.parts[i], G, self.block_rows(i)) + tuple(self.shapes[i][1:]))
            dst.copy_(blocked.permute((2, 0, 1, 3) + tuple(range(4, blocked.dim()))))
        return out


def fsep_layout(placement: Placement, slots_per_rank: int) -> PhysicalLayout:
    """The physical layout of an FSEP placement: rank g runs its copies in local slots ordered by expert.

    Any expert may sit on any rank (no home), at most ``slots_per_rank`` copies per rank. The
    returned ``PhysicalLayout`` carries ``experts_per_rank = ceil(E / G)`` and ``redundant_slots =
    slots_per_rank - experts_per_rank`` so that its ``local_slots`` is C; its local slot ``j`` of
    rank g is the j-th expert of g in ascending order, not a home expert. Raises PlacementError when
    a rank holds more than C copies or C cannot hold every expert.
    """
    E, G, C = placement.num_experts, placement.num_gpus, int(slots_per_rank)
    n = -(-E // G)
    if C < n:
        raise PlacementError(f"FSEP: {C} slots per rank cannot hold {E} experts on {G} ranks (need >= {n})")
    per_gpu = placement.slots_per_gpu()
    if per_gpu.max(initial=0) > C:
        g = int(per_gpu.argmax())
        raise PlacementError(f"FSEP: rank {g} holds {int(per_gpu[g])} copies, more than the {C} slots per rank")
    slot_expert = np.repeat(np.arange(E, dtype=np.int64), placement.replica_counts())
    order = np.lexsort((slot_expert, placement.gpus))  # by rank, then expert
    starts = np.concatenate(([0], np.cumsum(per_gpu)[:-1]))
    slot_local = np.empty(placement.num_slots, dtype=np.int64)
    slot_local[order] = np.arange(order.size) - starts[placement.gpus[order]]
    local_slot = np.full((G, C), -1, dtype=np.int64)
    local_slot[placement.gpus, slot_local] = np.arange(placement.num_slots)
    return PhysicalLayout(placement, n, C - n, slot_local, local_slot, slot_expert)


def initial_fsep_placement(num_experts: int, num_ranks: int, slots_per_rank: int) -> Placement:
    """Before any routing is seen: rank g holds Megatron's home block of g, then the next experts in
    cyclic order (those homed on the following ranks), so every expert has ``C*G/E`` copies give or take one."""
    E, G, C = num_experts, num_ranks, slots_per_rank
    n = -(-E // G)
    copies: list[list[int]] = [[] for _ in range(E)]
    for g in range(G):
        first = g * E // G
        for j in range(min(C, E)):
            copies[(first + j) % E].append(g)
    missing = [e for e in range(E) if not copies[e]]
    if missing or C < n:
        raise PlacementError(f"FSEP: {C} slots per rank cannot hold {E} experts on {G} ranks")
    return Placement.from_lists(copies, G)


# --- streams -----------------------------------------------------------------------------------
class HostOrder:
    """Side-stream operations on a device that runs work in issue order (the CPU): all no-ops."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def side(self):
        return contextlib.nullcontext()

    def side_waits_for_current(self) -> None:
        pass

    def keep_for_current(self, *tensors: torch.Tensor) -> None:
        pass


class CudaSideStream:
    """A CUDA side stream for FSEP's gathers.

    ``side_waits_for_current``: the side stream waits (an event) for the work queued so far on the
    current stream, e.g. the optimizer's update of the shards. ``keep_for_current``: tensors
    allocated on the side stream that the current stream uses are recorded on it, so the caching
    allocator does not hand their memory to the side stream again before the current stream is done.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def side(self):
        return torch.cuda.stream(self.stream)

    def side_waits_for_current(self) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(event)

    def keep_for_current(self, *tensors: torch.Tensor) -> None:
        current = torch.cuda.current_stream(self.device)
        for tensor in tensors:
            tensor.record_stream(current)


SIDE_STREAM_TYPES = {"cuda": CudaSideStream}  # device type -> side stream; others run in issue order
_SIDE_STREAMS: dict[torch.device, HostOrder | CudaSideStream] = {}


def side_streams(device: torch.device) -> HostOrder | CudaSideStream:
    """The side stream of ``device`` (one per device, created on first use)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = SIDE_STREAM_TYPES.get(device.type, HostOrder)(device)
    return _SIDE_STREAMS[device]


# --- process group -----------------------------------------------------------------------------
_SHARD_GROUPS: dict[object, object] = {}


def shard_group(ep_group):
    """The process group FSEP's gathers and gradient returns use: the ranks of ``ep_group`` in a
    communicator of their own, created once per EP group on first use.

    Only the EP group's ranks take part in creating it (``use_local_synchronization``), and they
    reach their first FSEP use at the same point (they hold the same layers), so no rank outside
    the group has to call anything. Where torch would create it by splitting an eagerly
    initialised default NCCL communicator (``init_process_group(device_id=...)``), which every rank
    of the world must join, FSEP uses the EP group itself and says so: gathers then queue behind
    the token all-to-alls."""
    if ep_group not in _SHARD_GROUPS:
        if getattr(dist.group.WORLD, "bound_device_id", None) is not None:
            logger.warning(
                "FSEP: the default process group is bound to a device, so a group of the EP ranks alone "
                "cannot be created; shard gathers use the EP group and queue behind the token all-to-alls"
            )
            _SHARD_GROUPS[ep_group] = ep_group
        else:
            _SHARD_GROUPS[ep_group] = dist.new_group(
                dist.get_process_group_ranks(ep_group),
                backend=dist.get_backend(ep_group),
                use_local_synchronization=True,
                group_desc="MICROEP_FSEP_SHARDS",
            )
    return _SHARD_GROUPS[ep_group]


def communicates_on(group, device: torch.device) -> bool:
    """Whether ``group``'s backend runs collectives on tensors of ``device``'s type."""
    config = str(dist.get_backend_config(group))  # e.g. "cpu:gloo,cuda:nccl"
    return device.type in {entry.split(":")[0] for entry in config.split(",")}


# --- gathered memory ---------------------------------------------------------------------------
@dataclass
class GatheredMemory:
    """Bytes of gathered experts alive in this process, and the peak since ``reset_peak``.

    Tracks storages (the receive buffer from the start of a gather, the assembled expert tensors)
    until torch frees them, whoever holds the last reference (a view, autograd's saved tensors):
    a measurement, not a model.
    """

    live: int = 0
    peak: int = 0

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, nbytes)
        return tensor

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.live


# --- exchange ----------------------------------------------------------------------------------
class PendingGather:
    """A started gather; ``wait()`` (once) returns this rank's copies as shards [G, C, S], source rank major."""

    def __init__(self, send, recv, work, shape: tuple[int, int, int], streams):
        self._send, self._recv, self._work, self._shape, self._streams = send, recv, work, shape, streams

    def wait(self) -> torch.Tensor:
        if self._recv is None:
            raise RuntimeError("FSEP: a gather was waited for twice")
        self._work.wait()  # on CUDA: the current stream waits for the collective
        self._streams.keep_for_current(self._send, self._recv)
        recv, self._send, self._recv, self._work = self._recv, None, None, None
        return recv.view(self._shape)


class PendingReturn:
    """A started gradient return; ``wait()`` (once) returns the received rows [K, S] (source rank major)."""

    def __init__(self, send, recv, work):
        self._send, self._recv, self._work = send, recv, work

    def wait(self) -> torch.Tensor:
        if self._recv is None:
            raise RuntimeError("FSEP: a gradient return was waited for twice")
        self._work.wait()
        recv, self._send, self._recv, self._work = self._recv, None, None, None
        return recv


class ShardExchange:
    """Who sends which shard where for one layout, seen from one EP rank.

    ``layout``: an ``fsep_layout``; ``group``: ``shard_group`` of the EP group (rank r of it is EP
    rank r); ``device``: where the shards live. Gather: rank r sends, to every rank g in order, its
    shard of each expert in g's local slots (slot order); it receives shard g of each of its own
    copies from every rank g. Gradient return is the reverse all-to-all; the copies of one expert
    sit on distinct ranks, so adding the rows received from source rank g = 0, 1, ... in turn adds
    each expert's contributions in ascending source-rank order with no two updates of one row at
    once. The index tensors go to the device here, once per layout.

    ``first_slot``: the exchange moves the copies in local slots ``first_slot..`` only (a burst
    exchange: the burst slots of a layout ``with_burst``, gathered on demand beside the layout's own
    prefetched exchange). ``non_blocking_index``: copy the index through ``runtime.device``
    (pinned, queued without waiting: for an exchange built every micro-batch).
    """

    def __init__(
        self,
        layout: PhysicalLayout,
        ep_rank: int,
        group,
        spec: ShardSpec,
        device: torch.device,
        streams: HostOrder | CudaSideStream | None = None,
        memory: GatheredMemory | None = None,
        first_slot: int = 0,
        non_blocking_index: bool = False,
    ):
        G = layout.num_ranks
        if spec.num_ranks != G:
            raise ValueError(f"shard spec cuts experts into {spec.num_ranks} shards, the layout has {G} ranks")
        self.layout, self.ep_rank, self.group, self.spec = layout, ep_rank, group, spec
        self.streams = streams if streams is not None else side_streams(device)
        self.memory = memory
        slots = layout.local_slot[:, first_slot:]  # [G, C]
        present = slots >= 0
        experts = np.where(present, layout.slot_expert[np.maximum(slots, 0)], -1)
        self.counts = present.sum(axis=1).astype(np.int64)  # copies per rank
        self.send_experts = experts[present]  # [K]: (destination rank, slot) order
        self.my_experts = experts[ep_rank][present[ep_rank]]  # [C]
        self._bounds = np.concatenate(([0], np.cumsum(self.counts))).tolist()  # rows per rank in send order
        S, C = spec.shard_numel, int(self.counts[ep_rank])
        self._by_rank = (self.counts * S).tolist()  # elements to (gather) / from (return) each rank
        self._mine = [C * S] * G
        if non_blocking_index:
            self._send_index = copy_to_device(self.send_experts.astype(np.int64), device)
        else:
            self._send_index = torch.as_tensor(self.send_experts, device=device)  # the one host-to-device copy

    @property
    def num_local(self) -> int:
        return int(self.counts[self.ep_rank])

    def start_gather(self, shards: torch.Tensor) -> PendingGather:
        """Start the all-to-all building this rank's copies from ``shards`` [E, S] (no autograd),
        from the side stream, after the work queued so far on the current stream."""
        G, C, S = self.spec.num_ranks, self.num_local, self.spec.shard_numel
        self.streams.side_waits_for_current()
        with torch.no_grad(), self.streams.side():
            send = shards.detach().index_select(0, self._send_index)
            recv = shards.new_empty(G * C * S)
            if self.memory is not None:
                self.memory.track(recv)
            work = dist.all_to_all_single(
                recv, send.view(-1), self._mine, self._by_rank, group=self.group, async_op=True
            )
        return PendingGather(send, recv, work, (G, C, S), self.streams)

    def assemble(self, received: torch.Tensor) -> list[torch.Tensor]:
        """This rank's copies as expert tensors [C, *shape_i] from a gather's ``received`` [G, C, S]."""
        tensors = self.spec.from_rank_major(received)
        return tensors if self.memory is None else [self.memory.track(t) for t in tensors]

    def start_return(self, grads: Sequence[torch.Tensor | None], dtype: torch.dtype) -> PendingReturn:
        """Start sending the copies' gradients ``grads`` ([C, *shape_i] each, None: zero) back as
        shards in ``dtype`` (the copies' dtype); asynchronous, from the current stream."""
        G, C, S = self.spec.num_ranks, self.num_local, self.spec.shard_numel
        device = self._send_index.device
        with torch.no_grad():
            send = self.spec.into_rank_major(grads, torch.empty((G, C, S), dtype=dtype, device=device))
            recv = torch.empty((int(self.counts.sum()), S), dtype=dtype, device=device)
            work = dist.all_to_all_single(
                recv.view(-1), send.view(-1), self._by_rank, self._mine, group=self.group, async_op=True
            )
        return PendingReturn(send, recv, work)

    def finish_return(
        self, pending: PendingReturn, shards: torch.Tensor, more: Sequence[tuple[ShardExchange, PendingReturn]] = ()
    ) -> torch.Tensor:
        """Wait for ``pending`` and add the received rows to the shards' gradient; then the same for
        each (exchange, return) of ``more`` (the micro-batch's burst copies), in that order.

        Under Megatron's DDP (``main_grad`` present), add them to ``main_grad`` directly, in its dtype
        (fp32), one source rank's rows at a time (at most C rows converted at once), and return the
        placeholder DDP's hook skips (``grad_added_to_main_grad``), as Megatron's fused
        weight-gradient path does. Otherwise return the summed gradient (accumulated in fp32, or in
        the rows' dtype if wider)."""
        returns = [(self, pending), *more]
        main = getattr(shards, "main_grad", None)
        with torch.no_grad():
            if main is not None and hasattr(shards, "grad_added_to_main_grad"):
                for exchange, started in returns:
                    exchange._accumulate(started.wait(), main.view(shards.shape))
                shards.grad_added_to_main_grad = True
                return (
                    torch.zeros_like(shards) if getattr(shards, "zero_out_wgrad", False) else torch.empty_like(shards)
                )
            total = None
            for exchange, started in returns:
                rows = started.wait()
                if total is None:
                    wide = torch.promote_types(rows.dtype, torch.float32)
                    total = torch.zeros(shards.shape, dtype=wide, device=rows.device)
                exchange._accumulate(rows, total)
            return total.to(shards.dtype)

    def _accumulate(self, rows: torch.Tensor, into: torch.Tensor) -> None:
        bounds = self._bounds
        for g in range(self.spec.num_ranks):
            a, b = bounds[g], bounds[g + 1]
            if a < b:  # rows of source rank g: my shard of each of its copies, one per expert
                into.index_add_(0, self._send_index[a:b], rows[a:b].to(into.dtype))


def fsep_buffer_bytes(layout: PhysicalLayout, rank: int, spec: ShardSpec, element_size: int, main_grad_size: int = 4):
    """Bytes of every buffer FSEP allocates for one layer and micro-batch on ``rank`` (``ShardExchange``
    and the autograd functions below), and the peaks they make; ``element_size``: the shards' dtype,
    ``main_grad_size``: DDP's main gradient dtype. Shard bytes X/G per expert of X bytes; K = copies
    in the layout, C = this rank's.

    - ``gather_send`` K shards, ``gather_recv`` C*G shards (= C experts), ``copies`` C experts;
    - ``return_send`` C experts, ``return_recv`` K shards, ``return_chunk`` the rows of one source
      rank converted to the main gradient's dtype (none when the dtypes agree), ``dummy_grad`` the
      placeholder gradient [E, S] handed to autograd (Megatron's convention, freed by DDP's hook);
    - ``forward_peak``: the larger of send + receive during the all-to-all and receive + copies while
      assembling; ``kept``: copies alive until the backward (``keep``; 0 under ``regather``);
    - ``backward_peak`` (``keep``): send + receive of the return, receive + one converted chunk, the
      placeholder; under ``regather`` the backward first gathers again (``forward_peak``).
    The copies' weight gradients from the expert GEMMs' backward (C experts) are the experts' own.
    """
    S, G = spec.shard_numel, spec.num_ranks
    present = layout.local_slot >= 0
    counts = present.sum(axis=1)
    K, C, E = int(counts.sum()), int(counts[rank]), layout.placement.num_experts
    shard = S * element_size
    out = {
        "gather_send": K * shard,
        "gather_recv": C * G * shard,
        "copies": C * G * shard,
        "return_send": C * G * shard,
        "return_recv": K * shard,
        "return_chunk": 0 if element_size == main_grad_size else int(counts.max()) * S * main_grad_size,
        "dummy_grad": E * shard,
    }
    out["forward_peak"] = max(out["gather_send"] + out["gather_recv"], out["gather_recv"] + out["copies"])
    out["backward_peak"] = max(
        out["return_send"] + out["return_recv"], out["return_recv"] + out["return_chunk"], out["dummy_grad"]
    )
    return out


# --- autograd ----------------------------------------------------------------------------------
class ShardGradients:
    """One layer's micro-batch: the gradient returns the experts' backward starts (the layout's
    copies, then any burst copies) and the backward of ``attach_shard_gradients`` finishes."""

    def __init__(self) -> None:
        self.attached = False
        self.returns: list[tuple[ShardExchange, PendingReturn]] = []

    def start(self, exchange: ShardExchange, pending: PendingReturn) -> None:
        if not self.attached:
            raise RuntimeError("FSEP: the experts' gradients were returned but no attach_shard_gradients will add them")
        self.returns.append((exchange, pending))


class _FinishReturn(torch.autograd.Function):
    """tokens, shards -> tokens; backward: the shards' gradient from the returns started by the
    experts' backward (which runs first: these tokens reach the experts only through the dispatch)."""

    @staticmethod
    def forward(ctx, tokens, shards, grads: ShardGradients):
        ctx.shards, ctx.grads = shards, grads
        return tokens.view_as(tokens)

    @staticmethod
    def backward(ctx, grad_tokens):
        grads = ctx.grads
        if not grads.returns:
            raise RuntimeError("FSEP: the experts' backward did not start the gradient return")
        (exchange, pending), *more = grads.returns
        grads.returns = []
        grad_shards = exchange.finish_return(pending, ctx.shards, more)
        return grad_tokens, grad_shards, None


def attach_shard_gradients(tokens: torch.Tensor, shards: torch.Tensor, grads: ShardGradients) -> torch.Tensor:
    """``tokens`` (before the token dispatch), through a node whose backward adds the shards'
    gradient returned for ``grads``: after the dispatch's backward, so the return overlaps it."""
    grads.attached = torch.is_grad_enabled() and shards.requires_grad
    return _FinishReturn.apply(tokens, shards, grads)


def _grad_or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return grad if grad is not None else torch.zeros_like(like)


def _assemble(exchanges: Sequence[ShardExchange], pendings: Sequence[PendingGather]) -> list[torch.Tensor]:
    """Every exchange's copies' tensors in turn (``ShardSpec`` order, [C_x, *shape_i] each)."""
    return [t for exchange, pending in zip(exchanges, pendings) for t in exchange.assemble(pending.wait())]


def _start_returns(exchanges, grad_copies, dtype: torch.dtype, grads: ShardGradients) -> None:
    """Start each exchange's gradient return (in exchange order) from its slice of ``grad_copies``."""
    per = len(exchanges[0].spec.shapes)
    for x, exchange in enumerate(exchanges):
        grads.start(exchange, exchange.start_return(grad_copies[x * per : (x + 1) * per], dtype))


class _GatherKeep(torch.autograd.Function):
    """tokens -> (tokens, the copies' tensors of every exchange); backward starts their gradient returns.

    The tokens pass through so that this node's backward (collectives) runs at the same point of
    every rank's backward: after the expert GEMMs' backward, before the token all-to-all's.
    """

    @staticmethod
    def forward(ctx, tokens, exchanges, pendings, grads: ShardGradients):
        ctx.exchanges, ctx.grads = exchanges, grads
        copies = _assemble(exchanges, pendings)
        ctx.dtype = copies[0].dtype
        return (tokens.view_as(tokens), *copies)

    @staticmethod
    def backward(ctx, grad_tokens, *grad_copies):
        _start_returns(ctx.exchanges, grad_copies, ctx.dtype, ctx.grads)
        return grad_tokens, None, None, None


ExpertsRun = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], torch.Tensor]


class _GatherRegather(torch.autograd.Function):
    """tokens, probs -> expert output; nothing of the experts kept for the backward.

    Backward: gather again (the layout's copies from ``regather()`` if it started their gather, the
    burst copies on demand), recompute the expert forward with gradients, back-propagate
    ``grad_out`` through it, start the copies' gradient returns.
    """

    @staticmethod
    def forward(
        ctx,
        tokens,
        probs,
        shards,
        exchanges,
        pendings,
        run: ExpertsRun,
        regather: Callable[[], PendingGather | None],
        grads: ShardGradients,
    ):
        ctx.exchanges, ctx.shards, ctx.run, ctx.regather, ctx.grads = exchanges, shards, run, regather, grads
        ctx.save_for_backward(tokens, probs)
        with torch.no_grad():
            return run(tokens, probs, _assemble(exchanges, pendings))

    @staticmethod
    def backward(ctx, grad_out):
        tokens, probs = ctx.saved_tensors
        exchanges = ctx.exchanges
        pendings = [ctx.regather() or exchanges[0].start_gather(ctx.shards)]
        pendings += [exchange.start_gather(ctx.shards) for exchange in exchanges[1:]]
        with torch.enable_grad():
            x = tokens.detach().requires_grad_(tokens.requires_grad)
            p = probs.detach().requires_grad_(probs.requires_grad)
            copies = [t.requires_grad_(True) for t in _assemble(exchanges, pendings)]
            out = ctx.run(x, p, copies)
            inputs = [t for t in (x, p, *copies) if t.requires_grad]
            by_id = dict(zip(map(id, inputs), torch.autograd.grad(out, inputs, grad_out, allow_unused=True)))
        grad_copies, dtype = [by_id.get(id(c)) for c in copies], copies[0].dtype
        del out, copies, inputs  # free the recomputed experts before the return's buffers
        _start_returns(exchanges, grad_copies, dtype, ctx.grads)
        grad_x = _grad_or_zeros(by_id.get(id(x)), x) if tokens.requires_grad else None
        return grad_x, by_id.get(id(p)), None, None, None, None, None, None


def run_sharded_experts(
    policy: str,
    tokens: torch.Tensor,
    probs: torch.Tensor,
    shards: torch.Tensor,
    exchange: ShardExchange,
    run: ExpertsRun,
    grads: ShardGradients,
    pending: PendingGather | None = None,
    regather: Callable[[], PendingGather | None] = lambda: None,
    burst: tuple[ShardExchange, PendingGather] | None = None,
) -> torch.Tensor:
    """Expert output [N, H] of this rank's copies under memory ``policy`` (``MEMORY_POLICIES``).

    ``run(tokens, probs, tensors)`` computes the experts from the copies' tensors (each
    [C, *shape_i], ``ShardSpec`` order; with ``burst``, the burst copies' tensors follow, [B,
    *shape_i] each); ``grads``: the ``ShardGradients`` that ``attach_shard_gradients`` put on these
    tokens before their dispatch (the shards' gradient arrives there); ``pending``: this layer's
    gather if already started; ``regather()``: under ``regather``, a started gather for the
    backward, or None to gather there; ``burst``: the micro-batch's burst copies (their exchange
    and started gather): gathered again in the backward under ``regather``, their gradients returned
    after the layout's. Call on every rank of the EP group (it runs collectives in forward and backward).
    """
    if policy not in MEMORY_POLICIES:
        raise ValueError(f"unknown FSEP memory policy {policy!r}; choose from {', '.join(MEMORY_POLICIES)}")
    if torch.is_grad_enabled() and shards.requires_grad and not grads.attached:
        raise RuntimeError("FSEP: attach_shard_gradients was not applied to these tokens before their dispatch")
    pending = pending if pending is not None else exchange.start_gather(shards)
    exchanges, pendings = (exchange,), (pending,)
    if burst is not None:
        exchanges, pendings = (exchange, burst[0]), (pending, burst[1])
    if policy == "keep":
        tokens, *copies = _GatherKeep.apply(tokens, exchanges, pendings, grads)
        return run(tokens, probs, copies)
    return _GatherRegather.apply(tokens, probs, shards.detach(), exchanges, pendings, run, regather, grads)


# --- building and inspecting shards ------------------------------------------------------------
def shards_from_experts(stacked: Sequence[torch.Tensor], spec: ShardSpec, group) -> torch.Tensor:
    """Every rank's shard buffer [E, S] from the full experts each rank holds under Megatron's
    contiguous EP layout (``stacked[i]``: tensor i of this rank's n experts, [n, *shape_i], global
    experts ``rank * n ..``): one all-to-all over ``group`` (its rank r is EP rank r)."""
    G, S = spec.num_ranks, spec.shard_numel
    n = stacked[0].shape[0]
    with torch.no_grad():
        pieces = spec.to_shards([t.detach() for t in stacked])  # [n, G, S]
        send = pieces.transpose(0, 1).contiguous()  # [G, n, S]: shard g of my experts goes to rank g
        recv = send.new_empty(G * n * S)
        dist.all_to_all_single(recv, send.view(-1), [n * S] * G, [n * S] * G, group=group)
    return recv.view(G * n, S)


def experts_from_shards(shards: torch.Tensor, spec: ShardSpec, group) -> list[torch.Tensor]:
    """All experts' full tensors [E, *shape_i] from every rank's shards (an all-gather; for tests,
    checkpoint conversion and inspection, not the training path)."""
    G = spec.num_ranks
    with torch.no_grad():
        everyone = [torch.empty_like(shards) for _ in range(G)]
        dist.all_gather(everyone, shards.detach().contiguous(), group=group)
        return spec.from_shards(torch.stack(everyone, dim=1))  # [E, G, S]


def reference_gather(all_shards: torch.Tensor, layout: PhysicalLayout, rank: int) -> torch.Tensor:
    """Slow exact reference of a gather: rank's copies [C, G, S] from every rank's shards
    ``all_shards`` [G, E, S] (indexing only, no collective)."""
    slots = layout.local_slot[rank]
    experts = [int(layout.slot_expert[s]) for s in slots if s >= 0]
    return torch.stack([all_shards[:, e, :] for e in experts])


def reference_return(all_grads: Sequence[torch.Tensor], layout: PhysicalLayout, num_experts: int) -> torch.Tensor:
    """Slow exact reference of the gradient return on every rank at once: [G, E, S] in float64 from
    each rank's copy gradients ``all_grads[g]`` [C_g, G, S] (as ``ShardSpec.to_shards`` cuts them)."""
    G = layout.num_ranks
    S = all_grads[0].shape[-1]
    out = torch.zeros(G, num_experts, S, dtype=torch.float64)
    for g in range(G):
        experts = [int(layout.slot_expert[s]) for s in layout.local_slot[g] if s >= 0]
        for j, e in enumerate(experts):
            for r in range(G):
                out[r, e] += all_grads[g][j, r].double()
    return out
