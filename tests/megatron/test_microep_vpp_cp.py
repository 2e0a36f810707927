"""Replica mode under virtual pipeline stages and under context parallelism, against stock EP.

One launch of 4 CPU ranks (gloo), two phases; in each, stock EP (alltoall) and MicroEP (one replica
slot per rank, expert 0 hot and copied to EP rank 1, so copies carry tokens) start from the same
weights and train through Megatron's DistributedDataParallel, ``get_megatron_optimizer`` (Adam) and
``get_forward_backward_func``:

- VPP: PP = 2 stages x 2 virtual stages x EP = 2, a 4-layer GPT (dense and MoE layers mixed), one
  model chunk per virtual stage built from ``microep_layer_spec`` (the object Megatron-LM's
  ``--spec`` imports) with ``vp_stage``; the schedule is Megatron's interleaved 1F1B. Checked: every
  chunk holds the same global layers as stock's, the losses and every parameter after each step.
- CP: CP = 2 x EP = 2 (expert data parallelism 2), sequences cut by Megatron's
  ``get_batch_on_this_cp_rank``. Megatron's local attention refuses CP (TransformerEngine's
  context-parallel attention does not run on CPU), so these layers have no attention (IdentityOp,
  as Megatron's MoE-only layer specs): what is checked is the MoE path under CP's process groups
  (EP all-to-all across CP ranks, DDP over data-and-context-parallel and expert-DP groups), not
  the attention.
"""

import os
import random

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from _gpt_case import forward_step, moe_config, skew_router, synthetic_batches  # noqa: E402

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo  # noqa: E402

WORLD = 4
EP, PP, VP, CP = 2, 2, 2, 2
NUM_EXPERTS = 4
PATTERN = [1, 0, 1, 1]  # MoE, dense, MoE, MoE: one layer per virtual stage
PLACEMENT = [[0, 1], [0], [1], [1]]  # expert 0 (home EP rank 0, hot) also on EP rank 1
VOCAB, SEQ_LEN, MICRO_BATCH = 64, 16, 2
MICRO_BATCHES = 4  # a multiple of PP, as the interleaved schedule needs
STEPS = 2
LOSS_TOL = 1e-5
PARAM_REL_TOL = 1e-5


def _config(dispatcher: str, **parallel):
    from megatron_microep.glue.config import MicroEPConfig

    return moe_config(
        dispatcher,
        MicroEPConfig(redundant_slots=1, replan_interval=0),
        num_layers=len(PATTERN),
        num_moe_experts=NUM_EXPERTS,
        moe_layer_freq=PATTERN,
        expert_model_parallel_size=EP,
        pipeline_dtype=torch.float32,
        **parallel,
    )


def _without_attention(block):
    """The block spec with every layer's attention (and its norm and residual add) left out."""
    import dataclasses

    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp

    def strip(layer):
        sub = dataclasses.replace(
            layer.submodules, input_layernorm=IdentityOp, self_attention=IdentityOp, self_attn_bda=IdentityFuncOp
        )
        return dataclasses.replace(layer, submodules=sub)

    return dataclasses.replace(block, layer_specs=[strip(layer) for layer in block.layer_specs])


def _chunks(dispatcher: str, config, vp_size: int, attention: bool, state=None):
    """This rank's model chunks (one per virtual stage): stock weights skewed to expert 0, or ``state``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_microep.glue import compat
    from megatron_microep.glue.layer import microep_layers
    from megatron_microep.glue.spec import microep_layer_spec, swap_moe_layers
    from megatron_microep.planning.placement import Placement

    stage, stages = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    chunks = []
    for vp_stage in range(vp_size):
        vp_stage_arg = vp_stage if vp_size > 1 else None
        if attention and dispatcher == "microep":
            spec = microep_layer_spec
        else:
            spec = compat.stock_decoder_block_spec(config, False, vp_stage=vp_stage_arg)
            if not attention:
                spec = _without_attention(spec)
            if dispatcher == "microep":
                spec = swap_moe_layers(spec)
        chunks.append(
            GPTModel(
                config,
                spec,
                vocab_size=VOCAB,
                max_sequence_length=SEQ_LEN,
                pre_process=stage == 0 and vp_stage == 0,
                post_process=stage == stages - 1 and vp_stage == vp_size - 1,
                # Without attention nothing would apply RoPE (whose CP split pins memory, CUDA-only).
                position_embedding_type="rope" if attention else "none",
                vp_stage=vp_stage_arg,
            )
        )
    for i, chunk in enumerate(chunks):
        if state is None:
            skew_router(chunk, [0])
        else:
            chunk.load_state_dict(state[i], strict=True)
    for layer in microep_layers(chunks):
        layer.set_placement(Placement.from_lists(PLACEMENT, EP))
    return chunks


def _wrap(chunks, config):
    """Megatron's DDP per chunk and one optimizer over them, wired into the config as Megatron-LM does."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    ddps = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0) for i, chunk in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=1.0), ddps)
    config.no_sync_func = [d.no_sync for d in ddps] if len(ddps) > 1 else ddps[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return ddps, optimizer


def _cp_forward_step(data_iterator, model):
    """``forward_step`` on this context-parallel rank's part of the sequence (Megatron's split)."""
    import inspect

    from megatron.core.utils import get_batch_on_this_cp_rank

    tokens, labels, positions, mask = next(data_iterator)
    # From 0.19 the function also serves hybrid CP and asks which one it is.
    hybrid = (
        {"is_hybrid_cp": False} if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters else {}
    )
    part = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels, "position_ids": positions}, **hybrid)
    return forward_step(iter([(part["tokens"], part["labels"], part["position_ids"], mask)]), model)


