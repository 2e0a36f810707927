"""Replica weights refreshed once per step; replica gradients accumulated in fp32 and returned once.

Replicas are never parameters. A ``ReplicaExchange`` says, for one layout, who sends which home
expert to which replica slot of the EP group. A ``Replicas`` carries one layer's copies and their
gradients through an optimizer step:

- weights: ``refresh`` packs the home experts that other ranks replicate and starts one
  asynchronous all-to-all into a new buffer; ``weights`` waits for it at first use. The layer holds
  one buffer: starting a refresh releases the previous one.
- gradients: every backward of the step adds its replica gradients to fp32 accumulators
  (``accumulate``, no communication). ``start_return`` sends them home in one fp32 all-to-all;
  ``finish_return`` waits for it and hands each returned gradient to ``into(expert, tensor, grad)``
  on the home rank, per home expert in a fixed order (holder rank, then replica slot). At most one
  return is in flight per process: starting one finishes the one before, which bounds the memory
  of returns in flight.

- burst copies (``--microep-burst-slots``): copies decided per micro-batch, held until the step
  ends. ``push_burst`` sends the new ones' weights from their homes in one asynchronous all-to-all
  (``burst_weights`` waits for it); their gradients accumulate like the replicas' and go home in
  the same all-to-all (``start_return`` packs both: replica slots, then burst slots).

``replicate`` ties this to autograd: one node per micro-batch whose inputs are the dispatched
tokens (passed through, so every rank runs its backward at the same point, also a rank whose
replicas received no token) and the home parameters (so their gradient accumulation, and any hook
a data-parallel wrapper has there, runs after the node). Its backward accumulates and, in the
step's last backward (``GradientReturn.last_backward``), starts the return. With
``GradientReturn.into`` the caller finishes it (``finish_return``) before the gradients are
reduced across data-parallel ranks; without, the node waits and hands the sums to autograd in the
parameters' dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_microep.runtime.collectives import Pending, start_all_to_all
from megatron_microep.runtime.layout import PhysicalLayout

# (home expert index on this rank, tensor index, fp32 gradient of one replica) -> None
Deliver = Callable[[int, int, torch.Tensor], None]


class ReplicaExchange:
    """Who sends which home expert to which replica slot, for one layout and EP rank.

    ``expert_shapes`` are the shapes of one expert's tensors in a fixed order (e.g. fc1 weight,
    fc2 weight, biases), identical on every rank. Split sizes count elements.
    """

    def __init__(self, layout: PhysicalLayout, ep_rank: int, expert_shapes: Sequence[torch.Size]):
        n, R = layout.experts_per_rank, layout.redundant_slots
        holders, indices = np.nonzero(layout.local_slot[:, n : n + R] >= 0)
        experts = layout.slot_expert[layout.local_slot[holders, n + indices]]
        self._setup(experts, holders, indices, layout.num_ranks, n, R, ep_rank, expert_shapes)
        self.layout = layout

    @classmethod
    def of_copies(
        cls,
        experts: np.ndarray,
        holders: np.ndarray,
        indices: np.ndarray,
        num_ranks: int,
        experts_per_rank: int,
        num_indices: int,
        ep_rank: int,
        expert_shapes: Sequence[torch.Size],
    ) -> ReplicaExchange:
        """The exchange of any copies: copy k of global expert ``experts[k]`` sits in slot
        ``indices[k]`` (< ``num_indices``) of EP rank ``holders[k]`` (int [K] each; e.g. burst copies,
        or replicas and burst copies together with burst slots numbered after the replica slots)."""
        self = cls.__new__(cls)
        self._setup(experts, holders, indices, num_ranks, experts_per_rank, num_indices, ep_rank, expert_shapes)
        self.layout = None
        return self

    def _setup(self, experts, holders, indices, G, n, num_indices, ep_rank, expert_shapes) -> None:
        order = np.lexsort((np.asarray(indices), np.asarray(holders)))  # (holder, index) order
        experts = np.asarray(experts, dtype=np.int64)[order]
        holders = np.asarray(holders, dtype=np.int64)[order]
        indices = np.asarray(indices, dtype=np.int64)[order]
        self.copies = (experts, holders, indices)
        self.experts_per_rank = n
        self.num_indices = num_indices
        self.ep_rank = ep_rank
        self.shapes = [torch.Size(s) for s in expert_shapes]
        self.numel = int(sum(s.numel() for s in self.shapes))
        homes = experts // n
        mine_out = homes == ep_rank
        # Sent by this rank: its home expert for each (holder, index), grouped by holder.
        self.send_experts = (experts[mine_out] % n).tolist()
        self.send_splits = (np.bincount(holders[mine_out], minlength=G) * self.numel).tolist()
        # Received by this rank: its slots, grouped by home rank, then slot index.
        mine_in = holders == ep_rank
        order = np.lexsort((indices[mine_in], homes[mine_in]))
        self.recv_slots = indices[mine_in][order].tolist()  # slot index of each received expert
        self.recv_splits = (np.bincount(homes[mine_in], minlength=G) * self.numel).tolist()

    def start_fetch(self, home: Sequence[Sequence[torch.Tensor]], group) -> Pending:
        """Replica weights [received * numel] from their homes; ``home[i]``: local expert i's tensors."""
        with torch.no_grad():
            if self.send_experts:
                send = torch.cat([t.reshape(-1) for i in self.send_experts for t in home[i]])
            else:
                send = home[0][0].new_empty(0)
            return start_all_to_all(send, self.recv_splits, self.send_splits, group)

    def start_return(self, grads: torch.Tensor, group) -> Pending:
        """Replica gradients [received * numel] back to their homes: [sent * numel] arrive."""
        return start_all_to_all(grads, self.send_splits, self.recv_splits, group)

    def deliver(self, returned: torch.Tensor, into: Deliver) -> None:
        """Hand every returned gradient to ``into``, in a fixed order: holder rank, then replica slot."""
        for j, expert in enumerate(self.send_experts):
            for i, part in enumerate(self.unflatten(returned.narrow(0, j * self.numel, self.numel))):
                into(expert, i, part)

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        sizes = [s.numel() for s in self.shapes]
        return [part.view(shape) for part, shape in zip(torch.split(flat, sizes), self.shapes)]

    def replica_tensors(self, flat: torch.Tensor) -> list[list[torch.Tensor] | None]:
        """Per slot index (``num_indices`` of them): the tensors of the expert it holds, None if empty."""
        out: list[list[torch.Tensor] | None] = [None] * self.num_indices
        for j, slot in enumerate(self.recv_slots):
            out[slot] = self.unflatten(flat.narrow(0, j * self.numel, self.numel))
        return out


