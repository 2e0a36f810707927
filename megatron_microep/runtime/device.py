"""Host <-> device copies that never stall the device's stream, one implementation per device type.

The token path reads device values on the host exactly once per MoE layer forward (the count
exchange, ``runtime.dispatch``) and sends the host's small schedule tables back once. On CUDA both
go through pinned host memory: the device-to-host copy runs on a side stream after the work queued
so far, and the host waits for its event only when it needs the values (as Megatron's alltoall
dispatcher does with its D2H stream); the host-to-device copy is queued without waiting. Devices
whose operations complete before they return (CPU) need neither streams nor pinning. Callers are
the same for every device: no device checks in the token path itself.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class HostCopy:
    """Values of a device tensor on their way to the host; ``wait`` blocks until they are there."""

    def __init__(self, wait: Callable[[], np.ndarray]) -> None:
        self._wait = wait

    def wait(self) -> np.ndarray:
        return self._wait()


class _SynchronousTransfers:
    """Devices whose values are ready when an operation returns (CPU): plain copies."""

    def to_host(self, tensor: torch.Tensor) -> HostCopy:
        return HostCopy(lambda: tensor.detach().cpu().numpy())

    def to_device(self, array: np.ndarray, device: torch.device) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        return tensor if device.type == "cpu" else tensor.to(device, non_blocking=True)


class _CudaTransfers:
    """Pinned host buffers; device-to-host on a side stream with an event, host-to-device queued."""

    def __init__(self) -> None:
        self._streams: dict[int, torch.cuda.Stream] = {}

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = torch.cuda.Stream(device=index)
        return self._streams[index]

    def to_host(self, tensor: torch.Tensor) -> HostCopy:
        stream = self._side_stream(tensor.device)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        tensor.record_stream(stream)  # its memory must outlive the copy on the side stream

        def wait() -> np.ndarray:
            done.synchronize()
            return host.numpy()

        return HostCopy(wait)

    def to_device(self, array: np.ndarray, device: torch.device) -> torch.Tensor:
        # The caching host allocator keeps the pinned block until the queued copy has run.
        return torch.from_numpy(array).pin_memory().to(device, non_blocking=True)


TRANSFERS: dict[str, object] = {"cuda": _CudaTransfers()}
_SYNCHRONOUS = _SynchronousTransfers()


def _transfers(device: torch.device):
    return TRANSFERS.get(device.type, _SYNCHRONOUS)


def copy_to_host(tensor: torch.Tensor) -> HostCopy:
    """Start copying ``tensor`` to the host after the work queued so far; ``.wait()`` gives the values."""
    return _transfers(tensor.device).to_host(tensor)


def copy_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` on ``device``, queued without blocking the host (``array`` must not change afterwards)."""
    return _transfers(device).to_device(array, device)
