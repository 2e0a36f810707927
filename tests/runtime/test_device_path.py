"""The token path's device side, checked on CPU the way a GPU would run it.

Fake devices (one child process with torch's fake process group, so collectives accept tensors
without values): the whole per-micro-batch path after the count exchange -- index maps, permutation,
EP all-to-all, expert-TP all-gather, replica fetch, the experts (te_grouped through the torch model
of TransformerEngine's GEMM with fp32 main-grad accumulation, and grouped_mm over views of one
DDP-like weight buffer), expert-TP reduce-scatter, reverse all-to-all and combine -- runs under
FakeTensorMode with the count exchange replaced by known counts:

- forward on CUDA-device fake tensors (a CPU-only torch has no CUDA device guard, so autograd
  cannot record CUDA tensors, it aborts; and the Python bindings of indexing, ``contiguous`` and
  ``copy_`` need it too: a test-process shim sends those to their aten ops);
- forward and backward on meta-device fake tensors.

Both with replicas in the placement (the replica fetch and its gradient return run).

There, data-dependent ops (``nonzero``, ``.item()``, ``.tolist()``, ``repeat_interleave`` without
``output_size``) and host reads raise, and so do CPU/device mixes. ``runtime.audit.DeviceAudit`` also
lists every sync-class op, device-to-host copy, blocking host-to-device copy and atomics-based op
(``index_add``, ``scatter_add``, accumulating ``index_put``, ...) it sees in either direction: the
test allows none, and exactly one non-blocking host-to-device copy (the rank's tables) per forward.
Controls in the same process show each check catching what it is for (the old ``nonzero``
permutation, ``index_add`` combine and ``index_select`` backward, a host read).

Fixed-order combine: ``fold_rows`` equals, bit for bit, each token's expert rows summed left to right
in ascending expert order; on a crafted input, ``index_add`` in send order gives another result.
"""

import multiprocessing
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_microep.planning.placement import Placement
from megatron_microep.runtime import dispatch, experts
from megatron_microep.runtime.audit import DeviceAudit, cuda_fake_bindings
from megatron_microep.runtime.experts import ExpertMath, ExpertWeights, RowGroups, run_experts, storage_order
from megatron_microep.runtime.layout import PhysicalLayout
from megatron_microep.runtime.replicas import EVERY_BACKWARD, ReplicaExchange, Replicas, replicate
from megatron_microep.runtime.te_reference import general_grouped_gemm

HIDDEN, FFN, TOKENS, TOPK = 16, 16, 12, 2
EP, R = 4, 1
# Per EP size: experts homed as Megatron does, some replicated (one replica slot per rank).
PLACEMENTS = {
    4: [[0, 1], [0], [1], [1, 0], [2], [2, 3], [3], [3]],
    2: [[0, 1], [0], [0], [0], [1, 0], [1], [1], [1]],
}


class KnownCounts:
    """Stands in for the count exchange: the host already knows the counts."""

    def __init__(self, counts):
        self.counts = counts

    def wait(self):
        return self.counts


def te_contract():
    return experts.te_gemm_adapter(general_grouped_gemm, None)


def synthetic_counts(rng, etp, num_experts):
    """int64 [T, G, E]: every rank routes TOKENS tokens to TOPK distinct experts each."""
    counts = np.zeros((etp, EP, num_experts), dtype=np.int64)
    for t in range(etp):
        for g in range(EP):
            for _ in range(TOKENS):
                counts[t, g, rng.choice(num_experts, TOPK, replace=False)] += 1
    return counts


def home_weights(n, device, dtype, bias, requires_grad, main_grads):
    """This rank's experts as views of one buffer in reverse order, as Megatron's DDP lays them out."""
    shapes = [(2 * FFN, HIDDEN), (HIDDEN, FFN)] + ([(2 * FFN,), (HIDDEN,)] if bias else [])
    per_expert = sum(int(np.prod(s)) for s in shapes)
    buffer = torch.zeros(n * per_expert, device=device, dtype=dtype)
    home = []
    for i in range(n):
        offset = (n - 1 - i) * per_expert
        tensors = []
        for shape in shapes:
            size = int(np.prod(shape))
            t = buffer.narrow(0, offset, size).view(shape)
            offset += size
            if requires_grad:
                t.requires_grad_(True)
            if main_grads:
                t.main_grad = torch.zeros(shape, device=device, dtype=torch.float32)
                t.grad_added_to_main_grad = False
            tensors.append(t)
        home.append(tensors)
    return home


