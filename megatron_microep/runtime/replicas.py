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
        n, G = layout.experts_per_rank, layout.num_ranks
        self.layout = layout
        self.ep_rank = ep_rank
        self.shapes = [torch.Size(s) for s in expert_shapes]
        self.numel = int(sum(s.numel() for s in self.shapes))
        # Every replica slot as (holder rank, replica index, expert), in (holder, index) order.
        holders, indices = np.nonzero(layout.local_slot[:, n:] >= 0)
        experts = layout.slot_expert[layout.local_slot[holders, n + indices]]
        homes = experts // n
        mine_out = homes == ep_rank
        # Sent by this rank: its home expert for each (holder, index), grouped by holder.
        self.send_experts = (experts[mine_out] % n).tolist()
        self.send_splits = (np.bincount(holders[mine_out], minlength=G) * self.numel).tolist()
        # Received by this rank: its replica slots, grouped by home rank, then replica index.
        mine_in = holders == ep_rank
        order = np.lexsort((indices[mine_in], homes[mine_in]))
        self.recv_slots = indices[mine_in][order].tolist()  # replica index of each received expert
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
        """Per replica index (R of them): the tensors of the expert it holds, None if empty."""
        out: list[list[torch.Tensor] | None] = [None] * self.layout.redundant_slots
        for j, slot in enumerate(self.recv_slots):
            out[slot] = self.unflatten(flat.narrow(0, j * self.numel, self.numel))
        return out


# Returns started and not yet finished, oldest first (at most one: each start finishes the others).
_RETURNS_IN_FLIGHT: list[Replicas] = []


class Replicas:
    """One layer's replica weights and gradient accumulators (see the module doc).

    ``group``: the process group of the replica traffic (the EP ranks), set by the owner before the
    first collective. Every method that communicates must be called on every rank of it at the same
    point.
    """

    def __init__(self) -> None:
        self.group = None
        self._weights: tuple[ReplicaExchange, torch.Tensor] | None = None
        self._fetch: tuple[ReplicaExchange, Pending] | None = None
        self._grads: tuple[ReplicaExchange, torch.Tensor] | None = None
        self._return: tuple[ReplicaExchange, Pending, Deliver] | None = None

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

    # --- gradients --------------------------------------------------------------------------------
    @property
    def gradients_pending(self) -> bool:
        """Whether gradients were accumulated and not yet delivered."""
        return self._grads is not None or self._return is not None

    def accumulate(self, exchange: ReplicaExchange, grad: torch.Tensor | None) -> None:
        """Add one backward's replica gradients [received * numel] (None: zero) in fp32."""
        if self._return is not None and self._return[0] is exchange:
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

    def start_return(self, into: Deliver) -> None:
        """Send the accumulated gradients home (asynchronously); ``finish_return`` delivers them to ``into``."""
        finish_returns()
        exchange, grads = self._grads
        self._grads = None
        self._return = (exchange, exchange.start_return(grads, self.group), into)
        _RETURNS_IN_FLIGHT.append(self)

    def finish_return(self) -> None:
        """Wait for the return started last and deliver it (a no-op if none is in flight)."""
        if self._return is None:
            return
        exchange, pending, into = self._return
        self._return = None
        _RETURNS_IN_FLIGHT.remove(self)
        exchange.deliver(pending.wait(), into)

    def deliver(self, into: Deliver) -> None:
        """Everything accumulated or in flight to ``into`` now (the return started here if it had not been)."""
        if self._grads is not None:
            self.start_return(into)
        self.finish_return()

    def return_now(self) -> list[list[torch.Tensor | None]]:
        """Return the accumulated gradients and wait: per home expert and tensor, the fp32 sum of its
        replicas' gradients in the fixed order (None where the expert has no replica)."""
        exchange = self._grads[0]
        sums: list[list[torch.Tensor | None]] = [
            [None] * len(exchange.shapes) for _ in range(exchange.layout.experts_per_rank)
        ]

        def add(expert: int, tensor: int, grad: torch.Tensor) -> None:
            total = sums[expert][tensor]
            sums[expert][tensor] = grad.clone() if total is None else total + grad

        self.start_return(add)
        self.finish_return()
        return sums


def finish_returns() -> None:
    """Finish every gradient return in flight in this process, oldest first."""
    while _RETURNS_IN_FLIGHT:
        _RETURNS_IN_FLIGHT[0].finish_return()


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
    def forward(ctx, tokens, replicas: Replicas, exchange: ReplicaExchange, policy: GradientReturn, *home_flat):
        ctx.replicas, ctx.exchange, ctx.policy = replicas, exchange, policy
        ctx.dtypes = [t.dtype for t in home_flat]
        # A fresh alias per call: the buffer itself never carries this node's history.
        return tokens.view_as(tokens), replicas.weights(exchange).detach()

    @staticmethod
    def backward(ctx, grad_tokens, grad_flat):
        replicas, policy = ctx.replicas, ctx.policy
        replicas.accumulate(ctx.exchange, grad_flat)
        home_grads: list[torch.Tensor | None] = [None] * len(ctx.dtypes)
        if policy.last_backward():
            if policy.into is not None:
                replicas.start_return(policy.into)
            else:
                sums = [g for expert in replicas.return_now() for g in expert]
                home_grads = [None if g is None else g.to(dtype) for g, dtype in zip(sums, ctx.dtypes)]
        return (grad_tokens, None, None, None, *home_grads)


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
    home_flat = [t for expert in home for t in expert]
    tokens, flat = _Replicate.apply(tokens, replicas, exchange, policy, *home_flat)
    return tokens, exchange.replica_tensors(flat)
