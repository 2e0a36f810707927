"""Replica weights: copies of home experts fetched over the EP group; gradients returned home.

Replicas are never parameters. ``replicate`` is one autograd node per micro-batch whose inputs are
the home experts' parameters and whose output is a flat buffer holding this rank's replica weights.
Forward copies weights home -> replica holders with one all-to-all (or reuses the copy made
earlier in the same optimizer step); backward sends each replica's gradient back with the reverse
all-to-all and sums, per home expert, all returned gradients in a fixed order (replica rank, then
replica slot). Autograd then adds that sum to the home parameter's own gradient before the
parameter's gradient hooks run, so Megatron's DDP buffers, expert-data-parallel reduction and
distributed optimizer see exactly the stock parameters and nothing else.

The node also passes the dispatched tokens through, which ties it to the token path: every rank
runs its backward (a collective) at the same point, also a rank whose replicas received no token.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_microep.runtime.layout import PhysicalLayout


class ReplicaExchange:
    """Who sends which home expert to which replica slot, for one layout and EP rank.

    ``expert_shapes`` are the shapes of one expert's tensors in a fixed order (e.g. fc1 weight,
    fc2 weight, biases), identical on every rank.
    """

    def __init__(self, layout: PhysicalLayout, ep_rank: int, group, expert_shapes: Sequence[torch.Size]):
        n, G = layout.experts_per_rank, layout.num_ranks
        self.layout = layout
        self.ep_rank = ep_rank
        self.group = group
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
        self._cache: tuple[Hashable, torch.Tensor] | None = None

    def _flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def fetch(self, home: Sequence[Sequence[torch.Tensor]], key: Hashable | None) -> torch.Tensor:
        """Flat buffer [received * numel] of replica weights; reused while ``key`` is unchanged.

        ``key`` must be equal on every rank of the group (all ranks fetch, or none does); None
        disables reuse. The caller must change it whenever the home weights may have changed: a
        key that outlives an optimizer step (e.g. the step number during the evaluation that
        Megatron-LM runs after the step) serves the pre-update weights.
        """
        if key is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():
            reference = home[0][0]
            if self.send_experts:
                send = torch.cat([self._flat(home[i]) for i in self.send_experts])
            else:
                send = reference.new_empty(0)
            recv = reference.new_empty(sum(self.recv_splits))
            dist.all_to_all_single(recv, send, self.recv_splits, self.send_splits, group=self.group)
        self._cache = None if key is None else (key, recv)
        return recv

    def return_grads(self, grad: torch.Tensor) -> list[list[torch.Tensor | None]]:
        """Per home expert and tensor: the summed gradient of all its replicas (None if not replicated)."""
        back = grad.new_empty(sum(self.send_splits))
        dist.all_to_all_single(back, grad.contiguous(), self.send_splits, self.recv_splits, group=self.group)
        sums: list[torch.Tensor | None] = [None] * self.layout.experts_per_rank
        for j, expert in enumerate(self.send_experts):  # fixed order: holder rank, replica index
            chunk = back[j * self.numel : (j + 1) * self.numel]
            sums[expert] = chunk.clone() if sums[expert] is None else sums[expert] + chunk
        return [[None] * len(self.shapes) if total is None else self.unflatten(total) for total in sums]

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        sizes = [s.numel() for s in self.shapes]
        return [part.view(shape) for part, shape in zip(torch.split(flat, sizes), self.shapes)]

    def replica_tensors(self, flat: torch.Tensor) -> list[list[torch.Tensor] | None]:
        """Per replica index (R of them): the tensors of the expert it holds, None if empty."""
        out: list[list[torch.Tensor] | None] = [None] * self.layout.redundant_slots
        for j, slot in enumerate(self.recv_slots):
            out[slot] = self.unflatten(flat[j * self.numel : (j + 1) * self.numel])
        return out


class _Replicate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, exchange: ReplicaExchange, key, num_tensors: int, *home_flat):
        ctx.exchange = exchange
        home = [home_flat[i : i + num_tensors] for i in range(0, len(home_flat), num_tensors)]
        flat = exchange.fetch(home, key)
        # A fresh alias per call: the cached buffer itself never carries this node's history.
        return tokens.view_as(tokens), flat.detach()

    @staticmethod
    def backward(ctx, grad_tokens, grad_flat):
        grads = ctx.exchange.return_grads(grad_flat)
        flat_grads = [g for expert in grads for g in expert]
        return (grad_tokens, None, None, None, *flat_grads)


def replicate(
    tokens: torch.Tensor, exchange: ReplicaExchange, home: Sequence[Sequence[torch.Tensor]], key: Hashable | None
) -> tuple[torch.Tensor, list[list[torch.Tensor] | None]]:
    """(tokens, replica tensors per replica index) with gradients flowing back to ``home``.

    ``home[i]`` are local expert i's tensors in ``exchange.shapes`` order. Call on every rank of
    the EP group with the same ``key``.
    """
    num_tensors = len(exchange.shapes)
    home_flat = [t for expert in home for t in expert]
    tokens, flat = _Replicate.apply(tokens, exchange, key, num_tensors, *home_flat)
    return tokens, exchange.replica_tensors(flat)
