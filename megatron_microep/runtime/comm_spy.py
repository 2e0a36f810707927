"""What this process hands to torch.distributed collectives: a spy for tests and benchmarks.

``CollectiveSpy`` replaces torch.distributed's collective functions while active (the code under
test looks them up on the module at call time) and records every call: the operation, the group,
the bytes of the tensors passed and, for ``all_to_all_single``, the bytes this rank sends to and
receives from the other ranks, from the tensors and split sizes actually passed. It measures; the
code under test counts nothing itself.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

_OPS = (
    "all_to_all_single",
    "broadcast",
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
)


@dataclass(frozen=True)
class CollectiveCall:
    op: str
    group: object  # as passed (None: the default group)
    nbytes: int  # bytes of the tensor this rank contributes (all_gather: its input)
    sent: int  # all_to_all_single: bytes to the other ranks of the group (else 0)
    received: int  # all_to_all_single: bytes from the other ranks of the group (else 0)


def _a2a_bytes(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **_) -> tuple[int, int]:
    """(bytes to other ranks, bytes from other ranks) of one ``all_to_all_single`` call."""
    me, size = dist.get_rank(group), dist.get_world_size(group)

    def others(tensor: torch.Tensor, splits) -> int:
        if not splits:  # equal chunks along the first dimension
            total = tensor.numel() * tensor.element_size()
            return total - total // size
        return (sum(splits) - splits[me]) * tensor.element_size() * math.prod(tensor.shape[1:])

    return others(input, input_split_sizes), others(output, output_split_sizes)


class CollectiveSpy:
    """Record collective calls while inside ``active()``; ``calls`` lists them in order."""

    def __init__(self) -> None:
        self.calls: list[CollectiveCall] = []

    @contextlib.contextmanager
    def active(self):
        originals = {name: getattr(dist, name) for name in _OPS if hasattr(dist, name)}

        def wrap(name, fn):
            def spied(*args, **kwargs):
                bound = dict(zip(_PARAMS[name], args), **kwargs)
                group = bound.get("group")
                if name == "all_to_all_single":
                    sent, received = _a2a_bytes(**bound)
                    tensor = bound["input"]
                else:
                    sent = received = 0
                    tensor = bound.get("tensor", bound.get("input_tensor", bound.get("input")))
                    if isinstance(tensor, (list, tuple)):
                        tensor = tensor[0]
                nbytes = tensor.numel() * tensor.element_size() if torch.is_tensor(tensor) else 0
                self.calls.append(CollectiveCall(name, group, nbytes, sent, received))
                return fn(*args, **kwargs)

            return spied

        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


# Positional parameter names of the spied functions (torch.distributed's signatures).
_PARAMS = {
    "all_to_all_single": ("output", "input", "output_split_sizes", "input_split_sizes", "group", "async_op"),
    "broadcast": ("tensor", "src", "group", "async_op"),
    "all_reduce": ("tensor", "op", "group", "async_op"),
    "all_gather": ("tensor_list", "tensor", "group", "async_op"),
    "all_gather_into_tensor": ("output_tensor", "input_tensor", "group", "async_op"),
    "all_gather_single": ("output_tensor", "input_tensor", "group", "async_op"),
    "reduce_scatter_tensor": ("output", "input", "op", "group", "async_op"),
    "reduce_scatter_single": ("output", "input", "op", "group", "async_op"),
}
