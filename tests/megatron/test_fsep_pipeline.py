"""FSEP under pipeline parallelism: 4 CPU ranks (gloo), PP = 2 stages x EP = 2, vs stock EP.

A 4-layer GPT with MoE and dense layers mixed (``moe_layer_freq`` [1, 1, 0, 1]: two FSEP layers on
stage 0, a dense and an FSEP layer on stage 1) is built per stage three times from the same seed:
stock EP (alltoall dispatcher) and FSEP under each memory policy (``keep``, ``regather``), each in
Megatron's DDP (fp32 main gradients), and trained under two micro-batch loops, each a 1F1B schedule
(stage 0 runs a second micro-batch's forward between a micro-batch's forward and its backward):
``own``, written here (stage 0 sends activations forward and receives their gradients back over
gloo point-to-point, then ``finalize_model_grads``: DP and shared-embedding reductions), and
``megatron``, megatron-core's ``forward_backward_pipelining_without_interleaving`` (the CPU harness
runs it). SGD steps on the main gradients: Adam's first step moves every element by about lr
whatever its size, so fp32 summation-order noise in a near-zero gradient element would become an
lr-sized parameter difference between the runs; SGD keeps their parameters as close as their
gradients, so gradients can be compared tightly at every step, not only the first. The FSEP layers
get a new layout every step. Checked every step: the last stage's micro-batch losses (1e-4) and every
main gradient (1e-5 relative; experts as shards against the same slices of stock's expert gradients).
At the end the ``keep`` model is saved with Megatron's distributed checkpoint (each stage's layers
under their global numbers) and loaded strictly into a fresh FSEP model, which must hold the same
layouts and routing histories.
"""

import os
import random

import numpy as np
import pytest
import torch
from _expert_rows import (
    assert_each_routed_pair_ran_once,
    calls_across_ranks,
    count_expert_rows,
    count_routed_tokens,
    name_slot_experts,
)
from _gpt_case import forward_step, fsep_moe_config, gpt_model, synthetic_batches
from test_fsep_gpt import _expert_grads_as_shards, _rel
from test_fsep_mixed_precision import _random_layout

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo

PP, EP = 2, 2
NUM_EXPERTS = 4  # 2 per rank + 1 redundant slot: C = 3 (as test_fsep_mixed_precision's layouts)
VOCAB, SEQ_LEN, MICRO_BATCH, HIDDEN = 64, 16, 2, 32
PATTERN = [1, 1, 0, 1]
MICRO_BATCHES, STEPS = 3, 3
LOSS_TOL, GRAD_TOL = 1e-4, 1e-5
SGD_LR = 1.0
MODELS = ("stock", "keep", "regather")


def _config(model: str):
    return fsep_moe_config(
        None if model == "stock" else model,
        dict(redundant_slots=1, replan_interval=0),
        num_layers=len(PATTERN),
        hidden_size=HIDDEN,
        num_moe_experts=NUM_EXPERTS,
        moe_layer_freq=PATTERN,
        expert_model_parallel_size=EP,
        pipeline_model_parallel_size=PP,
        use_cpu_initialization=False,
        pipeline_dtype=torch.float32,
    )


def _build(model: str, seed: int, first: bool, last: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    config = _config(model)
    # Expert 0 (home: EP rank 0) is hot.
    gpt = gpt_model(config, seed, VOCAB, SEQ_LEN, [0], pre_process=first, post_process=last)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), gpt)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp


class _SGD:
    """Plain SGD on DDP's main gradients (see the module doc for why not Adam)."""

    def __init__(self, ddp):
        self.params = [p for p in ddp.parameters() if p.requires_grad]

    def step(self):
        with torch.no_grad():
            for p in self.params:
                p.add_(p.main_grad, alpha=-SGD_LR)


def _batches(seed: int, step: int, dp_rank: int):
    return synthetic_batches(seed + 1000 * step + dp_rank, VOCAB, SEQ_LEN, MICRO_BATCH, MICRO_BATCHES)


