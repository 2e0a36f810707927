"""FSEP mechanics on 4 CPU ranks (gloo), without Megatron: shard cut, gather, gradient return, policies,
bytes on the wire, buffer memory.

One launch runs every check against slow exact references on fresh random inputs (seed printed):
the all-to-all gather equals indexing every rank's shards; the gradient return equals summing every
copy's gradient per expert; both memory policies (with and without a prefetched gather) give the
expert output and the gradients of tokens, probabilities and shards that full-expert autograd gives.
Bytes are measured by a spy on torch.distributed (the sizes passed to the all-to-alls), never by the
code's own counters. The gradient return is started by the experts' backward and finished after the
token dispatch's backward (checked by the order of the collectives and the main gradient's value at
the dispatch's backward). Memory: every storage the FSEP runtime allocates is followed by an
allocation-accounting dispatch mode until torch frees it; its peaks equal ``fsep_buffer_bytes``.
"""

import os
import random
import weakref

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from megatron_microep.glue.distributed import spawn_gloo
from megatron_microep.planning.placement import Placement
from megatron_microep.runtime import fsep as fsep_runtime
from megatron_microep.runtime.collectives import all_to_all
from megatron_microep.runtime.comm_spy import CollectiveSpy
from megatron_microep.runtime.experts import ExpertMath, ExpertWeights, loop_experts
from megatron_microep.runtime.fsep import (
    GatheredMemory,
    ShardExchange,
    ShardGradients,
    ShardSpec,
    attach_shard_gradients,
    fsep_buffer_bytes,
    fsep_layout,
    initial_fsep_placement,
    reference_gather,
    reference_return,
    run_sharded_experts,
    shard_group,
    shards_from_experts,
)

G, E, C = 4, 8, 3
H, FFN = 8, 12
MATH = ExpertMath(activation=F.silu, gated=True)
SHAPES = [(2 * FFN, H), (H, FFN), (2 * FFN,), (H,)]
PARTS = [2, 1, 2, 1]
# The memory check: larger experts (no biases) so that a shard dwarfs the few bytes autograd adds.
MEM_SHAPES, MEM_PARTS = [(2 * 96, 64), (64, 96)], [2, 1]


def _spec():
    return ShardSpec(SHAPES, PARTS, G, ["fc1", "fc2", "fc1_bias", "fc2_bias"])


def _random_layout(rng, num_experts=E, slots=C):
    copies = [[] for _ in range(num_experts)]
    for g in range(G):
        for e in rng.choice(num_experts, size=slots, replace=False):
            copies[e].append(g)
    for e in range(num_experts):  # every expert needs a copy: take a slot of an expert with several
        if not copies[e]:
            donor = max(range(num_experts), key=lambda f: len(copies[f]))
            g = copies[donor].pop()
            copies[e].append(g)
    return fsep_layout(Placement.from_lists([sorted(c) for c in copies], G), slots)


