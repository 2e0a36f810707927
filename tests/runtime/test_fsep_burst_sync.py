"""FSEP burst copies never make the host wait for the device (see test_fsep_sync.py for the method).

A layout plus burst copies chosen by ``plan_burst`` for a micro-batch that overloads one rank: the
layout's exchange and the burst exchange (``first_slot`` = C, its index copied without blocking),
run through ``run_sharded_experts(..., burst=...)`` under both memory policies. On the meta device
forward and backward (collectives replaced by no-ops) the audit (``runtime.audit.DeviceAudit``)
finds no sync-class op and no host-device copy once the exchanges exist; on fake CUDA tensors,
building the burst exchange, as the layer does every micro-batch, makes exactly one host-to-device
copy, non-blocking; a control builds it with a blocking copy and the audit reports it.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from megatron_microep.planning.burst import NO_COPIES, plan_burst
from megatron_microep.planning.placement import Placement
from megatron_microep.runtime import device as device_transfers
from megatron_microep.runtime.audit import DeviceAudit
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

G, E, C, D, H, FFN = 4, 8, 2, 1, 16, 24
RANK = 1
CUDA = torch.device("cuda", 0)
SPEC = ShardSpec([(2 * FFN, H), (H, FFN)], [2, 1], G)


@pytest.fixture
def burst_collectives(no_op_collectives, monkeypatch):
    monkeypatch.delitem(device_transfers.TRANSFERS, "cuda")  # pinned memory needs a CUDA runtime


def _layouts():
    """(layout, layout with burst copies): the contiguous layout, expert 0 (rank 0) overloaded."""
    layout = fsep_layout(Placement.contiguous(E, G), C)
    tokens = np.full((G, E), 10, dtype=np.int64)
    tokens[:, 0] = 200
    plan = plan_burst(tokens, layout.placement, NO_COPIES, D, None, 1.0)
    assert len(plan.copies) and RANK in plan.copies[:, 1].tolist(), plan.copies
    return layout, layout.with_burst(plan.placement, plan.copies, plan.burst_slot(), D)


def _run(x, p, tensors, rows):
    math = ExpertMath(activation=F.silu, gated=True)
    weights = [
        ExpertWeights(*[t.select(0, j) for t in tensors[first : first + 2]])
        for first in range(0, len(tensors), 2)
        for j in range(tensors[first].shape[0])
    ]
    return loop_experts(x, rows, p, weights, math)


def _exchanges(device, non_blocking=True):
    layout, bursting = _layouts()
    streams = HostOrder(device)
    own = ShardExchange(layout, RANK, None, SPEC, device, streams=streams)
    burst = ShardExchange(
        bursting, RANK, None, SPEC, device, streams=streams, first_slot=C, non_blocking_index=non_blocking
    )
    return own, burst


def _forward(policy, device, own, burst, audit):
    rows = [3, 0, 5]  # C layout copies, then this rank's burst copy
    assert own.num_local + burst.num_local == len(rows)
    shards = torch.randn(E, SPEC.shard_numel, device=device).requires_grad_(True)
    shards.main_grad = torch.zeros(shards.shape, device=device)
    shards.grad_added_to_main_grad = False
    x = torch.randn(sum(rows), H, device=device, requires_grad=True)
    probs = torch.rand(sum(rows), device=device)
    with audit:
        grads = ShardGradients()
        tokens = attach_shard_gradients(x, shards, grads)
        pending = burst.start_gather(shards)
        run = lambda a, b, t: _run(a, b, t, rows)  # noqa: E731
        y = run_sharded_experts(policy, tokens, probs, shards, own, run, grads, burst=(burst, pending))
        loss = y.float().square().sum()
    return loss, shards, grads


@pytest.mark.parametrize("policy", ["keep", "regather"])
def test_burst_forward_and_backward_never_wait_for_the_device(burst_collectives, policy):
    meta = torch.device("meta")
    own, burst = _exchanges(meta)
    forward, backward = DeviceAudit(), DeviceAudit()
    loss, shards, grads = _forward(policy, meta, own, burst, forward)
    with backward:
        loss.backward()
    assert shards.grad_added_to_main_grad and grads.returns == []
    # The return adds one source rank's rows at a time with index_add_ (FSEP's return path, the
    # layout's as before): each row holds a distinct expert, so its atomics never meet on one address.
    others = [v for v in backward.violations if v != "atomics-based op aten.index_add_.default"]
    assert forward.violations == [] and others == [], (forward.violations, backward.violations)
    assert forward.host_to_device == [] and backward.host_to_device == []


@pytest.mark.parametrize("policy", ["keep", "regather"])
def test_burst_exchange_copies_its_index_without_blocking_on_fake_cuda(burst_collectives, policy):
    with FakeTensorMode(), torch.no_grad():
        build = DeviceAudit()
        with build:
            own, burst = _exchanges(CUDA)
        forward = DeviceAudit()
        loss, _, _ = _forward(policy, CUDA, own, burst, forward)
        assert loss.device == CUDA
    # The layout's exchange copies its index once per layout (blocking, per step); the burst
    # exchange, built every micro-batch, once without blocking.
    assert build.host_to_device == [False, True], build.host_to_device
    assert forward.violations == [] and forward.host_to_device == []


def test_the_audit_sees_a_blocking_burst_index_copy(burst_collectives):
    with FakeTensorMode():
        audit = DeviceAudit()
        with audit:
            _exchanges(CUDA, non_blocking=False)
    assert audit.host_to_device == [False, False] and len(audit.violations) == 2
