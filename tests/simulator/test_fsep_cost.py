"""The simulator's FSEP charge against bytes measured on the runtime's all-to-alls, and the memory policies.

The charge per GPU (``CostModel.fsep_rank_bytes``) is compared with what MicroEP's FSEP runtime hands
to torch.distributed on 4 CPU ranks (gloo, bf16 shards: 2 bytes per parameter), measured by a spy
on the collectives, for both memory policies over fresh random layouts: one layer's forward and
backward, every byte sent and received on the shard group.
"""

import dataclasses
import os
import random

import numpy as np
import pytest
import torch

from megatron_microep.planning.fsep_layout import greedy_layout, placement_from_holds
from megatron_microep.planning.policies import Assignment, traffic
from megatron_microep.simulator.cost import FSEP_MEMORY_POLICY_CHARGES, CostModel, record_cost

# A DeepSeek-V3-shaped expert on 8 GPUs in 2 nodes of 4.
HIDDEN, FFN, G, NODE = 7168, 2048, 8, 4
# The measured run: small gated experts on 4 ranks.
RUN_G, RUN_E, RUN_C, RUN_H, RUN_F = 4, 8, 3, 32, 24


def _layout(seed, experts=32, slots=6):
    rng = np.random.default_rng(seed)
    print(f"seed={seed}")
    loads = rng.poisson(100 * rng.lognormal(0, 1, experts), (4, experts)).astype(np.int64)
    return placement_from_holds(greedy_layout(loads, G, slots))


def _measured_rank(rank, world, seed):
    import torch.distributed as dist

    from megatron_microep.runtime.comm_spy import CollectiveSpy
    from megatron_microep.runtime.fsep import (
        ShardExchange,
        ShardGradients,
        ShardSpec,
        attach_shard_gradients,
        fsep_layout,
        run_sharded_experts,
        shard_group,
    )

    rng = np.random.default_rng(seed)
    group = shard_group(dist.group.WORLD)
    spec = ShardSpec([(2 * RUN_F, RUN_H), (RUN_H, RUN_F)], [2, 1], RUN_G)
    spy, out = CollectiveSpy(), []
    for trial in range(4):
        loads = rng.poisson(50 * rng.lognormal(0, 1, RUN_E), (3, RUN_E)).astype(np.int64)
        placement = placement_from_holds(greedy_layout(loads, RUN_G, RUN_C))
        exchange = ShardExchange(fsep_layout(placement, RUN_C), rank, group, spec, torch.device("cpu"))
        shards = torch.randn(RUN_E, spec.shard_numel, dtype=torch.bfloat16, requires_grad=True)
        x = torch.randn(6, RUN_H, dtype=torch.bfloat16, requires_grad=True)
        policy = ("keep", "regather")[trial % 2]
        with spy.active():
            start = len(spy.calls)
            grads = ShardGradients()
            tokens = attach_shard_gradients(x, shards, grads)
            y = run_sharded_experts(policy, tokens, x, shards, exchange, lambda a, p, t: a * t[0].sum(), grads)
            y.float().sum().backward()
            mine = [c for c in spy.calls[start:] if c.group is group]
        out.append((policy, placement.to_lists(), sum(c.sent for c in mine), sum(c.received for c in mine)))
    return out


@pytest.fixture(scope="module")
def measured():
    from megatron_microep.glue.distributed import spawn_gloo

    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"FSEP cost test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return spawn_gloo(_measured_rank, RUN_G, seed, timeout_s=300)


def test_charge_per_gpu_equals_the_bytes_the_runtime_sends(measured):
    from megatron_microep.planning.placement import Placement

    base = CostModel(hidden_size=RUN_H, ffn_hidden_size=RUN_F, gated=True, param_bytes=2.0)
    for rank, trials in enumerate(measured):
        for policy, lists, sent, received in trials:
            model = dataclasses.replace(base, **FSEP_MEMORY_POLICY_CHARGES[policy])
            charge = model.fsep_rank_bytes(Placement.from_lists(lists, RUN_G))
            assert (sent, received) == (charge["sent"][rank], charge["received"][rank]), (rank, policy)
            assert sent > 0 and received > 0


def test_node_split_conserves_bytes():
    placement = _layout(3)
    model = CostModel()
    one = model.fsep_shard_traffic(placement, node_size=G)
    two = model.fsep_shard_traffic(placement, node_size=NODE)
    for side in ("send", "recv"):
        assert np.allclose(two[f"{side}_intra"] + two[f"{side}_inter"], one[f"{side}_intra"])
    # Receiving: a GPU gets (node - 1) shards of each copy over NVLink and (G - node) over the network.
    copies = placement.slots_per_gpu()
    shard = model.expert_param_bytes / G
    assert np.allclose(two["recv_inter"], copies * (G - NODE) * shard)
    assert two["send_inter"].sum() == pytest.approx(two["recv_inter"].sum())


def _record(model, placement, tokens_per_copy=4096):
    slot_tokens = np.full(placement.num_slots, tokens_per_copy, dtype=np.int64)
    tokens = np.zeros((G, placement.num_experts), dtype=np.int64)
    for e in range(placement.num_experts):
        for g in placement.copies(e):
            tokens[g, e] += tokens_per_copy  # every copy's tokens come from its own GPU (no a2a)
    a = Assignment(
        placement=placement,
        tokens=tokens,
        slot_tokens=slot_tokens,
        piece_src=placement.gpus.copy(),
        piece_slot=np.arange(placement.num_slots),
        piece_count=slot_tokens.copy(),
        weight_moves=np.zeros((0, 2), dtype=np.int64),
    )
    return record_cost(model, a, traffic(a, NODE), NODE, temporary_copies=False, fully_sharded=True, decision_s=0.0)


def test_memory_policies_change_gathers_and_recompute():
    placement = _layout(4)
    laer_like = CostModel()  # gather before forward and before backward
    keep = CostModel(fsep_backward_gather=False)
    regather = CostModel(fsep_recompute=True)
    assert laer_like.fsep_bytes(placement) == pytest.approx(1.5 * keep.fsep_bytes(placement))
    per_copy = (G - 1) / G * keep.expert_param_bytes
    assert keep.fsep_bytes(placement) == pytest.approx(placement.num_slots * per_copy * 2)
    a, b, c = _record(laer_like, placement), _record(keep, placement), _record(regather, placement)
    assert c.compute_s == pytest.approx(a.compute_s + a.compute_fwd_s)  # one more expert forward
    assert b.compute_s == pytest.approx(a.compute_s)
    assert b.fsep_exposed_s <= a.fsep_exposed_s
    assert b.weight_bytes < a.weight_bytes == c.weight_bytes
