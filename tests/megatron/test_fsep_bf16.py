"""FSEP in mixed precision: a bf16 GPTModel trained with fully sharded experts vs stock EP, same recipe.

Megatron's bf16 recipe, on 2 CPU ranks (gloo, EP = 2): the model's parameters are bf16
(``Float16Module``, as Megatron-LM's ``get_model`` wraps it), DDP reduces gradients into fp32
``main_grad`` buffers, and the optimizer keeps an fp32 main copy of every parameter, steps Adam on
the main copies with the fp32 main gradients, then re-casts the bf16 parameters from them (what
megatron-core's ``Float16OptimizerWithFloat16Params`` does; megatron-core's optimizers reject CPU
tensors, so ``_MainParamAdam`` below is that recipe written out). Stock EP (alltoall dispatcher) and
FSEP (a new random layout every step, ``keep`` policy) start from the same bf16 weights and train
``STEPS`` optimizer steps of ``MICRO_BATCHES`` micro-batches. A third model, stock EP in fp32, is the
yardstick: the error that bf16 itself makes.

Tolerances, from bf16 rounding (unit roundoff u = 2^-9). FSEP computes exactly stock's arithmetic
except where the bf16 roundings fall: each copy's weight gradient is rounded to bf16 before the
fp32 sum over copies (stock rounds one gradient per expert), and a copy's GEMM covers a different
set of tokens (another blocking of the same dot products). At step 1 (identical weights), every
gradient element therefore differs by at most a few roundings of its magnitude: max-normalised
relative error <= 8u. Over the run, Adam turns such differences into parameter differences of up to
2 lr where a gradient element is close to zero (step 1 of Adam moves every element by about lr times
its sign), and bf16 forward passes re-round them; the losses must stay within 2^-7 (4u) relative
of stock's and FSEP's deviation from stock must be several times smaller than bf16's own deviation
from fp32 (at most half of it).
"""
import contextlib
import os
import random

import numpy as np
import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo  # noqa: E402
from test_fsep_gpt import _expert_grads_as_shards, _rel  # noqa: E402

EP = 2
NUM_EXPERTS = 4
SLOTS = 3  # 2 home experts per rank + 1 redundant slot
VOCAB, SEQ_LEN, MICRO_BATCH, MICRO_BATCHES, STEPS = 64, 16, 2, 2, 6
LR = 3e-3
U = 2.0 ** -9  # bf16 unit roundoff
STEP1_GRAD_TOL = 8 * U
LOSS_REL_TOL = 4 * U
FP32_GAP_RATIO = 0.5


def _config(dispatcher: str, dtype: torch.dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_microep.glue.config import MicroEPConfig, attach_microep_config

    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, moe_ffn_hidden_size=32,
        num_moe_experts=NUM_EXPERTS, moe_router_topk=2, moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=EP, add_bias_linear=False, use_cpu_initialization=False,
        transformer_impl="local", hidden_dropout=0.0, attention_dropout=0.0,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0, moe_router_load_balancing_type="none", moe_router_dtype="fp32",
        gated_linear_unit=True, bf16=dtype == torch.bfloat16, params_dtype=dtype, pipeline_dtype=dtype,
    )
    if dispatcher == "microep":
        attach_microep_config(config, MicroEPConfig(redundant_slots=SLOTS - NUM_EXPERTS // EP,
                                                    expert_sharding="fsep"))
    return config