# Returns started and not yet finished, oldest first (at most one: each start finishes the others).
_RETURNS_IN_FLIGHT: list[Replicas] = []


class Replicas:
    """One layer's replica weights, burst copies and gradient accumulators (see the module doc).

    ``group``: the process group of the replica traffic (the EP ranks), set by the owner before the
    first collective. Every method that communicates must be called on every rank of it at the same
    point.
    """

    def __init__(self) -> None:
        self.group = None
        self._weights: tuple[ReplicaExchange, torch.Tensor] | None = None
        self._fetch: tuple[ReplicaExchange, Pending] | None = None
        self._grads: tuple[ReplicaExchange, torch.Tensor] | None = None
        self._return: tuple[ReplicaExchange, Pending, Deliver, ReplicaExchange | None] | None = None
        self._burst = _BurstCopies()

    # --- weights ----------------------------------------------------------------------------------
    def refresh(self, exchange: ReplicaExchange, home: Sequence[Sequence[torch.Tensor]]) -> None:
        """Start fetching ``exchange``'s replica weights from the current ``home`` tensors."""
        if self._fetch is not None:
            self._fetch[1].wait()  # a collective every rank started: let it finish, drop its result
        self._weights = None
        self._fetch = (exchange, exchange.start_fetch(home, self.group))

    def weights(self, exchange: ReplicaExchange) -> torch.Tensor:
        """The replica weights [received * numel] of the last refresh, which must be for ``exchange``."""
        if self._fetch is not None:
            fetched, pending = self._fetch
            self._fetch = None
            self._weights = (fetched, pending.wait())
        if self._weights is None or self._weights[0] is not exchange:
            raise RuntimeError("replica weights used without a refresh for the current placement")
        return self._weights[1]

    def release(self) -> None:
        """Drop the weights (a layout without replicas); a refresh in flight is finished first."""
        if self._fetch is not None:
            self._fetch[1].wait()
        self._fetch = self._weights = None

    # --- burst copies -----------------------------------------------------------------------------
    @property
    def burst_copies(self) -> np.ndarray:
        """int64 [K, 2]: (expert, EP rank) of the burst copies held in this step, in slot-fill order."""
        return self._burst.copies

    @property
    def burst_slot(self) -> np.ndarray:
        """int64 [K]: the burst slot of each held copy on its EP rank."""
        return self._burst.slot

    def push_burst(
        self,
        copies: np.ndarray,
        slot: np.ndarray,
        num_held: int,
        home: Sequence[Sequence[torch.Tensor]],
        shapes_of: tuple[int, int, int, int],
    ) -> None:
        """Hold burst ``copies`` int64 [K, 2] (expert, EP rank) in burst ``slot`` int64 [K]; the first
        ``num_held`` must be the copies held so far. The new ones' weights are pushed from their home
        ranks in one asynchronous all-to-all (``burst_weights`` waits for it). ``shapes_of``: (EP ranks,
        experts per rank, burst slots, this EP rank); the expert tensor shapes are ``home[0]``'s."""
        burst = self._burst
        if not np.array_equal(copies[:num_held], burst.copies) or not np.array_equal(slot[:num_held], burst.slot):
            raise RuntimeError("burst copies held earlier in the step were not kept in their slots")
        burst.copies, burst.slot = copies, slot
        if num_held == len(copies):
            return
        num_ranks, n, slots, ep_rank = shapes_of
        shapes = [t.shape for t in home[0]]
        burst.geometry = (num_ranks, n, ep_rank, shapes, home[0][0].device)
        new = copies[num_held:]
        exchange = ReplicaExchange.of_copies(
            new[:, 0], new[:, 1], slot[num_held:], num_ranks, n, slots, ep_rank, shapes
        )
        burst.pushes.append((exchange, exchange.start_fetch(home, self.group)))

    def burst_weights(self) -> list[torch.Tensor | None]:
        """Per burst slot of this rank: the flat weights [numel] of the copy it holds (None: empty).
        Waits for the pushes in flight."""
        burst = self._burst
        for exchange, pending in burst.pushes:
            flat = pending.wait()
            for j, slot in enumerate(exchange.recv_slots):
                burst.weights[slot] = flat.narrow(0, j * exchange.numel, exchange.numel)
        burst.pushes = []
        return burst.weights

    def end_burst_step(self, slots: int) -> None:
        """Drop the step's burst copies (their gradients must have gone home); ``slots`` per rank from now."""
        if self._burst.pending:
            raise RuntimeError("burst copies dropped before their gradients went home")
        for _, pending in self._burst.pushes:
            pending.wait()
        self._burst = _BurstCopies(slots)

    # --- gradients --------------------------------------------------------------------------------
    @property
    def gradients_pending(self) -> bool:
        """Whether gradients were accumulated and not yet delivered."""
        return self._grads is not None or self._return is not None or self._burst.pending

    def accumulate(self, exchange: ReplicaExchange | None, grad: torch.Tensor | None) -> None:
        """Add one backward's replica gradients [received * numel] (None: zero) in fp32."""
        if exchange is None:
            return
        if self._return is not None and self._return[3] is exchange:
            raise RuntimeError("replica gradients accumulated after their return started (more backward passes?)")
        if self._grads is None:
            if grad is None:  # the forward used the weights, so they are here
                grad = self._weights[1].new_zeros(len(exchange.recv_slots) * exchange.numel)
            self._grads = (exchange, grad.to(torch.float32, copy=True).reshape(-1))
        elif self._grads[0] is not exchange:
            raise RuntimeError(
                "the replica placement changed inside an optimizer step; placements take effect at step boundaries"
            )
        elif grad is not None:
            self._grads[1].add_(grad.reshape(-1))

    def accumulate_burst(self, slots: Sequence[int], grads: Sequence[torch.Tensor | None]) -> None:
        """Add one backward's gradients of this rank's burst copies (per burst slot; None: zero) in fp32.
        Called on every rank while any holds burst copies (also with none here: the return is collective)."""
        burst = self._burst
        burst.pending = len(burst.copies) > 0
        for slot, grad in zip(slots, grads):
            if grad is None:
                grad = burst.weights[slot].new_zeros(burst.weights[slot].shape)
            total = burst.grads.get(slot)
            if total is None:
                burst.grads[slot] = grad.to(torch.float32, copy=True).reshape(-1)
            else:
                total.add_(grad.reshape(-1))

    def _step_exchange(self) -> tuple[ReplicaExchange, torch.Tensor]:
        """The exchange and fp32 gradients [received * numel] of everything accumulated (taken): the
        replicas, then the burst copies, in slots numbered after the replica slots."""
        exchange, grads = self._grads if self._grads is not None else (None, None)
        burst = self._burst
        if not len(burst.copies):
            return exchange, grads
        num_ranks, n, ep_rank, shapes, device = burst.geometry
        R = exchange.num_indices if exchange is not None else 0
        experts, holders, indices = exchange.copies if exchange is not None else (_NO_COPIES,) * 3
        combined = ReplicaExchange.of_copies(
            np.concatenate([experts, burst.copies[:, 0]]),
            np.concatenate([holders, burst.copies[:, 1]]),
            np.concatenate([indices, R + burst.slot]),
            num_ranks,
            n,
            R + burst.num_slots,
            ep_rank,
            shapes,
        )
        numel = combined.numel
        position = {slot: j for j, slot in enumerate(exchange.recv_slots)} if exchange is not None else {}
        parts = []
        for slot in combined.recv_slots:
            if slot < R:
                parts.append(grads.narrow(0, position[slot] * numel, numel))
            else:
                part = burst.grads.pop(slot - R, None)
                parts.append(part if part is not None else torch.zeros(numel, dtype=torch.float32, device=device))
        burst.grads.clear()
        burst.pending = False
        return combined, torch.cat(parts) if parts else torch.empty(0, dtype=torch.float32, device=device)

    def start_return(self, into: Deliver) -> None:
        """Send the accumulated gradients home (asynchronously); ``finish_return`` delivers them to ``into``."""
        finish_returns()
        replica_exchange = self._grads[0] if self._grads is not None else None
        exchange, grads = self._step_exchange()
        self._grads = None
        self._return = (exchange, exchange.start_return(grads, self.group), into, replica_exchange)
        _RETURNS_IN_FLIGHT.append(self)

    def finish_return(self) -> None:
        """Wait for the return started last and deliver it (a no-op if none is in flight)."""
        if self._return is None:
            return
        exchange, pending, into, _ = self._return
        self._return = None
        _RETURNS_IN_FLIGHT.remove(self)
        exchange.deliver(pending.wait(), into)

    def deliver(self, into: Deliver) -> None:
        """Everything accumulated or in flight to ``into`` now (the return started here if it had not been)."""
        if self._grads is not None or self._burst.pending:
            self.start_return(into)
        self.finish_return()

    def return_now(self) -> list[list[torch.Tensor | None]]:
        """Return the accumulated gradients and wait: per home expert and tensor, the fp32 sum of its
        copies' gradients in the fixed order (None where the expert has no copy elsewhere)."""
        sums: dict[tuple[int, int], torch.Tensor] = {}

        def add(expert: int, tensor: int, grad: torch.Tensor) -> None:
            total = sums.get((expert, tensor))
            sums[expert, tensor] = grad.clone() if total is None else total + grad

        self.start_return(add)
        exchange = self._return[0]
        self.finish_return()
        return [[sums.get((e, i)) for i in range(len(exchange.shapes))] for e in range(exchange.experts_per_rank)]


