"""Auditing the token path, on CPU, for what would stall or perturb a GPU (tests and benchmarks).

``HostReads`` counts the places where the host would wait for the device, on real CPU tensors.
``DeviceAudit`` records, on fake devices, every sync-class op, device-to-host copy, blocking
host-to-device copy and atomics-based op. ``cuda_fake_bindings`` lets CUDA-device fake tensors pass
the few Python bindings that a CPU-only torch cannot run for them.

On a GPU, the host blocks whenever it reads device values: ``.item()``, ``.tolist()``, ``.numpy()``,
``.cpu()``, a tensor in a Python ``if`` or ``int()``, ops whose output size depends on values
(``nonzero``, ``masked_select``, ``repeat_interleave`` without ``output_size``, ...), and explicit
stream or event synchronisation. On CPU none of these wait, so ``HostReads`` counts them instead:
Python-level reads through patched ``torch.Tensor`` methods, data-dependent aten ops through a
dispatch mode, and whatever synchronisation functions the caller names (e.g. the CPU harness's
stand-ins for CUDA events). Reads inside the declared boundary functions (the one host read MicroEP
allows per layer forward) are counted as boundary calls, not as reads. ``.to("cpu")`` is not
counted: on CPU it cannot be told from Megatron moving a weight to the current device (the CPU
harness's device is the CPU); device-to-host copies are what the fake-device test
(``tests/runtime/test_device_path.py``) catches.

Not for production runs: these patch ``torch.Tensor`` while active.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_PYTHON_READS = ("tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
_DATA_DEPENDENT_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "nonzero_numpy",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "bincount",
    "is_nonzero",
    "equal",
    "allclose",
}
# Ops that accumulate through atomics on CUDA (not bitwise reproducible run to run).
_ATOMIC_OPS = {
    "index_add",
    "index_add_",
    "scatter_add",
    "scatter_add_",
    "scatter_reduce",
    "scatter_reduce_",
    "index_reduce",
    "index_reduce_",
    "embedding_dense_backward",
    "_embedding_bag_backward",
    "put_",
}
_ACCUMULATING_PUTS = {"index_put", "index_put_", "_index_put_impl", "_index_put_impl_"}


def _needs_output_size(func, kwargs) -> bool:
    """``repeat_interleave`` with tensor repeats and no ``output_size`` reads the repeats' sum."""
    return func._overloadname != "self_int" and kwargs.get("output_size") is None


class HostReads(TorchDispatchMode):
    """Context manager: ``reads`` counts host reads by kind, ``boundary`` the boundary calls.

    ``boundaries``: (owner, attribute) functions whose calls are the allowed host boundary;
    ``syncs``: (owner, attribute) functions that synchronise the device (counted as reads).
    """

    def __init__(self, boundaries: Sequence[tuple[object, str]] = (), syncs: Sequence[tuple[object, str]] = ()):
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.boundary = 0
        self._boundaries, self._syncs = list(boundaries), list(syncs)
        self._saved: list[tuple[object, str, object]] = []
        self._depth = 0  # >0 while inside a boundary or a counted read

    def _patch(self, owner, name, make):
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def _counting(self, kind, original):
        @functools.wraps(original)
        def read(*args, **kwargs):
            if self._depth:
                return original(*args, **kwargs)
            self.reads[kind] += 1
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return read

    def _boundary(self, original):
        @functools.wraps(original)
        def boundary(*args, **kwargs):
            self.boundary += 1
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return boundary

    def __enter__(self):
        for name in _PYTHON_READS:
            self._patch(torch.Tensor, name, functools.partial(self._counting, f"Tensor.{name}"))

        for owner, name in self._syncs:
            self._patch(owner, name, functools.partial(self._counting, f"{getattr(owner, '__name__', owner)}.{name}"))
        for owner, name in self._boundaries:
            self._patch(owner, name, self._boundary)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            while self._saved:
                owner, name, original = self._saved.pop()
                setattr(owner, name, original)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._depth:
            name = func.__name__.split(".")[0]
            if name in _DATA_DEPENDENT_OPS:
                self.reads[f"aten.{name}"] += 1
            elif name == "repeat_interleave" and _needs_output_size(func, kwargs):
                self.reads["aten.repeat_interleave without output_size"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.reads.values())


class DeviceAudit(TorchDispatchMode):
    """Context manager for fake-device runs: ``violations`` lists every sync-class op, device-to-host
    copy, blocking host-to-device copy and atomics-based op; ``host_to_device`` the non_blocking flag
    of each host-to-device copy."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []
        self.host_to_device: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in _DATA_DEPENDENT_OPS or name == "item":
            self.violations.append(f"sync-class op {func}")
        if name == "repeat_interleave" and _needs_output_size(func, kwargs):
            self.violations.append(f"{func} without output_size")
        accumulate = kwargs.get("accumulate") or (len(args) > 3 and args[3])
        if name in _ATOMIC_OPS or (name in _ACCUMULATING_PUTS and accumulate):
            self.violations.append(f"atomics-based op {func}")
        out = func(*args, **kwargs)
        if name in ("_to_copy", "copy_"):
            src, dst = (args[1], args[0]) if name == "copy_" else (args[0], out)
            if isinstance(src, torch.Tensor) and src.device != dst.device:
                if dst.device.type == "cpu":
                    self.violations.append(f"device-to-host copy {func}")
                elif src.device.type == "cpu":
                    non_blocking = bool(kwargs.get("non_blocking") or (name == "copy_" and len(args) > 2 and args[2]))
                    self.host_to_device.append(non_blocking)
                    if not non_blocking:
                        self.violations.append(f"blocking host-to-device copy {func}")
        return out


def cuda_fake_bindings() -> None:
    """Let CUDA-device fake tensors pass ``[...]``, ``.contiguous()`` and ``.copy_()`` in a CPU-only
    torch, whose Python bindings of these set a CUDA device guard it lacks: for CUDA tensors they go
    to the same aten ops directly (same semantics, still seen by dispatch modes). For the rest of the
    process (a test's child process)."""
    getitem, contiguous, copy_ = torch.Tensor.__getitem__, torch.Tensor.contiguous, torch.Tensor.copy_

    def shim_getitem(self, index):
        if self.device.type != "cuda":
            return getitem(self, index)
        out, dim = self, 0
        for i in index if isinstance(index, tuple) else (index,):
            if isinstance(i, int):
                out = out.select(dim, i)
            elif isinstance(i, slice):
                start, stop, step = i.indices(out.shape[dim])
                out, dim = torch.ops.aten.slice.Tensor(out, dim, start, max(start, stop), step), dim + 1
            else:
                raise NotImplementedError(f"index {i!r} on a CUDA fake tensor")
        return out

    def shim_contiguous(self, memory_format=torch.contiguous_format):
        if self.device.type != "cuda":
            return contiguous(self, memory_format=memory_format)
        return (
            self if self.is_contiguous(memory_format=memory_format) else torch.clone(self, memory_format=memory_format)
        )

    def shim_copy_(self, src, non_blocking=False):
        if self.device.type != "cuda":
            return copy_(self, src, non_blocking)
        return torch.ops.aten.copy_.default(self, src, non_blocking)

    torch.Tensor.__getitem__, torch.Tensor.contiguous, torch.Tensor.copy_ = shim_getitem, shim_contiguous, shim_copy_
