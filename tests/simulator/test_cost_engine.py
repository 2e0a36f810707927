"""Cost model pieces against hand computations, and the replay engine's bookkeeping."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_microep.planning.burst import with_copies
from megatron_microep.planning.policies import Layout, Policy, make_policy, traffic
from megatron_microep.planning.policies.base import Assignment
from megatron_microep.simulator.cost import (
    CostModel,
    CostModelError,
    GemmTable,
    record_cost,
    replica_sync,
)
from megatron_microep.simulator.engine import Downsampler, Simulation
from megatron_microep.simulator.report import explain_wins, summarize
from megatron_microep.simulator.traces import TraceError, TraceRecord, open_trace

SEED = int(os.environ.get("MICROEP_TEST_SEED", np.random.SeedSequence().entropy % 2**32))


def setup_module():
    print(f"cost/engine tests seed: {SEED} (rerun with MICROEP_TEST_SEED={SEED})")


def test_gemm_table_default_and_errors(tmp_path):
    table = GemmTable.load()
    with open(table.source) as f:
        assert "DERIVED, not measured" in f.read(), "the default table records where it comes from"
    assert 0 < table(np.array([1.0]))[0] < table(np.array([4096.0]))[0] <= 1
    assert table(np.array([2048.0]))[0] == pytest.approx(0.75)
    bad = tmp_path / "t.csv"
    bad.write_text("tokens,eff\n1,0.5\n")
    with pytest.raises(CostModelError, match="header 'tokens,efficiency'"):
        GemmTable.load(bad)
    bad.write_text("# c\ntokens,efficiency\n1,0.5\n4,1.5\n")
    with pytest.raises(CostModelError, match="data row 2"):
        GemmTable.load(bad)
    bad.write_text("tokens,efficiency\n8,0.5\n4,0.6\n")
    with pytest.raises(CostModelError, match="strictly increasing"):
        GemmTable.load(bad)
    with pytest.raises(CostModelError, match="cannot read"):
        GemmTable.load(tmp_path / "missing.csv")
    with pytest.raises(CostModelError, match="inter_node_gbps must be > 0"):
        CostModel(inter_node_gbps=0)


def test_compute_and_a2a_by_hand():
    flat = GemmTable(np.array([1.0, 1e6]), np.array([0.5, 0.5]), "flat")
    model = CostModel(
        hidden_size=1000,
        ffn_hidden_size=500,
        peak_tflops=1.0,
        gemm_table=flat,
        intra_node_gbps=10.0,
        inter_node_gbps=1.0,
        a2a_latency_s=0.0,
    )
    layout = Layout(4, 4, gpus_per_node=2)
    tokens = np.array([[10, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 30]])
    a = make_policy("static", layout).assign(tokens, layout.contiguous())
    flow = traffic(a, 2)
    assert flow.remote_tokens == 0
    per_gpu = model.compute_s(a.slot_tokens, a.placement)
    flops = 2 * 3 * 1000 * 500
    assert per_gpu[3] == pytest.approx(30 * flops / 0.5e12)
    rc = record_cost(model, a, flow, 2, temporary_copies=False, fully_sharded=False, decision_s=0.0)
    assert rc.compute_s == pytest.approx(3 * per_gpu.max())
    tokens = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [7, 5, 0, 0]])  # GPU 3 -> GPUs 0, 1 (other node)
    flow = traffic(make_policy("static", layout).assign(tokens, layout.contiguous()), 2)
    assert flow.send_inter.tolist() == [0, 0, 0, 12] and flow.recv_inter.tolist() == [7, 5, 0, 0]
    assert model.a2a_s(flow) == pytest.approx(12 * 1000 * 2 / 1e9)


def test_replica_traffic_counts_each_replica_once_per_step():
    from megatron_microep.planning.placement import Placement
    from megatron_microep.planning.replica_traffic import replica_step_traffic, replicas_of

    rng = np.random.default_rng(SEED)
    num_gpus, num_experts = 8, 16
    lists = [[e // 2] for e in range(num_experts)]  # homes: two experts per GPU
    for _ in range(10):
        e, g = int(rng.integers(num_experts)), int(rng.integers(num_gpus))
        if g not in lists[e]:
            lists[e].append(g)
    placement = Placement.from_lists(lists, num_gpus)
    expert, home, holder = replicas_of(placement)
    assert sorted(zip(expert.tolist(), holder.tolist())) == sorted(
        (e, g) for e, gpus in enumerate(lists) for g in gpus[1:]
    )
    assert (home == expert // 2).all()
    t = replica_step_traffic(home, holder, params_per_expert=1000, param_bytes=2)
    sent = t.sent(num_gpus)
    for gpu in range(num_gpus):  # weights of its replicated home experts out, fp32 gradients of its replicas out
        copies_of_mine = sum(len(gpus) - 1 for e, gpus in enumerate(lists) if e // 2 == gpu)
        held = sum(gpu in gpus[1:] for gpus in lists)
        assert sent[gpu] == copies_of_mine * 2000 + held * 4000
    assert t.total == sent.sum() == len(expert) * 6000


def test_replica_sync_hidden_behind_compute():
    model = CostModel()
    home, replica = np.array([0, 0]), np.array([1, 9])
    exposed, nbytes = replica_sync(model, home, replica, 16, 8, first_fwd_s=10.0, last_bwd_s=10.0)
    assert exposed == 0.0 and nbytes == 2 * (model.expert_param_bytes + model.params_per_expert * 4)
    exposed, _ = replica_sync(model, home, replica, 16, 8, first_fwd_s=0.0, last_bwd_s=0.0)
    inter = (model.expert_param_bytes + model.params_per_expert * 4) / (model.inter_node_gbps * 1e9)
    assert exposed == pytest.approx(inter)
    # Straight from the home GPU: two replicas in another node cost its link twice.
    exposed, _ = replica_sync(model, home, np.array([8, 9]), 16, 8, first_fwd_s=0.0, last_bwd_s=0.0)
    assert exposed == pytest.approx(2 * inter)


def test_replica_sync_burst_copies_return_gradients_only():
    model = CostModel()
    expert, home, replica = np.array([0, 1]), np.array([0, 8]), np.array([9, 9])
    exposed, nbytes = replica_sync(model, expert, home, replica, 16, 8, 0.0, 0.0, np.array([True, False]))
    assert nbytes == model.expert_param_bytes + 2 * model.expert_grad_bytes
    param_s = model.expert_param_bytes / (model.inter_node_gbps * 1e9)
    grad_s = model.expert_grad_bytes / (model.intra_node_gbps * 1e9)  # GPU 9 -> 8 and 9 -> 0 (inter) overlap
    grad_s = max(grad_s, model.expert_grad_bytes / (model.inter_node_gbps * 1e9))
    assert exposed == pytest.approx(param_s + grad_s)


def test_pushes_beside_dispatch_by_hand():
    """Weights share the links with the dispatch: an NVLink push hides behind an inter-node-bound
    dispatch; what exceeds it, or a push on the busy link, is charged."""
    flat = GemmTable(np.array([1.0, 1e6]), np.array([0.5, 0.5]), "flat")
    model = CostModel(hidden_size=1000, ffn_hidden_size=500, gemm_table=flat, intra_node_gbps=10.0, inter_node_gbps=1.0)
    layout = Layout(4, 4, gpus_per_node=2)
    tokens = np.zeros((4, 4), dtype=np.int64)
    tokens[0, 2] = 1000  # GPU 0 -> GPU 2 (other node): 2 MB over 1 GB/s
    flow = traffic(make_policy("static", layout).assign(tokens, layout.contiguous()), 2)
    dispatch_s = model.a2a_s(flow) - model.a2a_latency_s
    weights = model.expert_param_bytes  # 3 MB
    assert model.pushes_beside_dispatch_s(flow, np.zeros((0, 2), dtype=np.int64), 4, 2) == 0.0
    # NVLink push 0 -> 1: 3 MB over 10 GB/s = 0.3 ms, hidden behind the 2 ms dispatch.
    assert model.pushes_beside_dispatch_s(flow, np.array([[0, 1]]), 4, 2) == 0.0
    # Ten pushes out of GPU 0 inside the node: 3 ms on NVLink, 1 ms beyond the dispatch.
    ten = np.array([[0, 1]] * 10)
    assert model.pushes_beside_dispatch_s(flow, ten, 4, 2) == pytest.approx(10 * weights / 10e9 - dispatch_s)
    # A push on the dispatch's own link adds its whole time.
    assert model.pushes_beside_dispatch_s(flow, np.array([[0, 3]]), 4, 2) == pytest.approx(weights / 1e9)
    a = make_policy("static", layout).assign(tokens, layout.contiguous())
    rc = record_cost(model, a, flow, 2, temporary_copies=False, fully_sharded=False, decision_s=0.0, step_pushes=ten)
    assert rc.weight_move_s == pytest.approx(10 * weights / 10e9 - dispatch_s)
    assert rc.weight_bytes == 10 * weights


class StepCopies(Policy):
    """Adds a scripted copy per micro-batch and keeps it for the step (runs no tokens on it): lets the
    test see what the engine hands back and charges."""

    name = "stepcopies"
    summary = "test stub"
    decides_per_micro_batch = True

    def __init__(self, layout):
        super().__init__(layout, Policy.Params())
        self.seen = []

    def assign(self, tokens, placement):
        raise AssertionError("the engine calls assign_in_step")

    def assign_in_step(self, tokens, placement, held):
        self.seen.append(held.copy())
        new = np.array([[len(held), 8 + len(held)]])  # expert k on GPU 8 + k: inter-node from its home
        copies = np.concatenate([held, new])
        extended = with_copies(placement, copies)
        slot_tokens = np.zeros(extended.num_slots, dtype=np.int64)
        slot_tokens[extended.ptr[:-1]] = tokens.sum(axis=0)
        empty = np.zeros(0, dtype=np.int64)
        return Assignment(tokens, extended, slot_tokens, empty, empty, empty, np.zeros((0, 2), np.int64), copies)


def test_engine_hands_back_step_copies_and_charges_them_once():
    layout = Layout(16, 64, 0, 8)
    _, it = open_trace("gen:lognormal_drift:gpus=16,experts=64,layers=1,micro_batches=8,tokens=1024,topk=4")
    stub = StepCopies(layout)
    cost = CostModel()
    results = Simulation(layout, [stub, make_policy("ideal", layout)], cost, warmup_steps=0).run(it)
    sizes = [len(h) for h in stub.seen]
    assert sizes == [0, 1, 2, 3, 0, 1, 2, 3], "held copies grow within a step and start empty in the next"
    # 4 pushes per step (one new copy per micro-batch), 4 gradient returns per step, no refresh.
    per_step = 4 * cost.expert_param_bytes + 4 * cost.expert_grad_bytes
    assert results[0].weight_bytes == pytest.approx(2 * per_step)
    assert results[0].parts["weight_moves"] > 0 and results[0].parts["replica_sync"] >= 0


def test_downsampler_bounds_rows_and_keeps_means():
    d = Downsampler(rows=4)
    for i in range(100):
        d.add(np.array([i, 1.0]))
    arr = d.array()
    assert len(arr) <= 8
    assert arr[:, 1] == pytest.approx(1.0)
    assert arr[0, 0] < arr[-1, 0]


def run_sim(records, policies=("static", "microep", "ideal"), warmup=1, layout=Layout(16, 64, 2, 4)):
    built = [make_policy(p, layout, **({"time_limit_s": 0.2} if p == "microep" else {})) for p in policies]
    sim = Simulation(layout, built, CostModel(), warmup_steps=warmup)
    return sim, sim.run(records)


def test_engine_layer_order_does_not_matter():
    _, it = open_trace(
        f"gen:lognormal_drift:gpus=16,experts=64,layers=2,micro_batches=12,tokens=1024,topk=4,seed={SEED % 1000}"
    )
    records = list(it)
    step_major = sorted(records, key=lambda r: (r.step, r.micro_batch, r.layer))
    _, a = run_sim(records, ("static", "eplb", "ideal"))
    _, b = run_sim(step_major, ("static", "eplb", "ideal"))
    for x, y in zip(a, b):
        assert x.ratios != [] and sorted(x.ratios) == sorted(y.ratios)
        assert x.remote_tokens == y.remote_tokens and x.weight_bytes == pytest.approx(y.weight_bytes)


def test_engine_metrics_and_warmup():
    _, it = open_trace("gen:lognormal_drift:gpus=16,experts=64,layers=1,micro_batches=12,tokens=1024,topk=4")
    records = list(it)
    sim, results = run_sim(records)
    assert sim.records == 12 and sim.measured_records == 8
    by = {r.name: r for r in results}
    assert len(by["static"].ratios) == 8 and by["static"].measured_steps == {1, 2}
    assert by["microep"].replans == 2 and by["ideal"].replans == 0
    assert max(by["ideal"].ratios) < 1.01
    rows = {r.policy: r for r in summarize(results)}
    assert rows["ideal"].share_of_ideal == pytest.approx(1.0)
    assert rows["static"].max_over_mean_mean > rows["microep"].max_over_mean_mean
    total = sum(int(r.tokens.sum()) for r in records[4:])
    assert by["static"].total_tokens == total
    with pytest.raises(TraceError, match="no records left to measure"):
        run_sim(records[:4])


def test_engine_rejects_out_of_order_and_bad_shapes():
    t = np.ones((16, 64), dtype=np.int64)
    with pytest.raises(TraceError, match=r"record 1: \(step 0, micro_batch 0\) of layer 0 does not come after"):
        run_sim([TraceRecord(0, 0, 0, t), TraceRecord(0, 0, 0, t)])
    with pytest.raises(TraceError, match=r"tokens shape \[16, 8\]"):
        run_sim([TraceRecord(0, 0, 0, np.ones((16, 8), dtype=np.int64))])


def test_explain_wins_names_the_components():
    _, it = open_trace("gen:lognormal_drift:gpus=16,experts=64,layers=1,micro_batches=12,tokens=1024,topk=4")
    rows = summarize(run_sim(list(it), ("static", "microep", "ideal"))[1])
    me = next(r for r in rows if r.policy == "microep")
    rival = type(me)(
        **{
            **me.__dict__,
            "policy": "rival",
            "share_of_ideal": 2.0,
            "max_over_mean_mean": me.max_over_mean_mean - 0.01,
            "parts_per_step": {**me.parts_per_step, "a2a": 0.0},
        }
    )
    notes = explain_wins(rows + [rival])
    assert any("rival has a lower mean max/mean" in n for n in notes)
    assert any("rival has a higher share of ideal" in n and "a2a" in n for n in notes)