def device_path(routing_map, hidden, probs, layout, groups, home, backend, math):
    """The MicroEP layer's per-micro-batch device path after the count exchange (as glue/layer.py runs it)."""
    n = layout.experts_per_rank
    replica_slots = layout.local_slot[groups.ep_rank, n:]
    order = storage_order([t[0] for t in home])
    order += [n + r for r in range(layout.redundant_slots) if replica_slots[r] >= 0]
    order += [n + r for r in range(layout.redundant_slots) if replica_slots[r] < 0]
    routing = dispatch.route(routing_map, layout, groups, TOPK, group_order=np.array(order))
    tokens, p = dispatch.permute(hidden, probs, routing)
    tokens, p = dispatch.exchange(tokens, p, routing, groups)
    tokens, rows, p = dispatch.regroup(tokens, p, routing, groups)
    copies = layout.placement.replica_counts()[groups.ep_rank * n : (groups.ep_rank + 1) * n]
    by_slot = [ExpertWeights(*t, feeds_replicas=bool(c > 1)) for t, c in zip(home, copies)]
    by_slot += [None] * layout.redundant_slots
    if layout.has_replicas:
        exchange = ReplicaExchange(layout, groups.ep_rank, [t.shape for t in home[0]])
        held = Replicas()
        held.group = groups.ep
        held.refresh(exchange, home)
        tokens, replicas = replicate(tokens, held, exchange, home, EVERY_BACKWARD)
        for slot, tensors in enumerate(replicas):
            if tensors is not None:
                by_slot[n + slot] = ExpertWeights(*tensors)
    weights = [by_slot[slot] for slot in routing.tables.group_order]
    used = sum(w is not None for w in weights)
    out = run_experts(
        backend, tokens, RowGroups(rows[:used], routing.maps.group_offsets.narrow(0, 0, used)), p, weights[:used], math
    )
    out = dispatch.ungroup(out, routing, groups, probs.dtype)
    out = dispatch.exchange_back(out, routing, groups)
    return dispatch.unpermute(out, routing)


