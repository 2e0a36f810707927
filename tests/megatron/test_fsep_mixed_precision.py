"""FSEP in mixed precision: bf16 and fp16 GPTModels trained with fully sharded experts vs stock EP, same recipe.

Megatron's mixed-precision recipe end to end, on 2 CPU ranks (gloo, EP = 2): the model's parameters
are bf16 or fp16 (``Float16Module``, as Megatron-LM's ``get_model`` wraps it; fp16 with a static loss
scale, as ``--loss-scale``), Megatron's DDP reduces gradients into fp32 ``main_grad`` buffers, and
megatron-core's optimizer from ``get_megatron_optimizer`` keeps fp32 main parameters, (fp16:
unscales and checks for overflow,) steps Adam on them with the fp32 main gradients (clipping included)
and copies them back into the 16-bit parameters: ``Float16OptimizerWithFloat16Params`` and the
``DistributedOptimizer`` (the CPU harness runs both). For each precision and optimizer, stock EP
(alltoall dispatcher) and FSEP (a new layout every step, ``keep`` policy) start from the same weights
and train ``STEPS`` steps of ``MICRO_BATCHES`` micro-batches; a third model, stock EP in fp32 with the
same optimizer, is the yardstick: the error the 16-bit format itself makes. The FSEP shards' fp32 main
parameter is located inside the optimizer and checked: Adam's first step moved it by lr * g / |g| of
the shards' unscaled fp32 main gradient, and after every step the 16-bit shards equal it re-cast, bit
for bit, while it keeps what 16 bits drop.

Tolerances, from the format's unit roundoff u (bf16 2^-9, fp16 2^-11). FSEP computes stock's
arithmetic except where the 16-bit roundings fall: each copy's weight gradient is rounded to 16 bits
before the fp32 sum over copies (stock rounds one gradient per expert), and a copy's GEMM covers
another set of tokens (another blocking of the same dot products). At step 1 (identical weights),
every gradient element therefore differs by at most a few roundings of the largest: max-normalised
relative error <= 8u. Over the run, Adam turns such differences into parameter differences of up to
2 lr where a gradient element is close to zero (Adam's first step moves every element by about lr
times its sign), and 16-bit forward passes re-round them: the losses must stay within 4u relative of
stock's, and FSEP may be no farther from stock than a few times the 16-bit format's own gap to fp32.
"""

import contextlib
import os
import random

import numpy as np
import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from _gpt_case import gpt_model, synthetic_batches  # noqa: E402
from test_fsep_gpt import _expert_grads_as_shards, _rel  # noqa: E402

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo  # noqa: E402

EP = 2
NUM_EXPERTS = 4
SLOTS = 3  # 2 home experts per rank + 1 redundant slot
VOCAB, SEQ_LEN, MICRO_BATCH, MICRO_BATCHES, STEPS = 64, 16, 2, 2, 6
LR = 3e-3
OPTIMIZERS = {"Float16OptimizerWithFloat16Params": False, "DistributedOptimizer": True}  # name: distributed
# name: (parameter dtype, unit roundoff); fp16 runs with a static loss scale, as Megatron's --loss-scale.
PRECISIONS = {"bf16": (torch.bfloat16, 2.0**-9), "fp16": (torch.float16, 2.0**-11)}
LOSS_SCALE = 256.0
STEP1_GRAD_ROUNDINGS = 8  # tolerances in units of the precision's unit roundoff u
LOSS_REL_ROUNDINGS = 4
FP32_GAP_RATIO = 4.0  # both gaps are rounding noise of one size; FSEP's was 1.7x the fp16-fp32 gap once in CI


