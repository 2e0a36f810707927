"""FSEP's gather, experts and gradient return never make the host wait for the device.

The FSEP runtime runs both memory policies, with and without a prefetched gather, on tensors that
live on a device without host-readable data: forward and backward on the ``meta`` device (autograd
runs there on a CPU build of torch; ``.item()``, ``.tolist()`` and ``nonzero`` raise, and so do most
mixes with CPU tensors), and the forward under torch's ``FakeTensorMode`` on a fake ``cuda:0``
(where any CPU/CUDA mix raises; autograd itself needs a real CUDA build). A ``TorchDispatchMode``
records every sync-class operation (scalar reads, ``nonzero``, copies between host and device); the
tests assert none in the forward and none in the backward, once the ``ShardExchange`` of the layout
exists (building one copies its index tensors to the device once, in a forward). The collectives are
replaced by no-ops (these tensors have no data to send); gloo runs the same code for real in
test_fsep_gloo.py. A control shows the recorder sees a host-to-device copy of an index array and a
scalar read.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_microep.planning.placement import Placement
from megatron_microep.runtime.experts import ExpertMath, ExpertWeights, loop_experts
from megatron_microep.runtime.fsep import (
    HostOrder,
    ShardExchange,
    ShardGradients,
    ShardSpec,
    attach_shard_gradients,
    fsep_layout,
    run_sharded_experts,
)

G, E, C, H, FFN = 4, 8, 3, 16, 24
RANK = 1
CUDA = torch.device("cuda", 0)
aten = torch.ops.aten


class _Syncs(TorchDispatchMode):
    """Records operations that make the host wait for the device: scalar reads, ``nonzero``, and
    copies between host and device memory."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._local_scalar_dense.default, aten.nonzero.default, aten.item.default):
            self.seen.append(str(func))
        elif func in (aten._to_copy.default, aten.copy_.default):
            source = args[1] if func is aten.copy_.default else args[0]
            target = args[0].device if func is aten.copy_.default else kwargs.get("device", source.device)
            if torch.device(target).type != source.device.type:
                self.seen.append(f"{func} {source.device.type}->{torch.device(target).type}")
        return func(*args, **kwargs)


def _layout():
    rng = np.random.default_rng(0)
    copies = [[] for _ in range(E)]
    for g in range(G):
        for e in rng.choice(E, size=C, replace=False):
            copies[e].append(g)
    for e in range(E):
        if not copies[e]:
            donor = max(range(E), key=lambda f: len(copies[f]))
            copies[e].append(copies[donor].pop())
    return fsep_layout(Placement.from_lists([sorted(c) for c in copies], G), C)


def _run(x, p, tensors, rows):
    math = ExpertMath(activation=F.silu, gated=True)
    weights = [ExpertWeights(*[t.select(0, j) for t in tensors]) for j in range(len(rows))]  # select: no host index
    return loop_experts(x, rows, p, weights, math)


def _forward(policy, prefetch, dtype, device, syncs):
    """One FSEP layer's forward on ``device`` with ``syncs`` recording; (loss, shards, x)."""
    spec = ShardSpec([(2 * FFN, H), (H, FFN)], [2, 1], G)
    rows = [3, 0, 5]
    exchange = ShardExchange(_layout(), RANK, None, spec, device, streams=HostOrder(device))
    shards = torch.randn(E, spec.shard_numel, device=device, dtype=dtype).requires_grad_(True)
    shards.main_grad = torch.zeros(shards.shape, device=device, dtype=torch.float32)
    shards.grad_added_to_main_grad = False
    x = torch.randn(sum(rows), H, device=device, dtype=dtype, requires_grad=True)
    probs = torch.rand(sum(rows), device=device, dtype=dtype)
    with syncs:
        grads = ShardGradients()
        tokens = attach_shard_gradients(x, shards, grads)
        pending = exchange.start_gather(shards) if prefetch else None
        regather = (lambda: exchange.start_gather(shards)) if prefetch else (lambda: None)
        run = lambda a, b, t: _run(a, b, t, rows)  # noqa: E731
        y = run_sharded_experts(policy, tokens, probs, shards, exchange, run, grads, pending, regather)
        loss = y.float().square().sum()
    return loss, shards, x


@pytest.mark.parametrize("policy", ["keep", "regather"])
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fsep_forward_and_backward_never_wait_for_the_device(no_op_collectives, policy, prefetch, dtype):
    forward, backward = _Syncs(), _Syncs()
    loss, shards, x = _forward(policy, prefetch, dtype, torch.device("meta"), forward)
    with backward:
        loss.backward()
    assert shards.grad_added_to_main_grad and x.grad is not None and x.grad.device.type == "meta"
    assert forward.seen == [] and backward.seen == []


@pytest.mark.parametrize("policy", ["keep", "regather"])
def test_fsep_forward_on_fake_cuda_mixes_no_devices(no_op_collectives, policy):
    syncs = _Syncs()
    with FakeTensorMode(), torch.no_grad():
        loss, _, _ = _forward(policy, True, torch.bfloat16, CUDA, syncs)
        assert loss.device == CUDA
    assert syncs.seen == []


def test_the_recorder_sees_host_device_traffic():
    with FakeTensorMode():
        y = torch.randn(4, device=CUDA)
        syncs = _Syncs()
        with syncs:
            index = torch.as_tensor(np.arange(2), device=CUDA)  # what building an exchange does, once
            y.index_select(0, index)
            with pytest.raises(Exception):  # noqa: B017 - fake tensors refuse data-dependent reads
                y.sum().item()
    assert syncs.seen == ["aten._to_copy.default cpu->cuda", "aten._local_scalar_dense.default"]
