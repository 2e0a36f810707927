"""Building FSEP models runs no collective: on the CPU and then moved, lazily at the first forward, on the meta device.

2 CPU ranks (gloo), EP = 2, a 2-layer MoE GPTModel with FSEP layers, every collective call recorded
by a spy on torch.distributed:
- built on the CPU (``use_cpu_initialization``): construction calls no collective and the layers
  still hold the stock experts; the move (``model.cpu()``, the call Megatron-LM's ``model.cuda()``
  makes) cuts them into shards with one all-to-all per layer on the shard group, and the shards hold
  exactly the experts stock EP builds from the same seed;
- never moved: the first forward cuts them (one all-to-all per layer before the layer's gather),
  with the same output as the moved model;
- a 16-bit model wrapped by DDP before its shards were cut is refused with a message (its
  optimizer would keep placeholder fp32 main parameters);
- built on the meta device: no collective, nothing to cut, shards of the right shape; after
  ``to_empty`` (no collective either) a state dict loads into it and the experts are the saved ones.
"""

import os
import random

import pytest
import torch
from _gpt_case import fsep_moe_config, gpt_model, stock_full_experts, synthetic_batches

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo
from megatron_microep.runtime.comm_spy import CollectiveSpy

EP, NUM_EXPERTS, VOCAB, SEQ_LEN = 2, 4, 64, 16


def _config(dispatcher: str, dtype=torch.float32):
    return fsep_moe_config(
        "keep" if dispatcher == "microep" else None,
        dict(redundant_slots=1),
        num_layers=2,
        num_moe_experts=NUM_EXPERTS,
        expert_model_parallel_size=EP,
        use_cpu_initialization=True,
        # Megatron's default router (softmax scores, no expert bias), as this test has always built it.
        moe_router_score_function="softmax",
        moe_router_enable_expert_bias=False,
        moe_router_bias_update_rate=1e-3,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
    )


def _build(dispatcher: str, seed: int, spy: CollectiveSpy, dtype=torch.float32):
    """(model, collectives called while building it)."""
    config = _config(dispatcher, dtype)
    with spy.active():
        start = len(spy.calls)
        model = gpt_model(config, seed, VOCAB, SEQ_LEN, [0])
        return model, spy.calls[start:]


def _stock_experts(model):
    """Every expert's full tensors [E, *shape] of each MoE layer of a stock model (all-gather over EP)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [stock_full_experts(moe) for moe in model.modules() if isinstance(moe, MoELayer)]


def _forward(model, seed):
    tokens, labels, positions, mask = synthetic_batches(seed, VOCAB, SEQ_LEN, 2, 1)[0]
    with torch.no_grad():
        return model(tokens, positions, mask, labels=labels)


def _shard_group_calls(calls, layers):
    from megatron_microep.runtime.fsep import shard_group

    group = shard_group(layers[0].microep_groups.ep)
    return [c.op for c in calls if c.group is group]


def _rank(rank, world_size, seed):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_microep.glue.fsep import FSEPShardsError, fsep_layers, full_experts
    from megatron_microep.glue.layer import set_training_step

    init_megatron_parallel(expert_model_parallel_size=EP, seed=seed)
    set_training_step(1)
    spy = CollectiveSpy()
    out = {}

    # On the CPU, then moved.
    stock, _ = _build("alltoall", seed, spy)
    moved, calls = _build("microep", seed, spy)
    layers = fsep_layers(moved)
    out["cpu_build_calls"] = [c.op for c in calls]
    out["pending_after_build"] = [layer.experts.pending for layer in layers]
    with spy.active():
        start = len(spy.calls)
        moved.cpu()
        out["move_calls"] = _shard_group_calls(spy.calls[start:], layers)
    out["pending_after_move"] = [layer.experts.pending for layer in layers]
    expected = _stock_experts(stock)
    out["moved_equal"] = all(
        torch.equal(a, b) for layer, ref in zip(layers, expected) for a, b in zip(full_experts(layer), ref)
    )

    # Never moved: the first forward cuts the shards.
    lazy, _ = _build("microep", seed, spy)
    lazy_layers = fsep_layers(lazy)
    with spy.active():
        start = len(spy.calls)
        lazy_out = _forward(lazy, seed)
        out["first_forward_shard_calls"] = _shard_group_calls(spy.calls[start:], lazy_layers)
    out["lazy_equal"] = torch.equal(lazy_out, _forward(moved, seed))

    # 16-bit, wrapped by DDP before the shards were cut: refused.
    half, _ = _build("microep", seed, spy, dtype=torch.bfloat16)
    ddp = DistributedDataParallel(half.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), half)
    try:
        _forward(ddp, seed)
        out["wrapped_16bit"] = None
    except FSEPShardsError as err:
        out["wrapped_16bit"] = str(err)

    # On the meta device.
    with torch.device("meta"):
        meta, calls = _build("microep", seed, spy)
    meta_layers = fsep_layers(meta)
    out["meta_build_calls"] = [c.op for c in calls]
    out["meta_shards"] = [
        (str(layer.experts.shards.device), tuple(layer.experts.shards.shape)) for layer in meta_layers
    ]
    out["meta_pending"] = [layer.experts.pending for layer in meta_layers]
    out["cpu_shards"] = [tuple(layer.experts.shards.shape) for layer in layers]
    with spy.active():
        start = len(spy.calls)
        meta.to_empty(device="cpu")
        out["to_empty_calls"] = [c.op for c in spy.calls[start:]]
    meta.load_state_dict(moved.state_dict(), strict=True)
    out["meta_loaded_equal"] = all(
        torch.equal(a, b)
        for layer, ref in zip(meta_layers, layers)
        for a, b in zip(full_experts(layer), full_experts(ref))
    )
    return out


@pytest.fixture(scope="module")
def construction_run():
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"FSEP construction test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return spawn_gloo(_rank, EP, seed, timeout_s=300)


def test_cpu_build_runs_no_collective_and_the_move_cuts_the_shards(construction_run):
    for res in construction_run:
        assert res["cpu_build_calls"] == []
        assert res["pending_after_build"] == [True, True] and res["pending_after_move"] == [False, False]
        assert res["move_calls"] == ["all_to_all_single"] * 2  # one per layer
        assert res["moved_equal"], "the shards do not hold the experts stock EP builds"


def test_first_forward_cuts_shards_of_a_model_never_moved(construction_run):
    for res in construction_run:
        # Per layer: the cut, then the layer's gather (the next layer's is prefetched: one more each).
        assert res["first_forward_shard_calls"].count("all_to_all_single") == 4
        assert res["lazy_equal"]


def test_16bit_model_wrapped_before_its_shards_were_cut_is_refused(construction_run):
    for res in construction_run:
        assert res["wrapped_16bit"] is not None and "before wrapping it" in res["wrapped_16bit"]


def test_meta_build_runs_no_collective(construction_run):
    for res in construction_run:
        assert res["meta_build_calls"] == [] and res["to_empty_calls"] == []
        assert res["meta_pending"] == [False, False]
        assert [shape for _, shape in res["meta_shards"]] == res["cpu_shards"]
        assert all(device == "meta" for device, _ in res["meta_shards"])
        assert res["meta_loaded_equal"]