def _config(dispatcher: str, dtype: torch.dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_microep.glue.config import MicroEPConfig, attach_microep_config

    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        moe_ffn_hidden_size=32,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=2,
        moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=EP,
        add_bias_linear=False,
        use_cpu_initialization=False,
        transformer_impl="local",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,
        moe_router_load_balancing_type="none",
        moe_router_dtype="fp32",
        gated_linear_unit=True,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
    )
    if dispatcher == "microep":
        attach_microep_config(
            config, MicroEPConfig(redundant_slots=SLOTS - NUM_EXPERTS // EP, replan_interval=0, expert_sharding="fsep")
        )
    return config


def _build(config, seed: int, distributed_optimizer: bool):
    """GPTModel (16-bit models wrapped in Float16Module, as Megatron-LM does) in Megatron's DDP, and
    Megatron's optimizer over it (Adam, clipping, no weight decay: Adam's first step is then exact)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    model = gpt_model(config, seed, VOCAB, SEQ_LEN, [0])  # expert 0 (home: EP rank 0) is hot
    if config.bf16 or config.fp16:
        model = Float16Module(config, model)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer),
        model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=LR,
            weight_decay=0.0,
            clip_grad=1.0,
            bf16=config.bf16,
            fp16=config.fp16,
            loss_scale=LOSS_SCALE if config.fp16 else None,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=distributed_optimizer,
        ),
        [ddp],
    )
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp, optimizer


def _main_param(optimizer, param):
    """The fp32 main parameter Megatron's optimizer keeps for the 16-bit ``param`` (flat [numel]) and the
    optimizer's class name: ``fp32_from_float16_groups`` of the Float16 optimizer, or the distributed
    optimizer's shard of it (the whole parameter here: expert-data-parallel size 1)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        model_groups = getattr(opt, "float16_groups", None) or getattr(opt, "model_float16_groups", None)
        main_groups = getattr(opt, "fp32_from_float16_groups", None) or opt.shard_fp32_from_float16_groups
        for model_group, main_group in zip(model_groups, main_groups):
            for model_param, main in zip(model_group, main_group):
                if model_param is param:
                    assert main.numel() == param.numel()
                    return main.view(-1), type(opt).__name__
    raise AssertionError("the optimizer holds no fp32 main parameter for the FSEP shards")


def _batches(seed: int, step: int):
    import torch.distributed as dist

    return synthetic_batches(seed + 1000 * step + dist.get_rank(), VOCAB, SEQ_LEN, MICRO_BATCH, MICRO_BATCHES)


def _forward_backward(ddp, optimizer, seed: int, step: int) -> float:
    """One step's micro-batches (deferred gradient sync) and gradient finalisation, as Megatron's
    no-pipelining schedule does; the optimizer step is the caller's."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = []
    batches = _batches(seed, step)
    for i, (tokens, labels, positions, mask) in enumerate(batches):
        with contextlib.nullcontext() if i == len(batches) - 1 else ddp.no_sync():
            loss = ddp(tokens, positions, mask, labels=labels).float().mean()
            optimizer.scale_loss(loss / len(batches)).backward()  # x1 unless fp16
        losses.append(loss.item())
    finalize_model_grads([ddp])
    return sum(losses) / len(losses)


def _random_layout(rng, previous):
    """A layout other than ``previous``: every rank holds the hot expert 0 and SLOTS - 1 others (so
    the scheduler splits expert 0's tokens over two copies), every expert has a copy."""
    from megatron_microep.planning.placement import Placement

    while True:
        held = [[0] + rng.choice(np.arange(1, NUM_EXPERTS), SLOTS - 1, replace=False).tolist() for _ in range(EP)]
        copies = [[g for g in range(EP) if e in held[g]] for e in range(NUM_EXPERTS)]
        if all(copies) and copies != previous:
            return Placement.from_lists(copies, EP)


def _train(seed: int, distributed_optimizer: bool, dtype: torch.dtype) -> dict:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_microep.glue.fsep import fsep_layers
    from megatron_microep.glue.layer import set_training_step

    models = {
        name: _build(_config(dispatcher, dtype), seed, distributed_optimizer)
        for name, dispatcher, dtype in (
            ("stock", "alltoall", dtype),
            ("fsep", "microep", dtype),
            ("fp32", "alltoall", torch.float32),
        )
    }
    stock, fsep = models["stock"][0], models["fsep"][0]
    layers = fsep_layers(fsep)
    mains = [_main_param(models["fsep"][1], layer.experts.shards) for layer in layers]
    rng = np.random.default_rng(seed)
    out = {
        "dtypes": sorted({str(p.dtype) for p in fsep.parameters()}),
        "shard_dtypes": [
            (str(layer.experts.shards.dtype), str(layer.experts.shards.main_grad.dtype), str(main.dtype))
            for layer, (main, _) in zip(layers, mains)
        ],
        "optimizers": sorted({name for _, name in mains}),
        "stock_experts_low_precision": all(
            p.dtype == dtype for m in stock.modules() if isinstance(m, MoELayer) for p in m.experts.parameters()
        ),
        "stock": [],
        "fsep": [],
        "fp32": [],
        "grad_err": [],
        "placements": [],
        "recast_exact": [],
        "sub_precision_fraction": [],
        "step1_update_err": None,
        "copy_tokens": [],
    }
    placement = None
    for step in range(1, STEPS + 1):
        placement = _random_layout(rng, placement.to_lists() if placement is not None else None)
        for layer in layers:
            layer.set_placement(placement)
        out["placements"].append(placement.to_lists())
        set_training_step(step)
        for name, (ddp, optimizer) in models.items():
            out[name].append(_forward_backward(ddp, optimizer, seed, step))
        out["copy_tokens"].append(sum(s.replica_tokens for layer in layers for s in layer.telemetry.drain()))
        stock_grads = dict(stock.named_parameters())
        errors = [
            _rel(p.main_grad, stock_grads[n].main_grad)
            for n, p in fsep.named_parameters()
            if getattr(p, "allreduce", True)
        ]
        errors += [
            _rel(layer.experts.shards.main_grad.view_as(ref), ref)
            for layer, ref in zip(layers, _expert_grads_as_shards(stock, layers))
        ]
        out["grad_err"].append(max(errors))
        before = [main.clone() for main, _ in mains]
        scale = float(models["fsep"][1].get_loss_scale())  # main gradients carry the fp16 loss scale
        grads = [layer.experts.shards.main_grad.view(-1) / scale for layer in layers]
        stepped = {name: optimizer.step() for name, (_, optimizer) in models.items()}
        assert all(ok for ok, _, _ in stepped.values()), "optimizer step failed"
        # The 16-bit shards are the fp32 main shards re-cast, bit for bit; the main shards keep what 16 bits drop.
        out["recast_exact"].append(
            all(
                torch.equal(layer.experts.shards.detach().view(-1), main.to(dtype))
                for layer, (main, _) in zip(layers, mains)
            )
        )
        out["sub_precision_fraction"].append(
            min(float((main != main.to(dtype).float()).float().mean()) for main, _ in mains)
        )
        if step == 1:
            # Adam's first step moves every main element by lr * c g / (c |g| + eps), c the clipping
            # factor of the returned gradient norm: it stepped on the shards' fp32 main gradients.
            clip = min(1.0, 1.0 / (stepped["fsep"][1] + 1e-6))
            err = 0.0
            for b, (main, _), g in zip(before, mains, grads):
                expected = -LR * clip * g / (clip * g.abs() + 1e-8)
                err = max(err, (main - b - expected).abs().max().item() / LR)
            out["step1_update_err"] = err
    return out


def _mixed_precision_rank(rank, world_size, seed):
    init_megatron_parallel(expert_model_parallel_size=EP, seed=seed)
    return {
        (precision, name): _train(seed, distributed, dtype)
        for precision, (dtype, _) in PRECISIONS.items()
        for name, distributed in OPTIMIZERS.items()
    }


@pytest.fixture(scope="module")
def mixed_precision_run():
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"FSEP mixed-precision test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return spawn_gloo(_mixed_precision_rank, EP, seed, timeout_s=300)


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_parameters_are_16_bit_with_fp32_main_params_and_grads(mixed_precision_run, optimizer, precision):
    dtype = str(PRECISIONS[precision][0])
    for rank_result in mixed_precision_run:
        res = rank_result[(precision, optimizer)]
        assert res["optimizers"] == [optimizer]
        assert res["dtypes"] == [dtype] and res["stock_experts_low_precision"]
        assert res["shard_dtypes"] == [(dtype, "torch.float32", "torch.float32")] * 2
        # The optimizer stepped on the fp32 main shards with the fp32 main gradients ...
        assert res["step1_update_err"] is not None and res["step1_update_err"] < 1e-3, res["step1_update_err"]
        # ... the 16-bit shards are re-cast from them after every step, and the main shards are not 16-bit in disguise.
        assert all(res["recast_exact"])
        assert min(res["sub_precision_fraction"]) > 0.5, res["sub_precision_fraction"]


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_16_bit_fsep_trains_like_16_bit_stock_ep(mixed_precision_run, optimizer, precision):
    u = PRECISIONS[precision][1]
    for rank, rank_result in enumerate(mixed_precision_run):
        res = rank_result[(precision, optimizer)]
        placements = res["placements"]
        assert all(a != b for a, b in zip(placements, placements[1:])), "the layout did not change every step"
        assert min(res["copy_tokens"]) > 0, f"no expert's tokens were split over copies: {res['copy_tokens']}"
        assert res["grad_err"][0] <= STEP1_GRAD_ROUNDINGS * u, (
            f"rank {rank}: step-1 gradient rel error {res['grad_err'][0]}"
        )
        rel = [abs(a - b) / b for a, b in zip(res["fsep"], res["stock"])]
        assert max(rel) <= LOSS_REL_ROUNDINGS * u, f"rank {rank}: loss rel diffs {rel}"
        fsep_gap = max(abs(a - b) for a, b in zip(res["fsep"], res["stock"]))
        precision_gap = max(abs(a - b) for a, b in zip(res["fp32"], res["stock"]))
        assert fsep_gap <= FP32_GAP_RATIO * precision_gap, (
            f"rank {rank}: FSEP-stock {fsep_gap}, {precision}-fp32 {precision_gap}"
        )
        print(
            f"{precision} {optimizer} rank {rank}: grad errors {res['grad_err']}, loss rel diffs {rel}, "
            f"FSEP-stock {fsep_gap:.2e} vs {precision}-fp32 {precision_gap:.2e}"
        )
        losses = res["stock"]
        assert losses[-1] < losses[0] - 0.05, f"training did not learn: {losses}"