def _train(ddps, optimizer, seed: int, step_func):
    """STEPS optimizer steps through get_forward_backward_func (one data iterator per chunk over the same
    micro-batches); per step the mean micro-batch loss on the last stage (None elsewhere) and the parameters."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from test_megatron_training_stack import _params

    from megatron_microep.glue.layer import set_training_step

    schedule = get_forward_backward_func()
    losses, params = [], []
    for step in range(1, STEPS + 1):
        set_training_step(step)
        for ddp in ddps:
            ddp.zero_grad_buffer()
        optimizer.zero_grad()
        seed_here = seed + 1000 * step + parallel_state.get_data_parallel_rank()
        batches = synthetic_batches(seed_here, VOCAB, SEQ_LEN, MICRO_BATCH, MICRO_BATCHES)
        results = schedule(
            forward_step_func=step_func,
            data_iterator=[iter(batches) for _ in ddps] if len(ddps) > 1 else iter(batches),
            model=ddps,
            num_microbatches=MICRO_BATCHES,
            seq_length=SEQ_LEN,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        assert optimizer.step()[0]
        losses.append(sum(r["lm loss"].item() for r in results) / len(results) if results else None)
        params.append({f"{i}.{n}": p for i, ddp in enumerate(ddps) for n, p in _params(ddp).items()})
    return schedule.__name__, losses, params


def _phase(seed: int, vp_size: int, attention: bool, step_func, **parallel) -> dict:
    from test_megatron_training_stack import _rel, _state

    from megatron_microep.glue.layer import microep_layers

    stock_config, micro_config = _config("alltoall", **parallel), _config("microep", **parallel)
    stock = _chunks("alltoall", stock_config, vp_size, attention)
    micro = _chunks("microep", micro_config, vp_size, attention, state=[_state(c) for c in stock])
    layers = [[(layer.layer_number, type(layer.mlp).__name__) for layer in c.decoder.layers] for c in micro]
    stock_layers = [[layer.layer_number for layer in c.decoder.layers] for c in stock]
    stock_ddps, stock_opt = _wrap(stock, stock_config)
    schedule, stock_losses, stock_params = _train(stock_ddps, stock_opt, seed, step_func)
    micro_ddps, micro_opt = _wrap(micro, micro_config)
    _, micro_losses, micro_params = _train(micro_ddps, micro_opt, seed, step_func)
    return {
        "schedule": schedule,
        "layers": layers,
        "stock_layer_numbers": stock_layers,
        "stock_losses": stock_losses,
        "micro_losses": micro_losses,
        "param_rel": [{n: _rel(m[n], p) for n, p in s.items()} for s, m in zip(stock_params, micro_params)],
        "replica_tokens": sum(s.replica_tokens for layer in microep_layers(micro) for s in layer.telemetry.drain()),
    }


def _rank(rank: int, world_size: int, seed: int):
    from megatron.core import parallel_state

    init_megatron_parallel(
        pipeline_model_parallel_size=PP,
        virtual_pipeline_model_parallel_size=VP,
        expert_model_parallel_size=EP,
        seed=seed,
    )
    vpp = _phase(seed, VP, True, forward_step, pipeline_model_parallel_size=PP, virtual_pipeline_model_parallel_size=VP)
    vpp["stage"] = parallel_state.get_pipeline_model_parallel_rank()
    init_megatron_parallel(context_parallel_size=CP, expert_model_parallel_size=EP, seed=seed)
    cp = _phase(seed, 1, False, _cp_forward_step, context_parallel_size=CP)
    cp["groups"] = {
        "cp": parallel_state.get_context_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "expert_dp": parallel_state.get_expert_data_parallel_world_size(),
    }
    return {"vpp": vpp, "cp": cp}


@pytest.fixture(scope="module")
def run():
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"VPP/CP test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return spawn_gloo(_rank, WORLD, seed, timeout_s=600)


def _assert_parity(results, phase):
    for rank, res in enumerate(results):
        out = res[phase]
        assert len(out["micro_losses"]) == STEPS
        for micro, stock in zip(out["micro_losses"], out["stock_losses"]):
            assert (micro is None) == (stock is None)
            assert micro is None or abs(micro - stock) <= LOSS_TOL, f"rank {rank}: {out['micro_losses']} vs stock"
        for step, rel in enumerate(out["param_rel"]):
            bad = {n: r for n, r in rel.items() if r > PARAM_REL_TOL}
            assert not bad, f"rank {rank}, step {step + 1}: parameters off stock {bad}"
    assert sum(r[phase]["replica_tokens"] for r in results) > 0
    assert any(loss is not None for r in results for loss in r[phase]["micro_losses"])


def test_virtual_pipeline_chunks_hold_stock_layers(run):
    # Megatron's interleaved placement: stage 0 holds global layers 1 and 3, stage 1 layers 2 and 4.
    expected = {
        0: [[(1, "MicroEPMoELayer")], [(3, "MicroEPMoELayer")]],
        1: [[(2, "MLP")], [(4, "MicroEPMoELayer")]],
    }
    for res in run:
        assert res["vpp"]["schedule"] == "forward_backward_pipelining_with_interleaving"
        assert res["vpp"]["layers"] == expected[res["vpp"]["stage"]]
        assert res["vpp"]["stock_layer_numbers"] == [[n for n, _ in chunk] for chunk in res["vpp"]["layers"]]


def test_virtual_pipeline_interleaved_1f1b_matches_stock(run):
    _assert_parity(run, "vpp")


def test_context_parallel_matches_stock(run):
    for res in run:
        assert res["cp"]["groups"] == {"cp": CP, "ep": EP, "expert_dp": 2}
        assert res["cp"]["schedule"] == "forward_backward_no_pipelining"
    _assert_parity(run, "cp")