def _fake_groups(etp):
    if etp == 1:
        return dispatch.Groups(dist.group.WORLD, dist.new_group([0]), dist.group.WORLD, 0, EP, 0, 1)
    # 2 expert-TP x 2 EP of the 4 fake ranks; this process is rank 0.
    etp_group, _ = dist.new_group([0, 1]), dist.new_group([2, 3])
    ep_group, _ = dist.new_group([0, 2]), dist.new_group([1, 3])
    return dispatch.Groups(ep_group, etp_group, dist.group.WORLD, 0, EP // 2, 0, 2)


def _fake_case(device, backend, etp, bias, with_grad, seed):
    from torch._subclasses.fake_tensor import FakeTensorMode

    rng = np.random.default_rng(seed)
    groups = _fake_groups(etp)
    ep = groups.ep_size
    placement = Placement.from_lists(PLACEMENTS[ep], ep)
    layout = PhysicalLayout.build(placement, placement.num_experts // ep, R)
    counts = synthetic_counts(rng, etp, placement.num_experts)[:, :ep]
    math = ExpertMath(activation=torch.nn.functional.silu, gated=True, accumulate_into_main_grad=True)
    forward, backward = DeviceAudit(), DeviceAudit()
    original = dispatch.exchange_counts
    dispatch.exchange_counts = lambda routing_map, topk, groups: KnownCounts(counts)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            dtype = torch.bfloat16
            routing_map = torch.rand(TOKENS, placement.num_experts, device=device) > 0.5
            hidden = torch.randn(TOKENS, HIDDEN, device=device, dtype=dtype, requires_grad=with_grad)
            probs = torch.rand(TOKENS, placement.num_experts, device=device, requires_grad=with_grad)
            home = home_weights(layout.experts_per_rank, device, dtype, bias, with_grad, backend == "te_grouped")
            with forward:
                out = device_path(routing_map, hidden, probs, layout, groups, home, backend, math)
            if with_grad:
                with backward:
                    out.backward(torch.ones_like(out))
            result = {
                "out_shape": tuple(out.shape),
                "out_device": out.device.type,
                "forward": forward.violations,
                "backward": backward.violations,
                "forward_h2d": forward.host_to_device,
                "backward_h2d": backward.host_to_device,
            }
            if with_grad:
                result["grads"] = [
                    hidden.grad is not None,
                    probs.grad is not None,
                    all(t.grad is not None or t.grad_added_to_main_grad for e in home for t in e[:2])
                    if backend == "te_grouped"
                    else all(t.grad is not None for e in home for t in e),
                ]
            return result
    finally:
        dispatch.exchange_counts = original


def _controls(device):
    """The recorder and fake mode catch what the old path did."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    caught = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        routing_map = torch.rand(TOKENS, 8, device=device) > 0.5
        try:
            routing_map.t().nonzero()
            caught["nonzero raises"] = False
        except Exception:  # noqa: BLE001 - data-dependent output
            caught["nonzero raises"] = True
        try:
            routing_map.sum(0).tolist()
            caught["host read raises"] = False
        except Exception:  # noqa: BLE001
            caught["host read raises"] = True
        rows = torch.randn(2 * TOKENS, HIDDEN, device=device, requires_grad=device == "meta")
        index = torch.randint(0, TOKENS, (2 * TOKENS,), device=device)
        recorder = DeviceAudit()
        with recorder:
            torch.zeros(TOKENS, HIDDEN, device=device).index_add(0, index, rows)
        caught["index_add flagged"] = any("index_add" in v for v in recorder.violations)
        recorder = DeviceAudit()
        with recorder:
            torch.ops.aten._to_copy.default(torch.arange(3), device=torch.device(device))  # what .to(device) runs
        caught["blocking host-to-device copy flagged"] = bool(recorder.violations)
        if device == "meta":
            x = torch.randn(TOKENS, HIDDEN, device=device, requires_grad=True)
            gathered = x.index_select(0, index)
            recorder = DeviceAudit()
            with recorder:
                gathered.sum().backward()
            caught["index_select backward flagged"] = any("index_add" in v for v in recorder.violations)
    return caught


def _fake_runs(seed):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=EP)
    experts.transformer_engine_gemm = te_contract  # the TE contract in torch (no TE here)
    # Pinned memory and streams need a CUDA runtime: the fake CUDA run uses the plain transfers.
    from megatron_microep.runtime import device as device_module

    device_module.TRANSFERS.pop("cuda", None)
    cuda_fake_bindings()
    results = {}
    for device, with_grad in (("cuda", False), ("meta", True)):
        for backend in ("te_grouped", "grouped_mm"):
            for etp, bias in ((1, False), (2, True)):
                key = f"{device}-{backend}-etp{etp}-{'bias' if bias else 'nobias'}"
                results[key] = _fake_case(device, backend, etp, bias, with_grad, seed)
        results[f"controls-{device}"] = _controls(device)
    dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def fake_results():
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"device path test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_fake_runs, (seed,))


def test_device_path_has_no_sync_host_read_or_atomics_on_fake_devices(fake_results):
    cases = {k: v for k, v in fake_results.items() if not k.startswith("controls")}
    assert len(cases) == 8
    for key, res in cases.items():
        device = key.split("-")[0]
        assert res["out_shape"] == (TOKENS, HIDDEN) and res["out_device"] == device, key
        assert res["forward"] == [], f"{key} forward: {res['forward']}"
        assert res["backward"] == [], f"{key} backward: {res['backward']}"
        # One non-blocking copy of the rank's tables per forward (row offsets come with it); none backward.
        assert res["forward_h2d"] == [True], f"{key}: host-to-device copies {res['forward_h2d']}"
        assert res["backward_h2d"] == [], key
        if device == "meta":
            assert all(res["grads"]), f"{key}: gradients missing {res['grads']}"


def test_fake_device_checks_catch_the_old_path(fake_results):
    for device in ("cuda", "meta"):
        caught = fake_results[f"controls-{device}"]
        assert caught and all(caught.values()), f"{device}: {caught}"


# --- fixed-order combine --------------------------------------------------------------------------


def _reference_combine(rows, token_rows):
    """Each token's rows summed left to right (ascending expert), float32 accumulation, one rounding."""
    out = torch.empty(token_rows.shape[1], rows.shape[1], dtype=rows.dtype)
    for i in range(token_rows.shape[1]):
        acc = torch.zeros(rows.shape[1], dtype=torch.float32 if rows.dtype != torch.float64 else rows.dtype)
        for j in range(token_rows.shape[0]):
            acc = acc + rows[token_rows[j, i]]
        out[i] = acc.to(rows.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_equals_fixed_order_sum_bitwise(dtype):
    gen = torch.Generator().manual_seed(int(os.environ.get("MICROEP_TEST_SEED", 5)))
    tokens, topk = 40, 4
    token_rows = torch.randperm(tokens * topk, generator=gen).view(topk, tokens)
    rows = (torch.randn(tokens * topk, 8, generator=gen) * 10 ** torch.randint(-3, 4, (tokens * topk, 1))).to(dtype)
    assert torch.equal(dispatch.fold_rows(rows, token_rows), _reference_combine(rows, token_rows))


def test_index_add_in_send_order_differs_on_a_crafted_input():
    """Where a token's rows arrive in another order than its experts', atomics-free index_add (CPU,
    sequential in send order) already differs from the fixed order; on a GPU its order varies per run."""
    token_rows = torch.tensor([[1], [2], [0]])  # the token's experts 0, 1, 2 sit in send rows 1, 2, 0
    rows = torch.tensor([[-1e8], [1e8], [1.0]])
    send_tokens = torch.zeros(3, dtype=torch.int64)
    fixed = dispatch.fold_rows(rows, token_rows)  # expert order: (1e8 + 1) - 1e8 = 0 in float32
    atomic = torch.zeros(1, 1).index_add(0, send_tokens, rows)  # send order: (-1e8 + 1e8) + 1 = 1
    assert torch.equal(fixed, _reference_combine(rows, token_rows))
    assert not torch.equal(fixed, atomic)