def test_shard_cut_round_trip_and_blocks():
    spec = _spec()
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn((5,) + s, generator=gen) for s in SHAPES]
    shards = spec.to_shards(tensors)  # [5, G, S]
    assert shards.shape == (5, G, spec.shard_numel)
    back = spec.from_shards(shards)
    assert all(torch.equal(a, b) for a, b in zip(back, tensors))
    # Shard r of a gated fc1 holds row block r of the gate half, then of the linear half.
    b = 2 * FFN // (2 * G)
    fc1 = tensors[0][2]
    pieces = {(i, p): v for i, p, v in spec.pieces(shards[2, 1])}
    assert torch.equal(pieces[(0, 0)], fc1[b : 2 * b])
    assert torch.equal(pieces[(0, 1)], fc1[FFN + b : FFN + 2 * b])
    assert torch.equal(pieces[(1, 0)], tensors[1][2][H // G : 2 * H // G])
    # Rank-major buffers (what a gather receives, what a return sends) hold the same cut.
    rank_major = shards.transpose(0, 1).contiguous()  # [G, 5, S]
    assert all(torch.equal(a, b) for a, b in zip(spec.from_rank_major(rank_major), tensors))
    assert torch.equal(spec.into_rank_major(tensors, torch.empty_like(rank_major)), rank_major)
    zeroed = spec.into_rank_major([None] + tensors[1:], rank_major.clone())
    assert torch.equal(spec.from_rank_major(zeroed)[0], torch.zeros_like(tensors[0]))
    with pytest.raises(ValueError, match="divisible by 8"):
        ShardSpec([(12, 4)], [2], 4)


def test_fsep_layout_rules():
    placement = initial_fsep_placement(E, G, C)
    assert placement.slots_per_gpu().tolist() == [C] * G
    layout = fsep_layout(placement, C)
    for g in range(G):
        experts = layout.slot_expert[layout.local_slot[g]]
        assert list(experts) == sorted(experts)
    from megatron_microep.planning.placement import PlacementError

    with pytest.raises(PlacementError, match="more than the 2 slots"):
        fsep_layout(placement, 2)


def _experts_run(x, p, tensors, rows):
    weights = [ExpertWeights(*[t[j] for t in tensors]) for j in range(len(rows))]
    return loop_experts(x, rows, p, weights, MATH)


def _layout_bytes(layout, rank, shard_bytes):
    """What one gather sends to / receives from the other ranks, from the layout alone."""
    counts = (layout.local_slot >= 0).sum(axis=1)
    sent = int(counts.sum() - counts[rank]) * shard_bytes  # my shard of every copy held elsewhere
    received = int(counts[rank]) * (G - 1) * shard_bytes  # the other shards of each of my copies
    return sent, received


class _Allocations(TorchDispatchMode):
    """Bytes of the storages created by aten ops inside the FSEP runtime's functions (``counting``)
    that are still alive, and their peak: every new storage is followed until torch frees it."""

    def __init__(self):
        super().__init__()
        self.counting = 0
        self.live = self.peak = 0
        self._tracked = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.counting:
            inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)}
            for t in pytree.tree_leaves(out):
                if not torch.is_tensor(t):
                    continue
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and ptr not in inputs and ptr not in self._tracked:  # new, not a view or in place
                    self._tracked.add(ptr)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, ptr, nbytes)
        return out

    def _free(self, ptr, nbytes):
        self._tracked.discard(ptr)
        self.live -= nbytes

    def reset_peak(self):
        self.peak = self.live


_COUNTED = [
    (fsep_runtime.ShardExchange, "start_gather"),
    (fsep_runtime.ShardExchange, "assemble"),
    (fsep_runtime.ShardExchange, "start_return"),
    (fsep_runtime.ShardExchange, "finish_return"),
    (fsep_runtime.PendingGather, "wait"),
    (fsep_runtime.PendingReturn, "wait"),
]


def _counted_inside_fsep(mode):
    """Make ``mode`` count the allocations made inside the FSEP runtime's functions; returns an undo."""
    originals = [(cls, name, getattr(cls, name)) for cls, name in _COUNTED]

    def wrap(fn):
        def counted(*args, **kwargs):
            mode.counting += 1
            try:
                return fn(*args, **kwargs)
            finally:
                mode.counting -= 1

        return counted

    for cls, name, fn in originals:
        setattr(cls, name, wrap(fn))
    return lambda: [setattr(cls, name, fn) for cls, name, fn in originals]


class _KeepWeights(torch.autograd.Function):
    """Experts that keep their weights for the backward (as GEMMs do) and allocate nothing of their
    size: output x * (1 + 0 * weights), weight gradients as zero-stride zeros."""

    @staticmethod
    def forward(ctx, x, *weights):
        ctx.save_for_backward(*weights)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[torch.zeros((), dtype=w.dtype).expand_as(w) for w in ctx.saved_tensors])


class _Done:
    def wait(self):
        pass


