"""Counting the places where the host would wait for the device, on real CPU tensors.

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

Used by the sync-count test and ``scripts/bench_dispatcher.py``; not for production runs (it patches
``torch.Tensor`` while active).
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
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "bincount",
    "is_nonzero",
    "equal",
}


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
            elif name == "repeat_interleave" and func._overloadname != "self_int" and kwargs.get("output_size") is None:
                self.reads["aten.repeat_interleave without output_size"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.reads.values())