def _own_1f1b(ddp, batches):
    """One step's forwards and backwards in 1F1B order; returns the last stage's micro-batch losses."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    stage = parallel_state.get_pipeline_model_parallel_rank()
    first, last = stage == 0, stage == PP - 1
    prev = None if first else parallel_state.get_pipeline_model_parallel_prev_rank()
    nxt = None if last else parallel_state.get_pipeline_model_parallel_next_rank()
    sends, in_flight, losses = [], [], []
    warmup = min(PP - stage - 1, len(batches))

    def forward(i):
        tokens, labels, positions, mask = batches[i]
        x = None
        if not first:
            x = torch.empty(SEQ_LEN, MICRO_BATCH, HIDDEN)
            dist.recv(x, prev)
            x.requires_grad_(True)
            ddp.module.set_input_tensor(x)
        out = ddp(tokens if first else None, positions, mask, labels=labels if last else None)
        if last:
            loss = out.float().mean()
            losses.append(loss.item())
            out = loss / len(batches)
        else:
            sends.append(dist.isend(out.detach().contiguous(), nxt))
        in_flight.append((x, out))

    def backward():
        x, out = in_flight.pop(0)
        if last:
            out.backward()
        else:
            grad = torch.empty_like(out)
            dist.recv(grad, nxt)
            out.backward(grad)
        if not first:
            sends.append(dist.isend(x.grad.contiguous(), prev))

    ddp.zero_grad_buffer()
    for i in range(warmup):
        forward(i)
    for i in range(warmup, len(batches)):
        forward(i)
        backward()
    for _ in range(warmup):
        backward()
    for work in sends:
        work.wait()
    finalize_model_grads([ddp])
    return losses


def _megatron_1f1b(ddp, batches):
    """The same step through megatron-core's pipeline schedule; the last stage's micro-batch losses."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_backward = get_forward_backward_func()
    assert forward_backward.__name__ == "forward_backward_pipelining_without_interleaving"
    ddp.zero_grad_buffer()
    results = forward_backward(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[ddp],
        num_microbatches=len(batches),
        seq_length=SEQ_LEN,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    return [r["lm loss"].item() for r in results]


LOOPS = {"own": _own_1f1b, "megatron": _megatron_1f1b}


def _train(loop: str, seed: int) -> dict:
    from megatron.core import parallel_state

    from megatron_microep.glue.fsep import fsep_layers
    from megatron_microep.glue.layer import set_training_step

    stage = parallel_state.get_pipeline_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    models = {name: _build(name, seed, stage == 0, stage == PP - 1) for name in MODELS}
    optimizers = {name: _SGD(ddp) for name, ddp in models.items()}
    layers = {name: fsep_layers(models[name]) for name in MODELS[1:]}
    rng = np.random.default_rng(seed + 17 * stage)  # the same on both EP ranks of a stage
    out = {
        "fsep_layers": [layer.layer_number for layer in layers["keep"]],
        "losses": {},
        "loss_err": [],
        "grad_err": [],
        "placements": [],
        "expert_rows": [],
        "routed": [],
    }
    placement = None
    for step in range(1, STEPS + 1):
        placement = _random_layout(rng, placement.to_lists() if placement is not None else None)
        out["placements"].append(placement.to_lists())
        for name in MODELS[1:]:
            for layer in layers[name]:
                layer.set_placement(placement)
        set_training_step(step)
        batches = _batches(seed, step, dp_rank)
        losses = {}
        for name, ddp in models.items():
            if name != "keep":
                losses[name] = LOOPS[loop](ddp, batches)
                continue
            # The keep model's expert calls and routings, counted by the test (not the schedule's telemetry).
            with count_expert_rows(keep_fc1=True) as rows, count_routed_tokens() as routed:
                losses[name] = LOOPS[loop](ddp, batches)
            name_slot_experts(rows, layers[name])  # this step's weights: before the optimizer step
            out["expert_rows"] += rows
            out["routed"] += routed
        stock = models["stock"]
        stock_grads = dict(stock.named_parameters())
        for name in MODELS[1:]:
            out["losses"].setdefault(name, []).append(losses[name])
            out["loss_err"].append(max([abs(a - b) for a, b in zip(losses[name], losses["stock"])], default=0.0))
            errors = [
                (_rel(p.main_grad, stock_grads[n].main_grad), n)
                for n, p in models[name].named_parameters()
                if getattr(p, "allreduce", True)
            ]
            errors += [
                (_rel(layer.experts.shards.main_grad.view_as(ref), ref), f"layer {layer.layer_number} shards")
                for layer, ref in zip(layers[name], _expert_grads_as_shards(stock, layers[name]))
            ]
            out["grad_err"].append(max(errors))
        out["losses"].setdefault("stock", []).append(losses["stock"])
        for opt in optimizers.values():
            opt.step()
    out["prefetch_hits"] = {name: [layer.prefetch_hits for layer in layers[name]] for name in MODELS[1:]}
    if loop == "megatron":
        out["keep_model"] = models["keep"]
    return out


def _layout_round_trip(model, seed: int, directory: str) -> dict:
    """Save ``model`` (an FSEP ``keep`` model) and load it into a fresh one; layouts and histories."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_microep.glue.fsep import fsep_layers

    # As Megatron-LM saves and loads: the metadata dict the model fills is the checkpoint's content
    # metadata, handed back to the fresh model on load (it says the layout objects are there).
    metadata = {}
    sharded = model.module.sharded_state_dict(metadata=metadata)
    dist_checkpointing.save(sharded, directory, content_metadata=_clean_metadata_for_serialization(metadata))
    stage = parallel_state.get_pipeline_model_parallel_rank()
    fresh = _build("keep", seed + 1, stage == 0, stage == PP - 1)
    metadata = dist_checkpointing.load_content_metadata(directory)
    loaded = dist_checkpointing.load(
        fresh.module.sharded_state_dict(metadata=metadata), directory, strict=StrictHandling.RAISE_ALL
    )
    loaded.pop("content_metadata")  # saved at the top level, next to the model's keys
    fresh.module.load_state_dict(loaded, strict=True)

    def layouts(ddp):
        return [
            (layer.layout.placement.to_lists(), layer.placement_controller.history().tolist())
            for layer in fsep_layers(ddp)
        ]

    return {"saved": layouts(model), "loaded": layouts(fresh)}


def _pipeline_rank(rank, world_size, seed, directory):
    from megatron.core import parallel_state

    init_megatron_parallel(pipeline_model_parallel_size=PP, expert_model_parallel_size=EP, seed=seed)
    out = {"stage": parallel_state.get_pipeline_model_parallel_rank()}
    for loop in LOOPS:
        out[loop] = _train(loop, seed)
    out["round_trip"] = _layout_round_trip(out["megatron"].pop("keep_model"), seed, directory)
    return out


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"FSEP pipeline test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return spawn_gloo(_pipeline_rank, PP * EP, seed, str(tmp_path_factory.mktemp("fsep_pp")), timeout_s=300)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_each_stage_holds_its_fsep_layers(pipeline_run, loop):
    for res in pipeline_run:
        run = res[loop]
        assert run["fsep_layers"] == {0: [1, 2], 1: [4]}[res["stage"]]
        placements = run["placements"]
        assert all(a != b for a, b in zip(placements, placements[1:])), "the layout did not change every step"


@pytest.mark.parametrize("loop", list(LOOPS))
def test_every_routed_token_runs_once_and_copies_share_the_load(pipeline_run, loop):
    # The keep model's rows, counted by a spy on the expert call (which expert a copy ran, by its
    # weights), against the router's choices, per stage (its EP group) and FSEP layer.
    split_calls = 0
    for stage in range(PP):
        results = [res[loop] for res in pipeline_run if res["stage"] == stage]
        assert len(results) == EP
        for layer in results[0]["fsep_layers"]:
            calls = calls_across_ranks(
                [r["expert_rows"] for r in results], [r["routed"] for r in results], layer, NUM_EXPERTS
            )
            assert len(calls) == STEPS * MICRO_BATCHES
            pairs = EP * MICRO_BATCH * SEQ_LEN * 2  # top-2 of every token
            split_calls += sum(assert_each_routed_pair_ran_once(calls, pairs, f"stage {stage} layer {layer}"))
    assert split_calls > 0, "no expert's tokens were split over copies"


@pytest.mark.parametrize("loop", list(LOOPS))
def test_fsep_pipeline_matches_stock_ep(pipeline_run, loop):
    for rank, res in enumerate(pipeline_run):
        run = res[loop]
        if res["stage"] == PP - 1:
            assert all(len(step) == MICRO_BATCHES for step in run["losses"]["stock"])
            assert max(run["loss_err"]) <= LOSS_TOL, f"rank {rank}: loss errors {run['loss_err']}"
        assert max(run["grad_err"])[0] <= GRAD_TOL, f"rank {rank}: gradient rel errors {run['grad_err']}"
        print(
            f"{loop} rank {rank}: worst gradient rel error {max(run['grad_err'])}, "
            f"loss error {max(run['loss_err']):.1e}"
        )
    losses = [res[loop]["losses"]["stock"] for res in pipeline_run if res["stage"] == PP - 1][0]
    assert np.mean(losses[-1]) < np.mean(losses[0]), f"training did not learn: {losses}"


@pytest.mark.parametrize("loop", list(LOOPS))
def test_prefetch_under_the_pipeline_schedule(pipeline_run, loop):
    passes = STEPS * MICRO_BATCHES
    for res in pipeline_run:
        if res["stage"] == 0:
            # Layer 2's forward gather is started by layer 1 in every micro-batch, also with another
            # micro-batch's backward in between; under regather layer 1's backward gather by layer 2's.
            assert res[loop]["prefetch_hits"] == {"keep": [0, passes], "regather": [passes, passes]}


def test_layout_state_round_trip_per_stage(pipeline_run):
    for res in pipeline_run:
        saved, loaded = res["round_trip"]["saved"], res["round_trip"]["loaded"]
        assert len(saved) == {0: 2, 1: 1}[res["stage"]]
        assert all(history for _, history in saved), "no routing history was recorded"
        assert loaded == saved
