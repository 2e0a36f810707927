"""Multi-token prediction (DeepSeek-V3's MTP, ``mtp_num_layers=1``) with MicroEP and FSEP layers, against stock.

One launch of 2 CPU ranks (gloo, EP = 2). The MTP block comes from ``microep_mtp_block_spec``, so its
MoE layer is MicroEP's like the decoder's; routing is skewed to expert 0 and every MicroEP layer,
the MTP one included, holds a copy of expert 0 on EP rank 1, so copies carry tokens. Stock EP
(alltoall, Megatron's own MTP block spec) and MicroEP train from the same weights through Megatron's
DistributedDataParallel, ``get_megatron_optimizer`` and ``get_forward_backward_func`` (which scales
the MTP loss as Megatron-LM does), once with replicas (``--microep-redundant-slots 1``) and once
with FSEP shards. Checked: the first step's main gradients of every parameter (FSEP shards against
the same slices of stock's expert gradients), the language-model loss and Megatron's own MTP loss
(its logging tracker) every step, and the parameters after the last step.

Also in the launch: ``build_mtp_blocks_with_microep`` swaps the MTP block's MoE layer of a Megatron
builder's ``get_gpt_mtp_block_spec`` for the microep dispatcher only, idempotently.
"""

import os
import random
import types

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from _gpt_case import forward_step, gpt_model, moe_config, synthetic_batches  # noqa: E402

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo  # noqa: E402

WORLD = EP = 2
NUM_EXPERTS = 4
HOT = (0,)
PLACEMENT = [[0, 1], [0], [1], [1]]  # expert 0 (home EP rank 0, hot) also on EP rank 1
VOCAB, SEQ_LEN, MICRO_BATCH, MICRO_BATCHES = 64, 16, 2, 2
STEPS = 3
LOSS_TOL = 1e-5
REL_TOL = 1e-5
MODES = ("replicas", "fsep")


def _config(dispatcher: str, mode: str):
    from megatron_microep.glue.config import MicroEPConfig

    sharding = "fsep" if mode == "fsep" else "none"
    return moe_config(
        dispatcher,
        MicroEPConfig(redundant_slots=1, replan_interval=0, expert_sharding=sharding),
        num_layers=2,
        num_moe_experts=NUM_EXPERTS,
        expert_model_parallel_size=EP,
        gated_linear_unit=True,
        mtp_num_layers=1,
        mtp_loss_scaling_factor=0.5,
    )


def _model(dispatcher: str, mode: str, seed: int):
    """GPTModel with an MTP block: Megatron's MTP spec from the last decoder layer's for stock,
    ``microep_mtp_block_spec`` for MicroEP; the same seed gives the same weights."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    from megatron_microep.glue import compat
    from megatron_microep.glue.layer import microep_layers
    from megatron_microep.glue.spec import microep_mtp_block_spec
    from megatron_microep.planning.placement import Placement

    config = _config(dispatcher, mode)
    if dispatcher == "microep":
        mtp = microep_mtp_block_spec(config, use_transformer_engine=False)
    else:
        mtp = get_gpt_mtp_block_spec(config, compat.stock_decoder_layer_specs(config, False)[-1], False)
    model = gpt_model(config, seed, VOCAB, SEQ_LEN, HOT, mtp_block_spec=mtp)
    for layer in microep_layers(model):
        layer.set_placement(Placement.from_lists(PLACEMENT, EP))
    return model, config


def _mtp_loss_and_reset() -> float:
    """Megatron's own record of the MTP loss (summed over the step's micro-batches), then cleared."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    values = tracker.get("loss_values", tracker.get("values"))  # 0.19 on / before
    total = float(values.sum())
    tracker.clear()
    return total