def finish_returns() -> None:
    """Finish every gradient return in flight in this process, oldest first."""
    while _RETURNS_IN_FLIGHT:
        _RETURNS_IN_FLIGHT[0].finish_return()


_NO_COPIES = np.zeros(0, dtype=np.int64)


class _BurstCopies:
    """One step's burst copies of a layer: which are held where, this rank's weights and gradients."""

    def __init__(self, num_slots: int = 0) -> None:
        self.num_slots = num_slots
        self.copies = np.zeros((0, 2), dtype=np.int64)  # (expert, EP rank), in slot-fill order
        self.slot = np.zeros(0, dtype=np.int64)  # burst slot of each copy on its rank
        self.geometry: tuple | None = None  # (EP ranks, experts per rank, EP rank, shapes, device)
        self.pushes: list[tuple[ReplicaExchange, Pending]] = []  # weight pushes in flight
        self.weights: list[torch.Tensor | None] = [None] * num_slots  # this rank's copies, flat [numel]
        self.grads: dict[int, torch.Tensor] = {}  # burst slot -> fp32 gradient [numel] accumulated
        self.pending = False  # gradients accumulated (on any rank) and not yet sent home


@dataclass(frozen=True)
class GradientReturn:
    """When one layer's replica gradients go home in a step, and where to.

    ``last_backward()`` is asked in every backward: True starts the return. ``into`` receives the
    returned gradients when the caller finishes the return itself (before the data-parallel
    reduction); None: the backward waits and hands them to autograd.
    """

    last_backward: Callable[[], bool]
    into: Deliver | None = None


