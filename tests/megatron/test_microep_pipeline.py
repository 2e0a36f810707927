"""``microep_layer_spec`` under pipeline parallelism: 4 CPU ranks, PP = 2 stages x EP = 2.

A 4-layer GPT with dense and MoE layers mixed (``moe_layer_freq`` [1, 0, 1, 1]) is built per stage
from the spec object Megatron-LM's ``--spec`` would import, and from Megatron's own block spec. On
each stage the MicroEP model must hold the same layers (global numbers, dense or MoE, parameter
names and shapes) and, with the same weights, give the same stage output and gradients with
replicas in use: stage 0 from tokens, stage 1 from an input activation through the loss.
"""

import os
import random

import pytest
import torch
from _expert_rows import count_expert_rows
from test_microep_parity import REL_TOL, _rel

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo

PP, EP = 2, 2
NUM_EXPERTS = 4
VOCAB, SEQ_LEN, MICRO_BATCH, HIDDEN = 64, 16, 2, 32
PATTERN = [1, 0, 1, 1]


def _config(dispatcher):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_microep.glue.config import MicroEPConfig, attach_microep_config

    config = TransformerConfig(
        num_layers=len(PATTERN),
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=64,
        moe_ffn_hidden_size=32,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=2,
        moe_layer_freq=PATTERN,
        moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=EP,
        pipeline_model_parallel_size=PP,
        add_bias_linear=False,
        use_cpu_initialization=False,
        transformer_impl="local",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,
        moe_router_load_balancing_type="none",
        pipeline_dtype=torch.float32,
    )
    if dispatcher == "microep":
        attach_microep_config(config, MicroEPConfig(redundant_slots=1, replan_interval=0))
    return config


def _pipeline_rank(rank, world_size, seed):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_microep.glue.layer import MicroEPMoELayer, microep_layers
    from megatron_microep.glue.spec import microep_layer_spec
    from megatron_microep.planning.placement import Placement

    init_megatron_parallel(pipeline_model_parallel_size=PP, expert_model_parallel_size=EP, seed=seed)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    first, last = stage == 0, stage == PP - 1
    stock_config, micro_config = _config("alltoall"), _config("microep")
    kwargs = dict(
        vocab_size=VOCAB,
        max_sequence_length=SEQ_LEN,
        pre_process=first,
        post_process=last,
        position_embedding_type="rope",
    )
    stock = GPTModel(
        stock_config,
        get_gpt_decoder_block_spec(stock_config, use_transformer_engine=False, normalization="LayerNorm"),
        **kwargs,
    )
    micro = GPTModel(micro_config, microep_layer_spec, **kwargs)
    with torch.no_grad():
        for name, buffer in stock.named_buffers():
            if name.endswith("router.expert_bias"):
                buffer.zero_()
                buffer[0] = 0.6  # expert 0 (EP rank 0) is hot
    micro.load_state_dict(stock.state_dict(), strict=True)
    for layer in microep_layers(micro):
        layer.set_placement(Placement.from_lists([[0, 1], [0], [1], [1]], EP))

    def layers(model):
        return [(layer.layer_number, type(layer.mlp).__name__) for layer in model.decoder.layers]

    gen = torch.Generator().manual_seed(seed + rank)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ_LEN), generator=gen)
    positions = torch.arange(SEQ_LEN)[None].expand(MICRO_BATCH, SEQ_LEN)
    mask = torch.triu(torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool), diagonal=1)[None, None]
    activation = torch.randn(SEQ_LEN, MICRO_BATCH, HIDDEN, generator=gen)
    upstream = torch.randn(SEQ_LEN, MICRO_BATCH, HIDDEN, generator=gen)

    def run(model):
        model.train()
        if first:
            out = model(tokens, positions, mask)
            (out * upstream).sum().backward()
            grad_in = None
        else:
            x = activation.clone().requires_grad_(True)
            model.set_input_tensor(x)
            out = model(None, positions, mask, labels=tokens).float().mean()
            out.backward()
            grad_in = x.grad
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grad_in, grads

    ref = run(stock)
    with count_expert_rows() as expert_rows:
        got = run(micro)
    return {
        "stage": stage,
        "stock_layers": layers(stock),
        "micro_layers": layers(micro),
        "is_moe": [isinstance(layer.mlp, MoELayer) for layer in micro.decoder.layers],
        "is_microep": [isinstance(layer.mlp, MicroEPMoELayer) for layer in micro.decoder.layers],
        "shapes": (
            {n: tuple(p.shape) for n, p in stock.named_parameters()},
            {n: tuple(p.shape) for n, p in micro.named_parameters()},
        ),
        "ref": ref,
        "got": got,
        "expert_rows": expert_rows,
        "ep_rank": parallel_state.get_expert_model_parallel_rank(),
    }


@pytest.fixture(scope="module")
def pipeline_run():
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"pipeline test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return spawn_gloo(_pipeline_rank, PP * EP, seed, timeout_s=240)


def test_each_stage_builds_its_own_layers(pipeline_run):
    per_stage = {0: [(1, "MicroEPMoELayer"), (2, "MLP")], 1: [(3, "MicroEPMoELayer"), (4, "MicroEPMoELayer")]}
    for res in pipeline_run:
        assert res["micro_layers"] == per_stage[res["stage"]]
        assert [n for n, _ in res["stock_layers"]] == [n for n, _ in res["micro_layers"]]
        assert res["is_moe"] == res["is_microep"]  # every MoE layer is MicroEP's, and only those
        assert res["shapes"][0] == res["shapes"][1]


def test_each_stage_matches_stock(pipeline_run):
    for rank, res in enumerate(pipeline_run):
        (ref_out, ref_in, ref_grads), (out, grad_in, grads) = res["ref"], res["got"]
        assert _rel(out, ref_out) <= REL_TOL, f"rank {rank}: output"
        if ref_in is not None:
            assert _rel(grad_in, ref_in) <= REL_TOL, f"rank {rank}: input activation grad"
        assert set(grads) == set(ref_grads)
        for name, ref in ref_grads.items():
            assert _rel(grads[name], ref) <= REL_TOL, f"rank {rank}: grad of {name} {_rel(grads[name], ref):.2e}"
        # On the rows the experts processed (a spy on the expert call): each MoE layer of the stage
        # ran once; the replica of expert 0 (on EP rank 1) ran rows there, nothing ran on EP rank 0.
        calls = res["expert_rows"]
        assert len(calls) == sum(res["is_microep"]), f"rank {rank}: {len(calls)} expert calls"
        replica_rows = [call["replica"] for call in calls]
        assert all(replica_rows) if res["ep_rank"] == 1 else not any(replica_rows), f"rank {rank}: {replica_rows}"
