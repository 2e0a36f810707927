"""MicroEP inside Megatron's other process groups, against the stock layer, on 4 CPU ranks (gloo).

One launch re-initialises megatron's parallel state per case: expert-TP x EP (vs the allgather
dispatcher: the alltoall one needs an uneven all-gather that gloo rejects), attention TP with
sequence parallelism, expert data parallelism, and TP + SP with expert-TP. Each case uses skewed
routing with replicas; one case adds biases and SwiGLU, another a shared expert. Same tolerances as the EP parity test.
"""

import os
import random

import pytest
import torch
from _expert_rows import count_expert_rows
from test_microep_parity import HIDDEN, HOT, MICRO_BATCH, NUM_EXPERTS, REL_TOL, SEQ_LEN, _build, _configs, _rel, _run

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo

# name: (parallel sizes, stock dispatcher, config overrides)
CASES = {
    "etp2_ep2": (
        dict(expert_tensor_parallel_size=2, expert_model_parallel_size=2),
        "allgather",
        dict(expert_tensor_parallel_size=2),
    ),
    "tp2_sp_ep2_shared": (
        dict(tensor_model_parallel_size=2, expert_model_parallel_size=2),
        "alltoall",
        dict(
            tensor_model_parallel_size=2,
            sequence_parallel=True,
            expert_tensor_parallel_size=1,
            moe_shared_expert_intermediate_size=24,
        ),
    ),
    "ep2_edp2_swiglu_bias": (
        dict(expert_model_parallel_size=2),
        "alltoall",
        dict(
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=True,
            bias_activation_fusion=False,
        ),
    ),
    "tp2_sp_etp2_ep2": (
        dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=2, expert_model_parallel_size=2),
        "allgather",
        dict(tensor_model_parallel_size=2, sequence_parallel=True, expert_tensor_parallel_size=2),
    ),
}
TOPK = 2
REDUNDANT = 2
EXTRA_COPIES = {0: [1], 1: [1]}  # 8 experts on 2 EP ranks; the hot ones (homed on rank 0) replicated


def _case_rank(rank: int, world_size: int, seed: int):
    from megatron.core import parallel_state

    from megatron_microep.glue.layer import MicroEPMoELayer
    from megatron_microep.planning.placement import Placement, home_gpu

    direction = torch.nn.functional.normalize(torch.ones(HIDDEN), dim=0)
    results = {}
    for name, (sizes, stock_dispatcher, overrides) in CASES.items():
        pg = init_megatron_parallel(seed=seed, **sizes)
        ep = sizes["expert_model_parallel_size"]
        stock_config, micro_config = _configs(ep, TOPK, REDUNDANT, stock_dispatcher, **overrides)
        stock = _build(stock_config, pg)
        micro = _build(micro_config, pg, MicroEPMoELayer)
        with torch.no_grad():
            stock.router.weight[list(HOT)] += 3.0 * direction
        micro.load_state_dict(stock.state_dict(), strict=True)
        placement = Placement.from_lists(
            [[home_gpu(e, NUM_EXPERTS, ep)] + EXTRA_COPIES.get(e, []) for e in range(NUM_EXPERTS)], ep
        )
        micro.set_placement(placement)
        tp = sizes.get("tensor_model_parallel_size", 1)
        # Sequence parallel: each TP rank holds its own S/TP slice, so tokens differ on every rank.
        gen = torch.Generator().manual_seed(seed + 7919 * (rank + 1))
        x = torch.randn(SEQ_LEN // tp, MICRO_BATCH, HIDDEN, generator=gen) + 2.0 * direction
        upstream = torch.randn(SEQ_LEN // tp, MICRO_BATCH, HIDDEN, generator=gen)
        stock.train()
        micro.train()
        ref = _run(stock, x, upstream)
        with count_expert_rows() as expert_rows:
            got = _run(micro, x, upstream)
        results[name] = {
            "stock": ref,
            "micro": got,
            "stats": micro.telemetry.drain(),
            "expert_rows": expert_rows,
            "ranks": (
                parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_model_parallel_rank(),
            ),
        }
    return results


@pytest.fixture(scope="module")
def parallel_run():
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"parallel test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return spawn_gloo(_case_rank, 4, seed, timeout_s=300)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_stock(parallel_run, case):
    for rank, res in enumerate(parallel_run):
        ref_out, ref_xgrad, ref_grads, _ = res[case]["stock"]
        out, xgrad, grads, missing = res[case]["micro"]
        assert not missing, f"{case} rank {rank}: parameters without gradient: {missing}"
        assert set(grads) == set(ref_grads)
        assert _rel(out, ref_out) <= REL_TOL, f"{case} rank {rank}: output rel err {_rel(out, ref_out):.2e}"
        assert _rel(xgrad, ref_xgrad) <= REL_TOL, f"{case} rank {rank}: input grad rel err"
        for name, ref in ref_grads.items():
            err = _rel(grads[name], ref)
            assert err <= REL_TOL, f"{case} rank {rank}: grad of {name} rel err {err:.2e}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_replicas_used(parallel_run, case):
    stats = [s for res in parallel_run for s in res[case]["stats"]]
    assert len(stats) == 4
    assert all(s.max_after < s.max_before for s in stats)
    # On the rows the experts processed (a spy on the expert call): the EP rank holding the hot
    # experts' replicas (EXTRA_COPIES: EP rank 1) ran rows on them, the other EP rank none.
    for rank, res in enumerate(parallel_run):
        calls = res[case]["expert_rows"]
        assert len(calls) == 1, f"{case} rank {rank}: {len(calls)} expert calls"
        replica_rows = calls[0]["replica"]
        if res[case]["ranks"][1] == 1:
            assert replica_rows > 0, f"{case} rank {rank}: replica weights processed no rows"
        else:
            assert replica_rows == 0, f"{case} rank {rank}: {replica_rows} replica rows without replicas"