def _train(ddp, optimizer, seed: int):
    """STEPS steps through get_forward_backward_func; per step (LM loss, MTP loss), and the main
    gradients of the first step."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_microep.glue.layer import set_training_step

    losses, first_grads = [], None
    for step in range(1, STEPS + 1):
        set_training_step(step)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        batches = synthetic_batches(seed + 1000 * step + dist.get_rank(), VOCAB, SEQ_LEN, MICRO_BATCH, MICRO_BATCHES)
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[ddp],
            num_microbatches=MICRO_BATCHES,
            seq_length=SEQ_LEN,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        if first_grads is None:
            first_grads = {n: p.main_grad.detach().clone() for n, p in ddp.module.named_parameters()}
        assert optimizer.step()[0]
        losses.append((sum(r["lm loss"].item() for r in results) / len(results), _mtp_loss_and_reset()))
    return losses, first_grads


def _parity(mode: str, seed: int) -> dict:
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from test_fsep_gpt import _expert_grads_as_shards
    from test_megatron_training_stack import _params, _rel, _wrap

    from megatron_microep.glue import compat
    from megatron_microep.glue.fsep import fsep_layers, full_experts
    from megatron_microep.glue.layer import MicroEPMoELayer

    stock, stock_config = _model("alltoall", mode, seed)
    micro, micro_config = _model("microep", mode, seed)
    mtp_mlp = micro.mtp.layers[0].modules()
    mtp_layers = [m for m in mtp_mlp if isinstance(m, MicroEPMoELayer)]
    stock_ddp, stock_opt = _wrap(stock, stock_config, overlap=False, distributed_optimizer=False)
    micro_ddp, micro_opt = _wrap(micro, micro_config, overlap=False, distributed_optimizer=False)
    stock_losses, stock_grads = _train(stock_ddp, stock_opt, seed)
    micro_losses, micro_grads = _train(micro_ddp, micro_opt, seed)
    out = {
        "stock_losses": stock_losses,
        "micro_losses": micro_losses,
        "moe_layers": [type(m).__name__ for m in micro.modules() if isinstance(m, MoELayer)],
        "mtp_moe_layers": [type(m).__name__ for m in mtp_layers],
        "mtp_replica_tokens": sum(s.replica_tokens for m in mtp_layers for s in m.telemetry.drain()),
    }
    stock_params, micro_params = _params(stock_ddp), _params(micro_ddp)
    if mode == "replicas":
        out["grad_rel"] = {n: _rel(micro_grads[n], g) for n, g in stock_grads.items()}
        out["param_rel"] = {n: _rel(micro_params[n], p) for n, p in stock_params.items()}
        return out
    layers = fsep_layers(micro_ddp)
    shards = _expert_grads_as_shards(stock_ddp, layers)  # stock's expert main gradients of the last step
    out["grad_rel"] = {n: _rel(micro_grads[n], g) for n, g in stock_grads.items() if n in micro_grads}
    out["shard_grad_rel"] = [_rel(layer.experts.shards.main_grad, ref) for layer, ref in zip(layers, shards)]
    out["param_rel"] = {n: _rel(micro_params[n], p) for n, p in stock_params.items() if n in micro_params}
    stock_moe = [m for m in stock_ddp.module.modules() if isinstance(m, MoELayer)]
    out["expert_param_rel"] = []
    for stock_layer, layer in zip(stock_moe, layers):
        full = full_experts(layer)
        mine = compat.expert_tensors(stock_layer.experts)
        ep_rank, n = layer.microep_groups.ep_rank, len(mine)
        for i, tensor in enumerate(full):
            local = torch.stack([t[i].detach() for t in mine])
            out["expert_param_rel"].append(_rel(tensor[ep_rank * n : (ep_rank + 1) * n], local))
    out["non_expert_names_equal"] = sorted(n for n in stock_params if ".experts." not in n) == sorted(
        n for n in micro_params if ".experts." not in n
    )
    return out


def _builder_hook() -> dict:
    """build_mtp_blocks_with_microep on a module namespace holding Megatron's function, as gpt_builders does."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_microep.glue import compat
    from megatron_microep.glue.layer import MicroEPMoELayer
    from megatron_microep.glue.spec import build_mtp_blocks_with_microep

    def mlp_class(block):
        (layer,) = block.layer_specs
        inner = getattr(layer.submodules, "mtp_model_layer", None) or layer.submodules.transformer_layer
        mlp = inner.submodules.mlp
        return getattr(mlp, "module", None) or mlp.func

    builders = types.ModuleType("gpt_builders")
    builders.get_gpt_mtp_block_spec = get_gpt_mtp_block_spec
    build_mtp_blocks_with_microep(builders)
    patched = builders.get_gpt_mtp_block_spec
    build_mtp_blocks_with_microep(builders)
    micro_config, stock_config = _config("microep", "replicas"), _config("alltoall", "replicas")
    last = compat.stock_decoder_layer_specs(micro_config, False)[-1]
    return {
        "idempotent": builders.get_gpt_mtp_block_spec is patched,
        "microep": mlp_class(builders.get_gpt_mtp_block_spec(micro_config, last, False)) is MicroEPMoELayer,
        "stock": mlp_class(builders.get_gpt_mtp_block_spec(stock_config, last, False)) is MoELayer,
        "megatron_untouched": get_gpt_mtp_block_spec is not patched,
    }