def _blocking_all_to_all(fn):
    """``all_to_all_single`` on copies, complete at the call: gloo's worker thread holds a call's
    tensors for a while after it completes, which would blur when the runtime frees its buffers."""

    def call(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        with _disable_current_modes():  # the copies are the test's, not the runtime's
            out, inp = torch.empty_like(output), input.clone()
            fn(out, inp, output_split_sizes, input_split_sizes, group=group)
            output.copy_(out)
        return _Done()

    return call


def _memory_peaks(rank, group, rng, policy, dtype):
    """Measured FSEP buffer bytes (forward peak, kept, backward peak) and the formula's, for one layer."""
    spec = ShardSpec(MEM_SHAPES, MEM_PARTS, G)
    layout = _random_layout(rng)
    ex = ShardExchange(layout, rank, group, spec, torch.device("cpu"))
    shards = torch.randn(E, spec.shard_numel, dtype=torch.float64).to(dtype).requires_grad_(True)
    shards.main_grad = torch.zeros(shards.shape, dtype=torch.float32)
    shards.grad_added_to_main_grad = False
    x = torch.randn(4, 64, dtype=dtype)
    mode = _Allocations()
    undo = _counted_inside_fsep(mode)
    original = dist.all_to_all_single
    dist.all_to_all_single = _blocking_all_to_all(original)
    try:
        with mode:
            grads = ShardGradients()
            tokens = attach_shard_gradients(x, shards, grads)
            y = run_sharded_experts(policy, tokens, x, shards, ex, lambda a, p, t: _KeepWeights.apply(a, *t), grads)
            forward_peak, kept = mode.peak, mode.live
            mode.reset_peak()
            y.sum().backward()
            backward_peak = mode.peak
    finally:
        undo()
        dist.all_to_all_single = original
    expected = fsep_buffer_bytes(layout, rank, spec, shards.element_size(), main_grad_size=4)
    return {
        "measured": (forward_peak, kept, backward_peak),
        "expected": (
            expected["forward_peak"],
            expected["copies"] if policy == "keep" else 0,
            expected["backward_peak"] if policy == "keep" else max(expected["forward_peak"], expected["backward_peak"]),
        ),
    }


class _Probe(torch.autograd.Function):
    """Identity whose backward records the main gradient's norm at that point of the backward."""

    @staticmethod
    def forward(ctx, x, param, seen):
        ctx.param, ctx.seen = param, seen
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.seen.append(float(ctx.param.main_grad.norm()))
        return grad, None, None


def _rank(rank, world, seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    group = shard_group(dist.group.WORLD)
    spec = _spec()
    gen = torch.Generator().manual_seed(seed)  # same on every rank: every rank knows all experts
    full = [torch.randn((E,) + s, generator=gen, dtype=torch.float64) for s in SHAPES]
    all_shards = spec.to_shards(full).transpose(0, 1)  # [G, E, S]
    out = {"group_ranks": dist.get_process_group_ranks(group), "group_is_world": group is dist.group.WORLD}

    # Initial sharding from Megatron's contiguous homes.
    n = E // G
    shards = shards_from_experts([t[rank * n : (rank + 1) * n] for t in full], spec, group)
    out["init_ok"] = torch.equal(shards, all_shards[rank])

    spy = CollectiveSpy()
    layouts = [_random_layout(rng) for _ in range(3)]
    out["gather_ok"], out["return_ok"], out["bytes"] = [], [], []
    for layout in layouts:
        ex = ShardExchange(layout, rank, group, spec, torch.device("cpu"))
        with spy.active():
            start = len(spy.calls)
            received = ex.start_gather(shards).wait()  # [G, C, S]
            gathered = received.transpose(0, 1)
            grads = [
                torch.randn((int(ex.counts[g]), G, spec.shard_numel), generator=gen, dtype=torch.float64)
                for g in range(G)
            ]
            pending = ex.start_return(spec.from_shards(grads[rank]), torch.float64)
            total = ex.finish_return(pending, shards)  # no main_grad: the summed gradient
            calls = spy.calls[start:]
        out["gather_ok"].append(torch.equal(gathered, reference_gather(all_shards, layout, rank)))
        ref = reference_return(grads, layout, E)[rank]
        out["return_ok"].append(torch.allclose(total, ref, rtol=0, atol=1e-12))
        out["bytes"].append(
            (
                [(c.op, c.group is group, c.sent, c.received) for c in calls],
                _layout_bytes(layout, rank, spec.shard_numel * 8),
            )
        )

    # Both policies, with and without a prefetched gather, against full-expert autograd.
    layout = layouts[0]
    ex = ShardExchange(layout, rank, group, spec, torch.device("cpu"), memory=GatheredMemory())
    rows = [int(v) for v in rng.integers(0, 5, size=ex.num_local)]
    rows[0] += 1
    gen_x = torch.Generator().manual_seed(seed + 100 + rank)
    x0 = torch.randn(sum(rows), H, generator=gen_x, dtype=torch.float64)
    p0 = torch.rand(sum(rows), generator=gen_x, dtype=torch.float64)
    upstream = torch.randn(sum(rows), H, generator=gen_x, dtype=torch.float64)
    mine = [int(e) for e in ex.my_experts]
    copies = [torch.stack([t[e] for e in mine]).requires_grad_(True) for t in full]
    x_ref, p_ref = x0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
    y_ref = _experts_run(x_ref, p_ref, copies, rows)
    (y_ref * upstream).sum().backward()
    copy_grads = spec.to_shards([c.grad for c in copies])  # [C, G, S]
    everyone = [torch.zeros(E, G, spec.shard_numel, dtype=torch.float64) for _ in range(G)]
    per_expert = torch.zeros(E, G, spec.shard_numel, dtype=torch.float64)
    per_expert[mine] = copy_grads
    dist.all_gather(everyone, per_expert, group=group)
    shard_grad_ref = sum(everyone)[:, rank, :]
    run = lambda a, b, t: _experts_run(a, b, t, rows)  # noqa: E731
    out["policies"] = {}
    for policy in ("keep", "regather"):
        for prefetch in (False, True):
            param = shards.clone().requires_grad_(True)
            x, p = x0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
            grads = ShardGradients()
            tokens = attach_shard_gradients(x, param, grads)
            pending = ex.start_gather(param) if prefetch else None
            regather = (lambda: ex.start_gather(param)) if prefetch else (lambda: None)
            y = run_sharded_experts(policy, tokens, p, param, ex, run, grads, pending, regather)
            (y * upstream).sum().backward()
            out["policies"][(policy, prefetch)] = (
                (y.detach() - y_ref.detach()).abs().max().item(),
                (x.grad - x_ref.grad).abs().max().item(),
                (p.grad - p_ref.grad).abs().max().item(),
                (param.grad - shard_grad_ref).abs().max().item(),
            )
    out["memory_live_after"] = ex.memory.live
    out["memory_peak"] = ex.memory.peak
    out["expert_bytes"] = spec.expert_numel * 8
    try:
        unattached = ShardGradients()
        run_sharded_experts("keep", x0.clone(), p0, shards.clone().requires_grad_(True), ex, run, unattached)
        out["unattached"] = None
    except RuntimeError as err:
        out["unattached"] = str(err)

    # Under DDP's attributes the sums land in main_grad; the return is started by the experts'
    # backward and finished after the token dispatch's backward (an all-to-all on another group).
    param = shards.clone().requires_grad_(True)
    param.main_grad = torch.zeros_like(param)
    param.grad_added_to_main_grad = False
    seen, order = [], []
    split = [sum(rows) // G] * G
    split[0] += sum(rows) - sum(split)
    for _ in range(2):  # two micro-batches accumulate
        x = x0.clone().requires_grad_(True)
        grads = ShardGradients()
        tokens = attach_shard_gradients(x, param, grads)
        tokens = _Probe.apply(tokens, param, seen)  # reached after the dispatch's backward
        there = all_to_all(tokens, [split[rank]] * G, split, dist.group.WORLD)  # a token dispatch ...
        tokens = all_to_all(there, split, [split[rank]] * G, dist.group.WORLD)  # ... and its way back
        y = run_sharded_experts("keep", tokens, p0, param, ex, run, grads)
        with spy.active():
            start = len(spy.calls)
            (y * upstream).sum().backward()
            order.append([(c.op, "fsep" if c.group is group else "tokens") for c in spy.calls[start:]])
    out["main_grad_err"] = (param.main_grad - 2 * shard_grad_ref).abs().max().item()
    out["main_grad_flag"] = param.grad_added_to_main_grad
    out["main_grad_at_dispatch_backward"] = seen
    out["backward_collectives"] = order
    out["main_grad_after_first"] = float((2 * shard_grad_ref).norm() / 2)

    # Mixed precision: bf16 shards, fp32 main gradient; copies' gradients travel in bf16.
    param = shards.to(torch.bfloat16).requires_grad_(True)
    param.main_grad = torch.zeros(param.shape, dtype=torch.float32)
    param.grad_added_to_main_grad = False
    ex16 = ShardExchange(layout, rank, group, spec, torch.device("cpu"))
    x = x0.to(torch.bfloat16).requires_grad_(True)
    grads = ShardGradients()
    tokens = attach_shard_gradients(x, param, grads)
    y = run_sharded_experts("keep", tokens, p0.to(torch.bfloat16), param, ex16, run, grads)
    with spy.active():
        start = len(spy.calls)
        (y.double() * upstream).sum().backward()
        returned = [c.sent for c in spy.calls[start:] if c.group is group]
    ref = shard_grad_ref.float()
    out["bf16"] = (
        param.main_grad.dtype,
        ((param.main_grad - ref).abs().max() / ref.abs().max()).item(),
        returned,
        int(ex16.counts[rank]) * (G - 1) * spec.shard_numel * 2,
    )

    out["memory"] = {
        (policy, str(dtype)): _memory_peaks(rank, group, rng, policy, dtype)
        for policy, dtype in (("keep", torch.float64), ("keep", torch.bfloat16), ("regather", torch.float64))
    }
    return out


@pytest.fixture(scope="module")
def fsep_run():
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"FSEP runtime test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return spawn_gloo(_rank, G, seed, timeout_s=300)


def test_shard_traffic_has_a_group_of_its_own(fsep_run):
    for r in fsep_run:
        assert r["group_ranks"] == list(range(G)) and not r["group_is_world"]


def test_initial_sharding_from_megatron_homes(fsep_run):
    assert all(r["init_ok"] for r in fsep_run)


def test_gather_and_return_match_references(fsep_run):
    for r in fsep_run:
        assert all(r["gather_ok"]) and all(r["return_ok"])


def test_measured_bytes_are_the_layouts(fsep_run):
    for r in fsep_run:
        for calls, (sent, received) in r["bytes"]:
            # One all-to-all each way, both on the shard group; the return is the gather reversed.
            assert calls == [("all_to_all_single", True, sent, received), ("all_to_all_single", True, received, sent)]


@pytest.mark.parametrize("policy", ["keep", "regather"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_policies_match_full_expert_autograd(fsep_run, policy, prefetch):
    for rank, r in enumerate(fsep_run):
        errors = r["policies"][(policy, prefetch)]
        assert max(errors) < 1e-10, f"rank {rank} {policy} prefetch={prefetch}: output/x/probs/shard errors {errors}"


def test_gathered_memory_is_released(fsep_run):
    for r in fsep_run:
        assert r["memory_live_after"] == 0
        assert r["memory_peak"] >= r["expert_bytes"]  # at least one gathered expert was alive


def test_experts_refuse_tokens_without_a_gradient_destination(fsep_run):
    for r in fsep_run:
        assert "attach_shard_gradients" in r["unattached"]


def test_gradient_lands_in_main_grad_after_the_dispatch_backward(fsep_run):
    for r in fsep_run:
        assert r["main_grad_err"] < 1e-10 and r["main_grad_flag"]
        # The return is issued by the experts' backward, before the dispatch's backward all-to-all
        # (two token all-to-alls here), and added to main_grad only after it.
        fsep, tokens = ("all_to_all_single", "fsep"), ("all_to_all_single", "tokens")
        assert r["backward_collectives"] == [[fsep, tokens, tokens]] * 2
        first, second = r["main_grad_at_dispatch_backward"]
        assert first == 0.0 and second == pytest.approx(r["main_grad_after_first"], rel=1e-9)


def test_mixed_precision_shards_keep_fp32_main_grads(fsep_run):
    for r in fsep_run:
        dtype, rel_err, returned, bf16_bytes = r["bf16"]
        assert dtype == torch.float32 and returned == [bf16_bytes]
        assert rel_err < 5e-2, f"bf16 shard gradient relative error {rel_err}"


@pytest.mark.parametrize("case", [("keep", "torch.float64"), ("keep", "torch.bfloat16"), ("regather", "torch.float64")])
def test_buffer_memory_is_the_formulas(fsep_run, case):
    for rank, r in enumerate(fsep_run):
        res = r["memory"][case]
        print(
            f"rank {rank} {case}: measured (forward peak, kept, backward peak) {res['measured']}, formula {res['expected']}"
        )
        assert res["measured"] == res["expected"]
