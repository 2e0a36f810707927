"""The simulator's FSEP charge against the runtime's own byte accounting and the memory policies."""

import numpy as np
import pytest

from megatron_microep.planning.fsep_layout import greedy_layout, placement_from_holds
from megatron_microep.planning.policies import Assignment, traffic
from megatron_microep.runtime.fsep import ShardExchange, ShardSpec, fsep_layout
from megatron_microep.simulator.cost import CostModel, record_cost

# A DeepSeek-V3-shaped expert on 8 GPUs in 2 nodes of 4.
HIDDEN, FFN, G, NODE = 7168, 2048, 8, 4


def _layout(seed, experts=32, slots=6):
    rng = np.random.default_rng(seed)
    print(f"seed={seed}")
    loads = rng.poisson(100 * rng.lognormal(0, 1, experts), (4, experts)).astype(np.int64)
    return placement_from_holds(greedy_layout(loads, G, slots))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gather_bytes_per_gpu_match_the_runtime_exchange(seed):
    placement = _layout(seed)
    model = CostModel(hidden_size=HIDDEN, ffn_hidden_size=FFN, param_bytes=2.0)
    t = model.fsep_shard_traffic(placement, node_size=G)  # one node: everything intra
    spec = ShardSpec([(2 * FFN, HIDDEN), (HIDDEN, FFN)], [2, 1], G)
    layout = fsep_layout(placement, int(placement.slots_per_gpu().max()))
    for rank in range(G):
        sent, received = ShardExchange(layout, rank, None, spec).bytes_per_gather(element_size=2)
        assert t["send_intra"][rank] == pytest.approx(sent) and t["send_inter"][rank] == 0
        assert t["recv_intra"][rank] == pytest.approx(received) and t["recv_inter"][rank] == 0


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