def _mtp_rank(rank: int, world_size: int, seed: int):
    init_megatron_parallel(expert_model_parallel_size=EP, seed=seed)
    return {"builder": _builder_hook(), **{mode: _parity(mode, seed) for mode in MODES}}


@pytest.fixture(scope="module")
def mtp_run():
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"MTP test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return spawn_gloo(_mtp_rank, WORLD, seed, timeout_s=600)


@pytest.mark.parametrize("mode", MODES)
def test_mtp_block_is_built_with_microep_layers(mtp_run, mode):
    expected = "FSEPMoELayer" if mode == "fsep" else "MicroEPMoELayer"
    for res in mtp_run:
        assert res[mode]["moe_layers"] == [expected] * 3  # two decoder layers and the MTP layer
        assert res[mode]["mtp_moe_layers"] == [expected]
    assert sum(res[mode]["mtp_replica_tokens"] for res in mtp_run) > 0  # the MTP layer's copies carried tokens


@pytest.mark.parametrize("mode", MODES)
def test_losses_and_mtp_losses_match_stock(mtp_run, mode):
    for rank, res in enumerate(mtp_run):
        stock, micro = res[mode]["stock_losses"], res[mode]["micro_losses"]
        assert len(micro) == STEPS
        for (lm, mtp), (ref_lm, ref_mtp) in zip(micro, stock):
            assert abs(lm - ref_lm) <= LOSS_TOL, f"rank {rank}: LM losses {micro} vs {stock}"
            assert abs(mtp - ref_mtp) <= LOSS_TOL, f"rank {rank}: MTP losses {micro} vs {stock}"
            assert ref_mtp > 0


@pytest.mark.parametrize("mode", MODES)
def test_gradients_and_parameters_match_stock(mtp_run, mode):
    for rank, res in enumerate(mtp_run):
        out = res[mode]
        assert any(n.startswith("mtp.") for n in out["grad_rel"])
        bad = {n: r for n, r in out["grad_rel"].items() if r > REL_TOL}
        assert not bad, f"rank {rank} first-step gradients: {bad}"
        bad = {n: r for n, r in out["param_rel"].items() if r > REL_TOL}
        assert not bad, f"rank {rank} parameters after {STEPS} steps: {bad}"
        if mode == "fsep":
            assert out["non_expert_names_equal"]
            assert len(out["shard_grad_rel"]) == 3 and max(out["shard_grad_rel"]) <= REL_TOL
            assert max(out["expert_param_rel"]) <= REL_TOL


def test_megatron_builders_get_microep_mtp_layers_for_the_microep_dispatcher_only(mtp_run):
    for res in mtp_run:
        assert res["builder"] == {"idempotent": True, "microep": True, "stock": True, "megatron_untouched": True}