def _build(config, seed: int):
    """GPTModel (bf16 models wrapped in Float16Module, as Megatron-LM does) in Megatron's DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    from megatron_microep.glue import compat
    from megatron_microep.glue.spec import microep_decoder_block_spec

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    if config.moe_token_dispatcher_type == "microep":
        spec = microep_decoder_block_spec(config, use_transformer_engine=False)
    else:
        spec = compat.stock_decoder_block_spec(config, False)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ_LEN,
                     position_embedding_type="rope")
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("router.expert_bias"):
                buffer.zero_()
                buffer[0] = 0.6  # expert 0 (home: EP rank 0) is hot
    if config.bf16:
        model = Float16Module(config, model)
    return DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)


class _MainParamAdam:
    """Megatron's mixed-precision optimizer step, written out: fp32 main copies of the model's
    parameters, Adam on them with DDP's fp32 ``main_grad``, model parameters re-cast from them."""

    def __init__(self, ddp):
        self.params = [p for p in ddp.parameters() if p.requires_grad]
        self.main = [p.detach().float().clone() for p in self.params]
        self.adam = torch.optim.Adam(self.main, lr=LR)

    def main_of(self, param):
        return self.main[next(i for i, p in enumerate(self.params) if p is param)]

    def step(self):
        for p, m in zip(self.params, self.main):
            m.grad = p.main_grad
        self.adam.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.main):
                p.copy_(m)  # round to nearest even into the parameter's dtype
                m.grad = None


def _batches(seed: int, step: int):
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(seed + 1000 * step + dist.get_rank())
    mask = torch.triu(torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool), diagonal=1)[None, None]
    positions = torch.arange(SEQ_LEN)[None].expand(MICRO_BATCH, SEQ_LEN)
    out = []
    for _ in range(MICRO_BATCHES):
        start = torch.randint(0, VOCAB, (MICRO_BATCH, 1), generator=gen)
        tokens = (start + torch.arange(SEQ_LEN + 1)) % VOCAB
        out.append((tokens[:, :-1], tokens[:, 1:], positions, mask))
    return out


def _step(ddp, seed: int, step: int) -> float:
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp.zero_grad_buffer()
    losses = []
    batches = _batches(seed, step)
    for i, (tokens, labels, positions, mask) in enumerate(batches):
        with contextlib.nullcontext() if i == len(batches) - 1 else ddp.no_sync():
            loss = ddp(tokens, positions, mask, labels=labels).float().mean()
            (loss / len(batches)).backward()
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


def _bf16_rank(rank, world_size, seed):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_microep.glue.fsep import fsep_layers
    from megatron_microep.glue.layer import set_training_step

    init_megatron_parallel(expert_model_parallel_size=EP, seed=seed)
    stock, fsep = _build(_config("alltoall", torch.bfloat16), seed), _build(_config("microep", torch.bfloat16), seed)
    fp32 = _build(_config("alltoall", torch.float32), seed)
    layers = fsep_layers(fsep)
    stock_opt, fsep_opt, fp32_opt = _MainParamAdam(stock), _MainParamAdam(fsep), _MainParamAdam(fp32)
    rng = np.random.default_rng(seed)
    out = {"dtypes": sorted({str(p.dtype) for p in fsep.parameters()}),
           "shard_dtypes": [(str(layer.experts.shards.dtype), str(layer.experts.shards.main_grad.dtype),
                             str(fsep_opt.main_of(layer.experts.shards).dtype)) for layer in layers],
           "stock_experts_bf16": all(p.dtype == torch.bfloat16 for m in stock.modules() if isinstance(m, MoELayer)
                                     for p in m.experts.parameters()),
           "stock": [], "fsep": [], "fp32": [], "grad_err": [], "placements": [], "recast_exact": [],
           "sub_bf16_fraction": [], "step1_update_err": None, "copy_tokens": []}
    placement = None
    for step in range(1, STEPS + 1):
        placement = _random_layout(rng, placement.to_lists() if placement is not None else None)
        for layer in layers:
            layer.set_placement(placement)
        out["placements"].append(placement.to_lists())
        set_training_step(step)
        out["stock"].append(_step(stock, seed, step))
        out["fsep"].append(_step(fsep, seed, step))
        out["fp32"].append(_step(fp32, seed, step))
        out["copy_tokens"].append(sum(s.replica_tokens for layer in layers for s in layer.telemetry.drain()))
        stock_grads = dict(stock.named_parameters())
        errors = [_rel(p.main_grad, stock_grads[n].main_grad) for n, p in fsep.named_parameters()
                  if getattr(p, "allreduce", True)]
        errors += [_rel(layer.experts.shards.main_grad.view_as(ref), ref)
                   for layer, ref in zip(layers, _expert_grads_as_shards(stock, layers))]
        out["grad_err"].append(max(errors))
        before = [fsep_opt.main_of(layer.experts.shards).clone() for layer in layers]
        grads = [layer.experts.shards.main_grad.clone() for layer in layers]
        stock_opt.step()
        fsep_opt.step()
        fp32_opt.step()
        mains = [fsep_opt.main_of(layer.experts.shards) for layer in layers]
        # The bf16 shards are the fp32 main shards re-cast, bit for bit; the main shards keep what bf16 drops.
        out["recast_exact"].append(all(torch.equal(layer.experts.shards.detach(), m.to(torch.bfloat16))
                                       for layer, m in zip(layers, mains)))
        out["sub_bf16_fraction"].append(min(float((m != m.to(torch.bfloat16).float()).float().mean()) for m in mains))
        if step == 1:
            # Adam's first step moves every main element by lr * g / (|g| + eps): it stepped on these gradients.
            err = 0.0
            for b, m, g in zip(before, mains, grads):
                big = g.abs() > 1e-5
                expected = -LR * g / (g.abs() + 1e-8)
                err = max(err, ((m - b - expected)[big]).abs().max().item() / LR)
            out["step1_update_err"] = err
    return out