# Without a training step: every backward returns its gradients through autograd.
EVERY_BACKWARD = GradientReturn(lambda: True)


class _Replicate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, replicas: Replicas, exchange, burst_slots, policy: GradientReturn, *home_flat):
        ctx.replicas, ctx.exchange, ctx.burst_slots, ctx.policy = replicas, exchange, burst_slots, policy
        ctx.dtypes = [t.dtype for t in home_flat]
        # Fresh aliases per call: the buffers themselves never carry this node's history.
        flat = replicas.weights(exchange).detach() if exchange is not None else tokens.new_empty(0)
        burst = replicas.burst_weights()
        return (tokens.view_as(tokens), flat, *(burst[slot].detach() for slot in burst_slots))

    @staticmethod
    def backward(ctx, grad_tokens, grad_flat, *grad_burst):
        replicas, policy = ctx.replicas, ctx.policy
        replicas.accumulate(ctx.exchange, grad_flat)
        replicas.accumulate_burst(ctx.burst_slots, grad_burst)
        home_grads: list[torch.Tensor | None] = [None] * len(ctx.dtypes)
        if policy.last_backward():
            if policy.into is not None:
                replicas.start_return(policy.into)
            else:
                sums = [g for expert in replicas.return_now() for g in expert]
                home_grads = [None if g is None else g.to(dtype) for g, dtype in zip(sums, ctx.dtypes)]
        return (grad_tokens, None, None, None, None, *home_grads)


