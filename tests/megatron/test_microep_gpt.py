"""A small GPTModel trained with MicroEP and with stock EP: same losses and parameters, and checkpoints
interoperate.

Per layout, one launch of 4 CPU ranks (gloo; EP = 4, or EP = 2 with expert data parallelism 2)
builds the stock model (alltoall dispatcher, Megatron's local GPT decoder spec) and the MicroEP model (``--spec megatron_microep.glue.spec
microep_layer_spec``: the object Megatron-LM would import), with the same weights. Both train for
20 optimizer steps through Megatron's DistributedDataParallel (gradient buffers, overlapped
reduction), 2 micro-batches per step with deferred gradient sync, and finalize_model_grads. Routing
is skewed with a fixed router expert bias; the MicroEP model re-plans its placement every 4 steps
(greedy planner, planner process) so replicas appear during training and must carry tokens,
counted on the rows the experts processed (a spy on the expert call), where every routed
(token, expert) pair must also run exactly once.

Then a MicroEP checkpoint (Megatron distributed checkpoint) is loaded into a fresh stock model and a
stock checkpoint into a fresh MicroEP model, strictly (no missing or unexpected key), and the loaded
parameters must equal the saved ones.
"""

import contextlib
import os
import random

import pytest
import torch
from _expert_rows import count_expert_rows
from _gpt_case import skew_router, synthetic_batches

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo

WORLD = 4
LAYOUTS = {"ep4": 4, "ep2_edp2": 2}  # name: EP size (expert data parallelism = 4 / EP)
NUM_EXPERTS = 8
HOT_EXPERTS = (0, 1)
VOCAB = 64
SEQ_LEN = 16
MICRO_BATCH = 2
MICRO_BATCHES = 2
STEPS = int(os.environ.get("GPT_STEPS", 20))
LOSS_TOL = 1e-4
PARAM_REL_TOL = 1e-5
TOPK = 2


def _config(dispatcher: str, ep: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_microep.glue.config import MicroEPConfig, attach_microep_config

    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        moe_ffn_hidden_size=32,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=TOPK,
        moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=ep,
        add_bias_linear=False,
        use_cpu_initialization=False,
        transformer_impl="local",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,
        moe_router_load_balancing_type="none",
        bf16=False,
        params_dtype=torch.float32,
    )
    if dispatcher == "microep":
        attach_microep_config(config, MicroEPConfig(redundant_slots=1, replan_interval=4, planner="greedy"))
    return config


def _model(config, spec):
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ_LEN,
        position_embedding_type="rope",
    )


def _stock_spec(config):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization)


class _MainGradAdam:
    """torch Adam on the gradients Megatron's DDP reduced into its buffers (``param.main_grad``).

    A plain optimizer keeps this 20-step comparison independent of the CPU harness's optimizer
    patches; Megatron's own optimizers and schedules are compared in test_megatron_training_stack.py.
    """

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.adam = torch.optim.Adam(self.params, lr=3e-3)

    def zero_grad(self):
        self.adam.zero_grad(set_to_none=True)

    def step(self):
        for p in self.params:
            p.grad = p.main_grad.to(p.dtype)
        self.adam.step()


def _wrap(model, config):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True)
    ddp = DistributedDataParallel(config, ddp_config, model)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp, _MainGradAdam(ddp)


def _batches(seed: int, step: int):
    import torch.distributed as dist

    return synthetic_batches(seed + 1000 * step + dist.get_rank(), VOCAB, SEQ_LEN, MICRO_BATCH, MICRO_BATCHES)