@pytest.fixture(scope="module")
def bf16_run():
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"FSEP bf16 test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return spawn_gloo(_bf16_rank, EP, seed, timeout_s=300)


def test_parameters_are_bf16_with_fp32_main_params_and_grads(bf16_run):
    for res in bf16_run:
        assert res["dtypes"] == ["torch.bfloat16"] and res["stock_experts_bf16"]
        assert res["shard_dtypes"] == [("torch.bfloat16", "torch.float32", "torch.float32")] * 2
        # The optimizer stepped on the fp32 main shards with the fp32 main gradients ...
        assert res["step1_update_err"] is not None and res["step1_update_err"] < 1e-3, res["step1_update_err"]
        # ... the bf16 shards are re-cast from them after every step, and the main shards are not bf16 in disguise.
        assert all(res["recast_exact"])
        assert min(res["sub_bf16_fraction"]) > 0.5, res["sub_bf16_fraction"]


def test_bf16_fsep_trains_like_bf16_stock_ep(bf16_run):
    for rank, res in enumerate(bf16_run):
        placements = res["placements"]
        assert all(a != b for a, b in zip(placements, placements[1:])), "the layout did not change every step"
        assert min(res["copy_tokens"]) > 0, f"no expert's tokens were split over copies: {res['copy_tokens']}"
        assert res["grad_err"][0] <= STEP1_GRAD_TOL, f"rank {rank}: step-1 gradient rel error {res['grad_err'][0]}"
        rel = [abs(a - b) / b for a, b in zip(res["fsep"], res["stock"])]
        assert max(rel) <= LOSS_REL_TOL, f"rank {rank}: loss rel diffs {rel}"
        fsep_gap = max(abs(a - b) for a, b in zip(res["fsep"], res["stock"]))
        bf16_gap = max(abs(a - b) for a, b in zip(res["fp32"], res["stock"]))
        assert fsep_gap <= FP32_GAP_RATIO * bf16_gap, f"rank {rank}: FSEP-stock {fsep_gap}, bf16-fp32 {bf16_gap}"
        print(f"rank {rank}: grad errors {res['grad_err']}, loss rel diffs {rel}, "
              f"FSEP-stock {fsep_gap:.2e} vs bf16-fp32 {bf16_gap:.2e}")
    losses = bf16_run[0]["stock"]
    assert losses[-1] < losses[0] - 0.05, f"training did not learn: {losses}"
