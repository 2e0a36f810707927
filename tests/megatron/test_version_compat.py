"""What differs per megatron-core version in the experts MicroEP reads (glue/compat.py), on the running
version (CI: 0.16.1, 0.19.2, and 0.20.0 from Megatron-LM main).

- SwiGLU clamping: stock clamps in its unfused activation on every version and in its fused SwiGLU
  kernel (``bias_activation_fusion``) only from 0.20. One gloo launch (EP = 2, replicas in use): for
  fused and unfused, a stock MoELayer and a MicroEPMoELayer with a clamp that bites must agree on the
  output and every gradient, and stock's fused output must equal its clamped unfused output exactly
  when the version clamps there.
- TE's single grouped expert parameters (0.20) are rejected by name when MicroEP reads the experts
  module (the settings: tests/megatron/test_rejections.py).
"""

import os
import random
import types

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from test_microep_parity import HIDDEN, MICRO_BATCH, NUM_EXPERTS, REL_TOL, SEQ_LEN, _build, _configs, _rel, _run  # noqa: E402

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo  # noqa: E402

CLAMP = 0.02  # well inside the range of the fc1 outputs below, so it changes the result
FUSIONS = (False, True)


def _clamp_rank(rank: int, world_size: int, seed: int):
    import torch.nn.functional as F

    from megatron_microep.glue import compat
    from megatron_microep.glue.layer import MicroEPMoELayer
    from megatron_microep.planning.placement import Placement, home_gpu

    # Megatron's fused SwiGLU is wrapped in torch.compile; run it eagerly (same operations).
    torch._dynamo.config.disable = True
    pg = init_megatron_parallel(expert_model_parallel_size=world_size, seed=seed)
    replicas = [[home_gpu(e, NUM_EXPERTS, world_size)] for e in range(NUM_EXPERTS)]
    replicas[0].append(1)  # expert 0 (home rank 0) also on rank 1
    placement = Placement.from_lists(replicas, world_size)
    gen = torch.Generator().manual_seed(seed + 7919 * (rank + 1))
    direction = torch.nn.functional.normalize(torch.ones(HIDDEN), dim=0)
    x = torch.randn(SEQ_LEN, MICRO_BATCH, HIDDEN, generator=gen) + 2.0 * direction
    upstream = torch.randn(SEQ_LEN, MICRO_BATCH, HIDDEN, generator=gen)
    swiglu = dict(gated_linear_unit=True, activation_func=F.silu, init_method_std=0.05)
    results = {"version": compat.MCORE_VERSION}
    reference = None
    for fused in (None, *FUSIONS):  # None: stock without a clamp
        clamp = None if fused is None else CLAMP
        stock_config, micro_config = _configs(
            world_size, 2, 1, activation_func_clamp_value=clamp, bias_activation_fusion=bool(fused), **swiglu
        )
        stock = _build(stock_config, pg)
        if reference is None:
            with torch.no_grad():  # skew the routing towards expert 0, whose replica is on rank 1
                stock.router.weight[0] += 3.0 * direction
            reference = {k: v.clone() if torch.is_tensor(v) else v for k, v in stock.state_dict().items()}
        stock.load_state_dict(reference, strict=True)
        stock.train()
        ref = _run(stock, x, upstream)
        if fused is None:
            results["unclamped"] = ref[0]
            continue
        micro = _build(micro_config, pg, MicroEPMoELayer)
        micro.load_state_dict(reference, strict=True)
        micro.set_placement(placement)
        micro.train()
        results[fused] = {
            "stock": ref,
            "micro": _run(micro, x, upstream),
            "math_clamp": compat.expert_math(micro_config).clamp,
            "replica_tokens": sum(s.replica_tokens for s in micro.telemetry.drain()),
        }
    return results


@pytest.fixture(scope="module")
def clamp_run():
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"clamp test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return spawn_gloo(_clamp_rank, 2, seed, timeout_s=240)


@pytest.mark.parametrize("fused", FUSIONS, ids=["unfused", "fused"])
def test_swiglu_clamp_matches_stock_on_this_version(clamp_run, fused):
    for rank, res in enumerate(clamp_run):
        ref_out, ref_xgrad, ref_grads, _ = res[fused]["stock"]
        out, xgrad, grads, missing = res[fused]["micro"]
        assert not missing and set(grads) == set(ref_grads)
        assert _rel(out, ref_out) <= REL_TOL, f"rank {rank}: output rel err {_rel(out, ref_out):.2e}"
        assert _rel(xgrad, ref_xgrad) <= REL_TOL, f"rank {rank}: input grad rel err {_rel(xgrad, ref_xgrad):.2e}"
        for name, ref in ref_grads.items():
            assert _rel(grads[name], ref) <= REL_TOL, (
                f"rank {rank}: grad of {name} rel err {_rel(grads[name], ref):.2e}"
            )
    assert sum(res[fused]["replica_tokens"] for res in clamp_run) > 0, "the replica carried no tokens"


def test_stock_clamps_in_the_fused_swiglu_from_0_20(clamp_run):
    for res in clamp_run:
        unfused, fused, unclamped = res[False]["stock"][0], res[True]["stock"][0], res["unclamped"]
        assert _rel(unfused, unclamped) > 1e-3, "the clamp does not bite: the test would not see it"
        clamps_when_fused = res["version"] >= (0, 20)
        assert torch.allclose(fused, unfused, rtol=1e-5, atol=1e-7) == clamps_when_fused
        assert torch.allclose(fused, unclamped, rtol=1e-5, atol=1e-7) == (not clamps_when_fused)
        assert res[True]["math_clamp"] == (CLAMP if clamps_when_fused else None)
        assert res[False]["math_clamp"] == CLAMP


@pytest.mark.parametrize("name", ["moe_single_grouped_weight", "moe_single_grouped_bias"])
def test_a_single_grouped_expert_parameter_is_refused_by_name(name):
    """The settings are refused by glue/config.py's registry (tests/megatron/test_rejections.py); a
    TEGroupedMLP whose GroupedLinear holds one grouped parameter (TE's attribute, set by 0.20) is
    refused when MicroEP reads its experts."""
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    from megatron_microep.glue.compat import expert_tensors
    from megatron_microep.glue.config import MicroEPConfigError

    experts = TEGroupedMLP.__new__(TEGroupedMLP)
    torch.nn.Module.__init__(experts)
    experts.config = types.SimpleNamespace()
    experts.num_local_experts = 2
    experts.linear_fc1, experts.linear_fc2 = torch.nn.Module(), torch.nn.Module()
    for i in range(2):  # what expert_tensors reads when the experts are stored one by one
        experts.linear_fc1.register_parameter(f"weight{i}", torch.nn.Parameter(torch.zeros(8, 4)))
        experts.linear_fc2.register_parameter(f"weight{i}", torch.nn.Parameter(torch.zeros(4, 4)))
    assert len(expert_tensors(experts)) == 2
    setattr(experts.linear_fc2, name.removeprefix("moe_"), True)
    with pytest.raises(MicroEPConfigError, match="--" + name.replace("_", "-") + " cannot be used"):
        expert_tensors(experts)
