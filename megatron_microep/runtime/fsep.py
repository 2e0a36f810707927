"""FSEP (fully sharded expert parallel, after LAER-MoE): experts stored as shards, gathered per layout.

Every EP rank stores a 1/G shard of every expert of a layer in one contiguous buffer ``[E, S]``
(``ShardSpec``); gradients and optimizer state live on the same shards. A layout (a placement
with C slots per rank, any expert anywhere, at most one copy of an expert per rank) says which
full experts each rank runs in a micro-batch. Before the expert GEMM, one all-to-all of shards
builds this rank's C experts (``ShardExchange.gather``); after the backward GEMMs, the reverse
all-to-all sends each copy's gradient back as shards and every rank sums, per expert, the
contributions of all copies in a fixed order (source rank ascending). A new layout changes only
which shards are sent where: no parameter, gradient or optimizer state moves.

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

Gathers may be started early (``ShardExchange.start_gather``, an asynchronous all-to-all where the
backend runs one: NCCL on its stream, gloo on its worker thread) so the next layer's gather overlaps
the current layer's compute. ``TrafficCounter`` counts every byte this rank sends and receives, and
``GatheredMemory`` the bytes of gathered experts alive, with their peak.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_microep.planning.placement import Placement, PlacementError
from megatron_microep.runtime.layout import PhysicalLayout

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


@dataclass
class TrafficCounter:
    """Bytes this rank sent to and received from other ranks (its own shards are not counted)."""

    gathers: int = 0
    gather_sent: int = 0
    gather_received: int = 0
    grad_returns: int = 0
    grad_sent: int = 0
    grad_received: int = 0

    def total_sent(self) -> int:
        return self.gather_sent + self.grad_sent

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class GatheredMemory:
    """Bytes of gathered experts alive in this process, and the peak since ``reset_peak``.

    Tracks storages (the receive buffer from the start of a gather, the received shards in slot
    order, the assembled expert tensors) until torch frees them,
    whoever holds the last reference (a view, autograd's saved tensors): a measurement, not a model.
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


class PendingGather:
    """A started gather: ``wait()`` returns this rank's experts as shards [C, G, S]."""

    def __init__(self, recv: torch.Tensor, work, count: int, spec: ShardSpec, memory: GatheredMemory | None):
        self._recv, self._work, self._count, self._spec, self._memory = recv, work, count, spec, memory

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        G, S = self._spec.num_ranks, self._spec.shard_numel
        # Received (source rank, slot) -> (slot, source rank): shard r of each copy in rank order.
        gathered = self._recv.view(G, self._count, S).transpose(0, 1).contiguous()
        self._recv = None
        return gathered if self._memory is None else self._memory.track(gathered)


class ShardExchange:
    """Who sends which shard where for one layout, seen from one EP rank.

    ``layout``: an ``fsep_layout``. Gather: rank r sends, to every rank g in order, its shard of each
    expert in g's local slots (slot order); it receives shard g of each of its own copies from every
    rank g. Gradient return is the reverse all-to-all; the copies of one expert sit on distinct
    ranks, so summing "the k-th returned copy of every expert" for k = 0, 1, ... adds each expert's
    contributions in ascending source-rank order with no two updates of one row at once.
    """

    def __init__(
        self,
        layout: PhysicalLayout,
        ep_rank: int,
        group,
        spec: ShardSpec,
        traffic: TrafficCounter | None = None,
        memory: GatheredMemory | None = None,
    ):
        G = layout.num_ranks
        if spec.num_ranks != G:
            raise ValueError(f"shard spec cuts experts into {spec.num_ranks} shards, the layout has {G} ranks")
        self.layout, self.ep_rank, self.group, self.spec = layout, ep_rank, group, spec
        self.traffic = traffic if traffic is not None else TrafficCounter()
        self.memory = memory
        slots = layout.local_slot  # [G, C]
        present = slots >= 0
        experts = np.where(present, layout.slot_expert[np.maximum(slots, 0)], -1)
        self.counts = present.sum(axis=1).astype(np.int64)  # copies per rank
        self.send_experts = experts[present]  # [K]: (destination rank, slot) order
        self.my_experts = experts[ep_rank][present[ep_rank]]  # [C_me]
        self._send_index = torch.from_numpy(self.send_experts)
        # Rounds of the gradient sum: rows of the k-th occurrence of each expert in send order.
        occurrence = np.zeros(self.send_experts.size, dtype=np.int64)
        seen: dict[int, int] = {}
        for row, e in enumerate(self.send_experts.tolist()):
            occurrence[row] = seen.get(e, 0)
            seen[e] = occurrence[row] + 1
        self._rounds = [
            (torch.from_numpy(self.send_experts[occurrence == k]), torch.from_numpy(np.flatnonzero(occurrence == k)))
            for k in range(int(occurrence.max(initial=-1)) + 1)
        ]

    @property
    def num_local(self) -> int:
        return int(self.counts[self.ep_rank])

    def bytes_per_gather(self, element_size: int) -> tuple[int, int]:
        """(sent, received) bytes of one gather from this rank's point of view (own shards excluded)."""
        S, me = self.spec.shard_numel, self.ep_rank
        sent = int(self.counts.sum() - self.counts[me]) * S * element_size
        received = int(self.counts[me]) * (self.spec.num_ranks - 1) * S * element_size
        return sent, received

    def start_gather(self, shards: torch.Tensor) -> PendingGather:
        """Start the all-to-all building this rank's copies from ``shards`` [E, S] (no autograd)."""
        S, G = self.spec.shard_numel, self.spec.num_ranks
        with torch.no_grad():
            send = shards.detach().index_select(0, self._send_index.to(shards.device))
            recv = shards.new_empty(G * self.num_local * S)
            if self.memory is not None:
                self.memory.track(recv)
            work = dist.all_to_all_single(
                recv,
                send.reshape(-1),
                [self.num_local * S] * G,
                (self.counts * S).tolist(),
                group=self.group,
                async_op=True,
            )
        sent, received = self.bytes_per_gather(shards.element_size())
        self.traffic.gathers += 1
        self.traffic.gather_sent += sent
        self.traffic.gather_received += received
        return PendingGather(recv, work, self.num_local, self.spec, self.memory)

    def gather(self, shards: torch.Tensor) -> torch.Tensor:
        return self.start_gather(shards).wait()

    def assemble(self, gathered: torch.Tensor) -> list[torch.Tensor]:
        """This rank's copies as expert tensors [C, *shape_i] from their shards [C, G, S] (differentiable)."""
        tensors = self.spec.from_shards(gathered)
        return tensors if self.memory is None else [self.memory.track(t) for t in tensors]

    def return_grads(self, grad: torch.Tensor, accumulate_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Gradient of every local shard [E, S] from this rank's copies' gradient ``grad`` [C, G, S]: sent
        back as shards (in ``grad``'s dtype), summed per expert in source-rank order in
        ``accumulate_dtype`` (default: fp32, or ``grad``'s dtype if wider)."""
        accumulate_dtype = accumulate_dtype or torch.promote_types(grad.dtype, torch.float32)
        S, G = self.spec.shard_numel, self.spec.num_ranks
        E = self.layout.placement.num_experts
        with torch.no_grad():
            send = grad.detach().transpose(0, 1).contiguous()  # [G, C, S]: shard r of each copy goes to rank r
            recv = grad.new_empty(int(self.counts.sum()) * S)
            dist.all_to_all_single(
                recv, send.reshape(-1), (self.counts * S).tolist(), [self.num_local * S] * G, group=self.group
            )
            rows = recv.view(-1, S).to(accumulate_dtype)
            total = rows.new_zeros(E, S)
            for experts, index in self._rounds:
                total.index_add_(0, experts.to(total.device), rows.index_select(0, index.to(rows.device)))
        # Sent: my copies' shards for other ranks; received: other ranks' copies of my shards.
        self.traffic.grad_returns += 1
        self.traffic.grad_sent += int(self.counts[self.ep_rank]) * (G - 1) * S * grad.element_size()
        self.traffic.grad_received += int(self.counts.sum() - self.counts[self.ep_rank]) * S * grad.element_size()
        return total


def reference_gather(all_shards: torch.Tensor, layout: PhysicalLayout, rank: int) -> torch.Tensor:
    """Slow exact reference of ``ShardExchange.gather``: rank's copies [C, G, S] from every rank's
    shards ``all_shards`` [G, E, S] (indexing only, no collective)."""
    slots = layout.local_slot[rank]
    experts = [int(layout.slot_expert[s]) for s in slots if s >= 0]
    return torch.stack([all_shards[:, e, :] for e in experts])


def reference_return(all_grads: Sequence[torch.Tensor], layout: PhysicalLayout, num_experts: int) -> torch.Tensor:
    """Slow exact reference of ``ShardExchange.return_grads`` on every rank at once: [G, E, S] in
    float64 from each rank's copy gradients ``all_grads[g]`` [C_g, G, S]."""
    G = layout.num_ranks
    S = all_grads[0].shape[-1]
    out = torch.zeros(G, num_experts, S, dtype=torch.float64)
    for g in range(G):
        experts = [int(layout.slot_expert[s]) for s in layout.local_slot[g] if s >= 0]
        for j, e in enumerate(experts):
            for r in range(G):
                out[r, e] += all_grads[g][j, r].double()
    return out


def _fused_shard_grad(shards: torch.Tensor, total: torch.Tensor) -> torch.Tensor | None:
    """Hand ``total`` (fp32 [E, S]) to the shards' gradient.

    Under Megatron's DDP (``main_grad`` buffer present), add it to the fp32 main gradient directly
    and return a placeholder that DDP's hook skips (``grad_added_to_main_grad``), as Megatron's own
    fused weight-gradient path does: no rounding to the parameter dtype on the way. Otherwise return
    it as the parameter's gradient.
    """
    if getattr(shards, "main_grad", None) is not None and hasattr(shards, "grad_added_to_main_grad"):
        shards.main_grad.add_(total.view_as(shards.main_grad))
        shards.grad_added_to_main_grad = True
        return torch.empty_like(shards)
    return total.to(shards.dtype).view_as(shards)


class _GatherKeep(torch.autograd.Function):
    """tokens, shards -> (tokens, this rank's copies [C, G, S]); backward returns the copies' gradients.

    The tokens pass through so that this node's backward (a collective) runs at the same point of
    every rank's backward: after the expert GEMMs' backward, before the token all-to-all's.
    """

    @staticmethod
    def forward(ctx, tokens, shards, exchange: ShardExchange, pending: PendingGather | None):
        ctx.exchange = exchange
        ctx.shards = shards
        gathered = pending.wait() if pending is not None else exchange.gather(shards)
        return tokens.view_as(tokens), gathered

    @staticmethod
    def backward(ctx, grad_tokens, grad_gathered):
        if grad_gathered is None:  # no expert output reached the loss; still a collective on every rank
            grad_gathered = torch.zeros(
                (ctx.exchange.num_local, ctx.exchange.spec.num_ranks, ctx.exchange.spec.shard_numel),
                dtype=ctx.shards.dtype,
                device=ctx.shards.device,
            )
        total = ctx.exchange.return_grads(grad_gathered)
        return grad_tokens, _fused_shard_grad(ctx.shards, total), None, None


ExpertsRun = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], torch.Tensor]


class _GatherRegather(torch.autograd.Function):
    """tokens, probs, shards -> expert output; nothing of the experts kept for the backward.

    Backward: gather again (or take a prefetched gather), recompute the expert forward with
    gradients, back-propagate ``grad_out`` through it, return the copies' gradients as shards.
    """

    @staticmethod
    def forward(
        ctx,
        tokens,
        probs,
        shards,
        exchange: ShardExchange,
        pending: PendingGather | None,
        run: ExpertsRun,
        regather: Callable[[], PendingGather | None],
    ):
        ctx.exchange, ctx.shards, ctx.run, ctx.regather = exchange, shards, run, regather
        ctx.save_for_backward(tokens, probs)
        gathered = pending.wait() if pending is not None else exchange.gather(shards)
        with torch.no_grad():
            return run(tokens, probs, exchange.assemble(gathered))

    @staticmethod
    def backward(ctx, grad_out):
        tokens, probs = ctx.saved_tensors
        pending = ctx.regather()
        gathered = pending.wait() if pending is not None else ctx.exchange.gather(ctx.shards)
        with torch.enable_grad():
            x = tokens.detach().requires_grad_(tokens.requires_grad)
            p = probs.detach().requires_grad_(probs.requires_grad)
            weights = gathered.requires_grad_(True)
            out = ctx.run(x, p, ctx.exchange.assemble(weights))
            inputs = [t for t in (x, p, weights) if t.requires_grad]
            grads = dict(zip(map(id, inputs), torch.autograd.grad(out, inputs, grad_out, allow_unused=True)))
        grad_weights = grads.get(id(weights))
        if grad_weights is None:
            grad_weights = torch.zeros_like(weights)
        total = ctx.exchange.return_grads(grad_weights)
        return (grads.get(id(x)), grads.get(id(p)), _fused_shard_grad(ctx.shards, total), None, None, None, None)


def run_sharded_experts(
    policy: str,
    tokens: torch.Tensor,
    probs: torch.Tensor,
    shards: torch.Tensor,
    exchange: ShardExchange,
    run: ExpertsRun,
    pending: PendingGather | None = None,
    regather: Callable[[], PendingGather | None] = lambda: None,
) -> torch.Tensor:
    """Expert output [N, H] of this rank's copies under memory ``policy`` (``MEMORY_POLICIES``).

    ``run(tokens, probs, tensors)`` computes the experts from the copies' tensors (each
    [C, *shape_i], ``ShardSpec`` order); ``pending``: this layer's gather if already started;
    ``regather()``: under ``regather``, a started gather for the backward, or None to gather there.
    Call on every rank of the EP group (it runs collectives in forward and backward).
    """
    if policy == "keep":
        tokens, gathered = _GatherKeep.apply(tokens, shards, exchange, pending)
        return run(tokens, probs, exchange.assemble(gathered))
    if policy == "regather":
        return _GatherRegather.apply(tokens, probs, shards, exchange, pending, run, regather)
    raise ValueError(f"unknown FSEP memory policy {policy!r}; choose from {', '.join(MEMORY_POLICIES)}")


def shards_from_experts(local: Sequence[Sequence[torch.Tensor]], spec: ShardSpec, ep_rank: int, group) -> torch.Tensor:
    """Every rank's shard buffer [E, S] from the full experts each rank holds under Megatron's
    contiguous EP layout (``local[i]``: tensors of global expert ``ep_rank * n + i``): one all-to-all."""
    G, S = spec.num_ranks, spec.shard_numel
    n = len(local)
    with torch.no_grad():
        stacked = [torch.stack([expert[i].detach() for expert in local]) for i in range(len(spec.shapes))]
        pieces = spec.to_shards(stacked)  # [n, G, S]
        send = pieces.transpose(0, 1).contiguous()  # [G, n, S]: shard g of my experts goes to rank g
        recv = send.new_empty(G * n * S)
        dist.all_to_all_single(recv, send.reshape(-1), [n * S] * G, [n * S] * G, group=group)
    return recv.view(G * n, S)


def experts_from_shards(shards: torch.Tensor, spec: ShardSpec, group) -> list[torch.Tensor]:
    """All experts' full tensors [E, *shape_i] from every rank's shards (an all-gather; for tests,
    checkpoint conversion and inspection, not the training path)."""
    G = spec.num_ranks
    with torch.no_grad():
        everyone = [torch.empty_like(shards) for _ in range(G)]
        dist.all_gather(everyone, shards.detach().contiguous(), group=group)
        return spec.from_shards(torch.stack(everyone, dim=1))  # [E, G, S]