def _train(ddp, optimizer, seed, micro: bool):
    """Megatron's no-pipelining step, written out (the real schedule: test_megatron_training_stack.py):
    gradient sync deferred to the last micro-batch, loss averaged over micro-batches,
    finalize_model_grads, optimizer step."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron_microep.glue.layer import microep_layers, set_training_step

    losses = []
    for step in range(1, STEPS + 1):
        if micro:
            set_training_step(step)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        step_losses = []
        batches = _batches(seed, step)
        for i, (tokens, labels, positions, mask) in enumerate(batches):
            sync = contextlib.nullcontext() if i == len(batches) - 1 else ddp.no_sync()
            with sync:
                loss = ddp(tokens, positions, mask, labels=labels).float().mean()
                (loss / len(batches)).backward()
            step_losses.append(loss.item())
        finalize_model_grads([ddp])
        optimizer.step()
        losses.append(sum(step_losses) / len(step_losses))
    stats = [s for layer in microep_layers(ddp.module) for s in layer.telemetry.drain()] if micro else []
    versions = [layer.placement_controller.version for layer in microep_layers(ddp.module)] if micro else []
    return losses, stats, versions


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _save_and_load(source, target, directory):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(source.sharded_state_dict(), directory)
    loaded = dist_checkpointing.load(target.sharded_state_dict(), directory, strict=StrictHandling.RAISE_ALL)
    target.load_state_dict(loaded, strict=True)


def _gpt_rank(rank: int, world_size: int, ep: int, seed: int, tmp_dir: str):
    import torch.distributed as dist

    from megatron_microep.glue.spec import microep_layer_spec

    init_megatron_parallel(expert_model_parallel_size=ep, seed=seed)
    stock_config, micro_config = _config("alltoall", ep), _config("microep", ep)
    stock = _model(stock_config, _stock_spec(stock_config))
    micro = _model(micro_config, microep_layer_spec)
    skew_router(stock, HOT_EXPERTS)
    micro.load_state_dict(stock.state_dict(), strict=True)
    initial = _params(stock)

    stock_ddp, stock_opt = _wrap(stock, stock_config)
    micro_ddp, micro_opt = _wrap(micro, micro_config)
    stock_losses, _, _ = _train(stock_ddp, stock_opt, seed, micro=False)
    with count_expert_rows() as expert_rows:
        micro_losses, stats, versions = _train(micro_ddp, micro_opt, seed, micro=True)
    moved = max((initial[n] - p.detach()).abs().max().item() for n, p in stock.named_parameters())

    # Checkpoints: MicroEP -> fresh stock, stock -> fresh MicroEP.
    torch.manual_seed(seed + 99)
    fresh_stock = _model(_config("alltoall", ep), _stock_spec(stock_config))
    fresh_micro = _model(_config("microep", ep), microep_layer_spec)
    _save_and_load(micro, fresh_stock, os.path.join(tmp_dir, "from_microep"))
    dist.barrier()
    _save_and_load(stock, fresh_micro, os.path.join(tmp_dir, "from_stock"))
    saved_micro, saved_stock = _params(micro), _params(stock)
    ckpt_err = {
        "microep_to_stock": max((saved_micro[n] - p).abs().max().item() for n, p in _params(fresh_stock).items()),
        "stock_to_microep": max((saved_stock[n] - p).abs().max().item() for n, p in _params(fresh_micro).items()),
        "same_names": sorted(saved_micro) == sorted(saved_stock),
        # Per parameter, relative to stock's: MicroEP sums a replicated expert's gradient in parts.
        "micro_vs_stock_trained": max(
            ((saved_micro[n] - p).norm() / p.norm().clamp_min(1e-12)).item() for n, p in saved_stock.items()
        ),
    }
    return {
        "stock": stock_losses,
        "micro": micro_losses,
        "stats": stats,
        "versions": versions,
        "moved": moved,
        "ckpt": ckpt_err,
        "expert_rows": expert_rows,
    }


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def gpt_run(request, tmp_path_factory):
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"GPT test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    ckpt_dir = str(tmp_path_factory.mktemp(f"ckpt_{request.param}"))
    return spawn_gloo(_gpt_rank, WORLD, LAYOUTS[request.param], seed, ckpt_dir, timeout_s=600)


def test_losses_match_stock_for_twenty_steps(gpt_run):
    for rank, res in enumerate(gpt_run):
        assert len(res["micro"]) == STEPS
        diffs = [abs(a - b) for a, b in zip(res["micro"], res["stock"])]
        assert max(diffs) <= LOSS_TOL, f"rank {rank}: loss diffs {diffs}"
        assert res["moved"] > 1e-3  # training really changed the weights
    losses = gpt_run[0]["stock"]
    assert losses[-1] < losses[0]


def test_replicas_planned_and_used_during_training(gpt_run):
    for res in gpt_run:
        assert res["versions"] and all(v >= 1 for v in res["versions"]), "no placement was adopted"
        stats = res["stats"]
        assert len(stats) == STEPS * MICRO_BATCHES * 2  # every micro-batch of both MoE layers
        late = [s for s in stats if s.replicas > 0]
        assert late, "no micro-batch ran with replicas"
        assert sum(s.max_after for s in late) < sum(s.max_before for s in late)
    # On the rows the experts processed (a spy on the expert call): replica weights ran tokens, and
    # over all ranks every routed (token, expert) pair of every micro-batch ran exactly once.
    calls = [call for res in gpt_run for call in res["expert_rows"]]
    assert len(calls) == WORLD * STEPS * MICRO_BATCHES * 2 and all(call["training"] for call in calls)
    replica_rows = sum(call["replica"] for call in calls)
    print(f"rows run on replicas: {replica_rows} of {sum(call['rows'] for call in calls)}")
    assert replica_rows > 0, "replica weights processed no rows"
    routed = WORLD * STEPS * MICRO_BATCHES * 2 * MICRO_BATCH * SEQ_LEN * TOPK  # 2 MoE layers
    assert sum(call["rows"] for call in calls) == routed


def test_trained_parameters_match_stock(gpt_run):
    for rank, res in enumerate(gpt_run):
        gap = res["ckpt"]["micro_vs_stock_trained"]
        print(f"rank {rank}: parameters after {STEPS} steps, worst relative gap to stock {gap:.1e}")
        assert gap <= PARAM_REL_TOL, f"rank {rank}: trained parameters differ from stock by {gap:.2e}"


def test_checkpoints_interoperate_with_stock(gpt_run):
    for rank, res in enumerate(gpt_run):
        ckpt = res["ckpt"]
        assert ckpt["same_names"]
        assert ckpt["microep_to_stock"] == 0.0, f"rank {rank}: {ckpt}"
        assert ckpt["stock_to_microep"] == 0.0, f"rank {rank}: {ckpt}"