def replicate(
    tokens: torch.Tensor,
    replicas: Replicas,
    exchange: ReplicaExchange,
    home: Sequence[Sequence[torch.Tensor]],
    policy: GradientReturn,
) -> tuple[torch.Tensor, list[list[torch.Tensor] | None]]:
    """(tokens, replica tensors per replica index) whose gradients reach ``home`` as ``policy`` says.

    ``home[i]`` are local expert i's tensors in ``exchange.shapes`` order; ``replicas`` must have
    been refreshed for ``exchange``. Call on every rank of the EP group.
    """
    tokens, tensors, _ = replicate_with_burst(tokens, replicas, exchange, home, policy, ())
    return tokens, tensors


def replicate_with_burst(
    tokens: torch.Tensor,
    replicas: Replicas,
    exchange: ReplicaExchange | None,
    home: Sequence[Sequence[torch.Tensor]],
    policy: GradientReturn,
    burst_slots: Sequence[int],
) -> tuple[torch.Tensor, list[list[torch.Tensor] | None], list[list[torch.Tensor]]]:
    """``replicate`` (``exchange`` None: no replicas) plus this rank's burst copies in ``burst_slots``
    (pushed with ``Replicas.push_burst``): their tensors, in that order, whose gradients accumulate in
    fp32 and go home with the replicas' once per step. Call on every rank of the EP group whenever any
    rank holds replicas or burst copies."""
    home_flat = [t for expert in home for t in expert]
    tokens, flat, *burst = _Replicate.apply(tokens, replicas, exchange, tuple(burst_slots), policy, *home_flat)
    shapes = [t.shape for t in home[0]]
    sizes = [s.numel() for s in shapes]
    burst_tensors = [[p.view(s) for p, s in zip(torch.split(b, sizes), shapes)] for b in burst]
    return tokens, exchange.replica_tensors(flat) if exchange is not None else [], burst_tensors
