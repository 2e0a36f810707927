"""The run's recorded routing: every training micro-batch's tokens per (source EP rank, expert) and
MoE layer, counted from the routers' outputs (independently of MicroEP's own telemetry)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


class RoutingRecorder:
    """Per training micro-batch and MoE layer, this rank's tokens per expert (a forward hook on each
    router); at the end of a step they are gathered over the EP group into ``tokens[source, expert]``."""

    def __init__(self, layers: list[torch.nn.Module], ep_group):
        self.layer_ids = [int(layer.layer_number) for layer in layers]
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (layer id, int64 [E]) in forward order
        self.handles = [
            layer.router.register_forward_hook(self._hook(lid)) for layer, lid in zip(layers, self.layer_ids)
        ]

    def _hook(self, layer_id: int):
        def hook(module, inputs, output):
            if module.training and torch.is_grad_enabled():
                routing_map = output[1]
                self.pending.append((layer_id, routing_map.sum(dim=0).to(torch.int64).cpu()))

        return hook

    def end_step(self) -> list[tuple[int, int, np.ndarray]]:
        """Gather this step's counts; returns (micro-batch, layer id, tokens int64 [G, E]) per record."""
        if not self.pending:
            return []
        local = torch.stack([counts for _, counts in self.pending])  # [records, E]
        gathered = [torch.empty_like(local) for _ in range(self.ep_size)]
        dist.all_gather(gathered, local, group=self.ep_group)
        tokens = torch.stack(gathered, dim=1).numpy()  # [records, G, E]
        records, seen = [], {}
        for (layer_id, _), block in zip(self.pending, tokens):
            micro = seen.get(layer_id, 0)
            seen[layer_id] = micro + 1
            records.append((micro, layer_id, block))
        self.pending = []
        return records

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def home_loads(tokens: np.ndarray) -> np.ndarray:
    """int64 [G]: tokens each EP rank processes under stock EP (experts homed in contiguous blocks)."""
    G, E = tokens.shape
    return tokens.sum(axis=0).reshape(G, E // G).sum(axis=1)


def max_over_mean(loads: np.ndarray) -> float:
    mean = float(loads.mean())
    return float(loads.max()) / mean if mean > 0 else 1.0
