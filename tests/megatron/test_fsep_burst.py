"""Burst copies under FSEP (``--microep-burst-slots`` with ``--microep-expert-sharding fsep``), on CPU ranks.

One gloo launch, 2 ranks, EP = 2: a 2-layer MoE GPT with 4 experts, every token routed to expert 0 first
(homed on EP rank 0). FSEP with no redundant slot (C = 2: the layout is Megatron's home layout, so
without burst copies every token of expert 0 runs on EP rank 0) and one burst slot per rank, no
re-planning. Most micro-batches' counts overload EP rank 0, so ``plan_burst`` gathers a copy of a hot
expert onto EP rank 1 for that micro-batch (and for that micro-batch only). Megatron's DDP (fp32 main
gradients), megatron-core's Adam optimizer, ``get_forward_backward_func`` with 3 micro-batches, 4
steps, against stock EP (alltoall) from the same weights:

- ``keep``, ``regather`` and ``keep`` with the MoE layer recomputed (``recompute_modules=["moe"]``): losses within 1e-4 every step and all parameters within 1e-5 relative
  at the end (experts as full tensors gathered from the shards);
- on the rows the experts ran (a spy on the expert call, each slot's expert named by its weights),
  every routed (token, expert) pair ran exactly once on a copy of its expert, and an expert ran on
  two copies (a burst copy carried tokens: with C = n and no replica slot nothing else can split an
  expert) in exactly the micro-batches whose routed counts put EP rank 0 above the tolerance's cap
  (most of them: expert 1 is some tokens' second choice; a micro-batch may route none to it);
- a control drops the burst copies' returned gradients: parity breaks;
- an evaluation forward (eval mode, no grad) gathers burst copies and matches stock's losses;
- host reads (``runtime.audit.HostReads``): one boundary call (the count exchange) per layer forward,
  no other read, none in the backward, with burst copies gathered;
- bytes: a spy on ``all_to_all_single`` over FSEP's shard group counts, per micro-batch, what the
  burst gathers and returns carry; it equals the simulator cost model's charge for the plan's burst
  copies (``CostModel.fsep_burst_rank_bytes``).
"""

import contextlib
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
from _gpt_case import forward_step, gpt_model, skew_router, stock_full_experts, synthetic_batches, tiny_moe_config

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo

WORLD = EP = 2
NUM_EXPERTS, TOPK = 4, 2
VOCAB, SEQ_LEN, MICRO_BATCH, MICRO_BATCHES, STEPS = 64, 16, 2, 3, 4
LR, ADAM_EPS = 1e-2, 1e-4  # eps 1e-4: a near-zero gradient element moves its parameter by ~lr*g/eps, not lr
LOSS_TOL, PARAM_REL_TOL = 1e-4, 1e-5
BURST_SLOTS = 1
ALWAYS_FIRST = 2.0  # router bias above any sigmoid score


def _seed() -> int:
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"FSEP burst seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return seed


def _model(kind: str, seed: int):
    """(GPT model, config): stock EP, or FSEP with ``kind`` memory policy and one burst slot."""
    from megatron_microep.glue.config import MicroEPConfig, attach_microep_config

    # "recompute": keep, with the MoE layer recomputed in the backward (the recomputed forward plans
    # and gathers its burst copies again).
    recompute = {"recompute_granularity": "selective", "recompute_modules": ["moe"]} if kind == "recompute" else {}
    dispatcher = "alltoall" if kind == "stock" else "microep"
    config = tiny_moe_config(dispatcher, EP, NUM_EXPERTS, moe_router_topk=TOPK, **recompute)
    if kind != "stock":
        settings = MicroEPConfig(
            redundant_slots=0,
            replan_interval=0,
            expert_sharding="fsep",
            fsep_memory_policy="regather" if kind == "regather" else "keep",
            burst_slots=BURST_SLOTS,
        )
        attach_microep_config(config, settings)
    model = gpt_model(config, seed, VOCAB, SEQ_LEN, [0])
    # Expert 0 first for every token (sigmoid scores lie in (0, 1)): EP rank 0 carries every token plus
    # those whose second choice is expert 1, so a burst copy of expert 0 on EP rank 1 splits expert 0
    # whenever rank 0 is above the cap (with HOT_BIAS some tokens skip expert 0 and copies vary more).
    skew_router(model, [0], bias=ALWAYS_FIRST)
    model.cpu()  # as Megatron-LM's model.cuda(): FSEP cuts its shards here
    return model, config


def _wrap(model, config):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, adam_eps=ADAM_EPS, weight_decay=0.0, clip_grad=1.0),
        [ddp],
    )
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer


def _params(ddp) -> dict[str, torch.Tensor]:
    """Dense parameters by name; experts as full tensors per MoE layer (FSEP's from the shards)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_microep.glue.fsep import FSEPMoELayer, full_experts

    out = {n: p.detach().clone() for n, p in ddp.module.named_parameters() if getattr(p, "allreduce", True)}
    for moe in [m for m in ddp.module.modules() if isinstance(m, MoELayer)]:
        tensors = full_experts(moe) if isinstance(moe, FSEPMoELayer) else stock_full_experts(moe)
        out.update({f"experts{moe.layer_number}.{i}": t for i, t in enumerate(tensors)})
    return out


def _train(kind: str, seed: int, control=contextlib.nullcontext):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_microep.glue.fsep import fsep_layers
    from megatron_microep.glue.layer import set_training_step

    model, config = _model(kind, seed)
    ddp, optimizer = _wrap(model, config)
    layers = fsep_layers(ddp.module)
    start = _params(ddp)
    losses, rows, routed = [], [], []
    for step in range(1, STEPS + 1):
        set_training_step(step)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        with control(), count_expert_rows(keep_fc1=bool(layers)) as step_rows, count_routed_tokens() as step_routed:
            out = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(synthetic_batches(seed + 1000 * step, VOCAB, SEQ_LEN, MICRO_BATCH, MICRO_BATCHES)),
                model=ddp,
                num_microbatches=MICRO_BATCHES,
                seq_length=SEQ_LEN,
                micro_batch_size=MICRO_BATCH,
                forward_only=False,
            )
        step_rows = [r for r in step_rows if not r["backward"]]  # regather's recompute: no layer to name
        if layers:
            name_slot_experts(step_rows, layers)  # before the optimizer step changes the weights
        rows += step_rows
        routed += step_routed
        assert optimizer.step()[0]
        losses.append(sum(r["lm loss"].item() for r in out) / len(out))
    params = _params(ddp)
    return {
        "losses": losses,
        "params": params,
        "moved": max((params[n] - p).abs().max().item() for n, p in start.items()),
        "rows": rows,
        "routed": routed,
        "gathered": [layer.burst_copies_gathered for layer in layers],
        "layer_ids": [layer.model_layer_id for layer in layers],
    }


@contextlib.contextmanager
def _burst_gradients_dropped():
    """The bug the parity checks must catch: burst copies' returned gradients never reach main_grad."""
    from megatron_microep.runtime.fsep import ShardExchange

    original = ShardExchange.finish_return

    def layout_only(self, pending, shards, more=()):
        for _, started in more:
            started.wait()
        return original(self, pending, shards)

    ShardExchange.finish_return = layout_only
    try:
        yield
    finally:
        ShardExchange.finish_return = original


def _host_reads(seed: int):
    """Host reads of one FSEP model's forward and backward (bursting), per the audit."""
    from megatron_microep.glue import cpu
    from megatron_microep.glue.fsep import fsep_layers
    from megatron_microep.glue.layer import set_training_step
    from megatron_microep.runtime.audit import HostReads
    from megatron_microep.runtime.dispatch import CountExchange

    def reads():
        return HostReads(
            boundaries=[(CountExchange, "wait")],
            syncs=[(cpu._CpuEvent, "synchronize"), (torch.cuda, "synchronize")],
        )

    model, _ = _model("keep", seed)
    set_training_step(1)
    batch = synthetic_batches(seed, VOCAB, SEQ_LEN, MICRO_BATCH, 1)[0]
    tokens, labels, positions, mask = batch
    model(tokens, positions, mask, labels=labels)  # warm-up: compiled solver, backend choice
    before = sum(layer.burst_copies_gathered for layer in fsep_layers(model))
    with reads() as forward:
        loss = model(tokens, positions, mask, labels=labels).float().sum()
    with reads() as backward:
        loss.backward()
    return {
        "forward": (forward.boundary, dict(forward.reads)),
        "backward": (backward.boundary, dict(backward.reads)),
        "layers": len(fsep_layers(model)),
        "bursts": sum(layer.burst_copies_gathered for layer in fsep_layers(model)) - before,
    }


def _evaluation(seed: int):
    """An evaluation forward (eval mode, no grad) of FSEP with burst slots and of stock EP from the
    same weights: (largest loss difference, burst copies gathered)."""
    from megatron_microep.glue.fsep import fsep_layers

    tokens, labels, positions, mask = synthetic_batches(seed + 7, VOCAB, SEQ_LEN, MICRO_BATCH, 1)[0]
    losses = {}
    for kind in ("stock", "keep"):
        model, _ = _model(kind, seed)
        model.eval()
        with torch.no_grad():
            losses[kind] = model(tokens, positions, mask, labels=labels)
        gathered = sum(layer.burst_copies_gathered for layer in fsep_layers(model))
    return (losses["keep"] - losses["stock"]).abs().max().item(), gathered


def _burst_bytes(seed: int):
    """One FSEP layer's forward and backward (keep, bursting) with the bytes this rank hands to the
    shard group's all-to-alls measured (``runtime.comm_spy``), and the burst copies its plan chose."""
    import torch.distributed as dist

    from megatron_microep.glue.fsep import FSEPMoELayer, fsep_layers
    from megatron_microep.glue.layer import set_training_step
    from megatron_microep.runtime.comm_spy import CollectiveSpy
    from megatron_microep.runtime.fsep import shard_group

    model, _ = _model("keep", seed)
    layer = fsep_layers(model)[0]
    x = torch.randn(SEQ_LEN, MICRO_BATCH, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    x[:, :, : model.config.hidden_size // 2] += 1.0
    set_training_step(1)
    plans, original = [], FSEPMoELayer._plan_burst

    def plan(self, tokens):
        out = original(self, tokens)
        plans.append(self._burst_plan.copies.tolist())
        return out

    FSEPMoELayer._plan_burst = plan
    spy = CollectiveSpy()
    try:
        with spy.active():
            y, _ = layer(x.requires_grad_(True))
            y.sum().backward()
    finally:
        FSEPMoELayer._plan_burst = original
    group = shard_group(layer.microep_groups.ep)
    mine = [c for c in spy.calls if c.group is group]
    return {
        "sent": sum(c.sent for c in mine),
        "received": sum(c.received for c in mine),
        "calls": len(mine),
        "plans": plans,
        "layout": layer.layout.placement.to_lists(),
        "ep_rank": dist.get_rank(group),
        "shard": (layer.fsep_spec.shard_numel, layer.experts.shards.element_size()),
        "expert": (model.config.hidden_size, model.config.moe_ffn_hidden_size, bool(model.config.gated_linear_unit)),
    }


def _rank(rank, world_size, seed):
    torch._dynamo.config.disable = True  # Megatron's fused activations: eager on CPU
    init_megatron_parallel(expert_model_parallel_size=EP, seed=seed)
    runs = {kind: _train(kind, seed) for kind in ("stock", "keep", "regather", "recompute")}
    runs["dropped"] = _train("keep", seed, _burst_gradients_dropped)
    stock = runs["stock"]["params"]
    out = {}
    for kind, run in runs.items():
        if kind == "stock":
            continue
        same = sorted(run["params"]) == sorted(stock)
        out[kind] = {
            "same_names": same,
            "loss": max(abs(a - b) for a, b in zip(run["losses"], runs["stock"]["losses"])),
            "param_rel": max(
                ((run["params"][n] - p).abs().max() / p.abs().max().clamp_min(1e-12)).item() for n, p in stock.items()
            )
            if same
            else float("inf"),
            "moved": run["moved"],
            "rows": run["rows"],
            "routed": run["routed"],
            "gathered": run["gathered"],
            "layer_ids": run["layer_ids"],
        }
    out["reads"] = _host_reads(seed)
    out["evaluation"] = _evaluation(seed)
    out["bytes"] = _burst_bytes(seed)
    return out


@pytest.fixture(scope="module")
def results():
    seed = _seed()
    return spawn_gloo(_rank, WORLD, seed, timeout_s=600), seed


@pytest.mark.parametrize("policy", ["keep", "regather", "recompute"])
def test_fsep_with_burst_copies_matches_stock(results, policy):
    per_rank, seed = results
    print(f"seed {seed}")
    for rank, res in enumerate(per_rank):
        got = res[policy]
        print(
            f"rank {rank} {policy}: loss {got['loss']:.1e}, params {got['param_rel']:.1e}, gathered {got['gathered']}"
        )
        assert got["same_names"]
        assert got["loss"] <= LOSS_TOL, f"rank {rank} {policy}: losses {got['loss']:.2e} off stock"
        assert got["param_rel"] <= PARAM_REL_TOL, f"rank {rank} {policy}: parameters {got['param_rel']:.2e} off"
        assert all(g >= STEPS * MICRO_BATCHES // 2 for g in got["gathered"]), got["gathered"]
    assert per_rank[0]["keep"]["moved"] > 1e-3  # the runs trained


def _needs_burst(routed) -> bool:
    """Whether the router's counts (per expert, over the EP group) put an EP rank's home experts above
    the cap of the default tolerance 1.02: max(ceil(mean), floor(1.02 * mean)) tokens."""
    home = np.asarray(routed).reshape(EP, -1).sum(1)
    total = int(home.sum())
    return int(home.max()) > max(-(-total // EP), (1020 * total) // (1000 * EP))


@pytest.mark.parametrize("policy", ["keep", "regather", "recompute"])
def test_burst_copies_ran_tokens_and_every_routed_pair_ran_once(results, policy):
    per_rank, seed = results
    print(f"seed {seed}")
    first = per_rank[0][policy]
    for layer in first["layer_ids"]:
        calls = calls_across_ranks(
            [res[policy]["rows"] for res in per_rank],
            [res[policy]["routed"] for res in per_rank],
            layer,
            NUM_EXPERTS,
        )
        assert len(calls) == STEPS * MICRO_BATCHES, f"layer {layer}: {len(calls)} forward calls"
        split = assert_each_routed_pair_ran_once(calls, WORLD * MICRO_BATCH * SEQ_LEN * TOPK, f"{policy} {layer}")
        needs = [_needs_burst(call["routed"]) for call in calls]
        assert sum(needs) >= len(calls) // 2, f"layer {layer}: too few micro-batches need a burst copy: {needs}"
        assert split == needs, f"{policy} layer {layer}: an expert ran on two copies in {split}, needed in {needs}"


def test_parity_breaks_without_the_burst_gradient_return(results):
    per_rank, seed = results
    print(f"seed {seed}")
    worst = max(res["dropped"]["param_rel"] for res in per_rank)
    print(f"burst gradients dropped: parameters {worst:.1e} off stock")
    assert worst > 100 * PARAM_REL_TOL


def test_one_host_read_per_layer_forward_none_in_backward(results):
    per_rank, _ = results
    for rank, res in enumerate(per_rank):
        reads = res["reads"]
        print(f"rank {rank}: {reads}")
        assert reads["bursts"] > 0, "no burst copy was gathered in the audited pass"
        assert reads["forward"] == (reads["layers"], {}), f"rank {rank}: {reads}"
        assert reads["backward"] == (0, {}), f"rank {rank}: {reads}"


def test_evaluation_forward_with_burst_copies_matches_stock(results):
    per_rank, _ = results
    for rank, res in enumerate(per_rank):
        difference, gathered = res["evaluation"]
        print(f"rank {rank}: evaluation loss {difference:.1e} off stock, {gathered} burst copies gathered")
        assert gathered > 0 and difference <= LOSS_TOL


def test_simulator_charges_the_measured_burst_bytes(results):
    import dataclasses

    from megatron_microep.planning.placement import Placement
    from megatron_microep.simulator.cost import FSEP_MEMORY_POLICY_CHARGES, CostModel

    per_rank, _ = results
    hidden, ffn, gated = per_rank[0]["bytes"]["expert"]
    shard_numel, element = per_rank[0]["bytes"]["shard"]
    cost = CostModel(hidden_size=hidden, ffn_hidden_size=ffn, gated=gated, param_bytes=float(element))
    cost = dataclasses.replace(cost, **FSEP_MEMORY_POLICY_CHARGES["keep"])
    assert cost.params_per_expert == shard_numel * EP
    for rank, res in enumerate(per_rank):
        got = res["bytes"]
        ((copies,),) = [got["plans"]]
        assert len(copies) > 0, "the measured micro-batch chose no burst copy"
        r = got["ep_rank"]
        layout = Placement.from_lists(got["layout"], EP)
        charge = cost.fsep_rank_bytes(layout)
        burst = cost.fsep_burst_rank_bytes(np.array(copies, dtype=np.int64).reshape(-1, 2), EP)
        # The layer also prefetches the next layer's forward gather (the same initial layout).
        prefetch = cost.fsep_shard_traffic(layout, node_size=EP)
        charged = (
            charge["sent"][r] + burst["sent"][r] + prefetch["send_intra"][r],
            charge["received"][r] + burst["received"][r] + prefetch["recv_intra"][r],
        )
        print(f"rank {rank}: burst copies {copies}: measured {got['sent']}/{got['received']} bytes, charged {charged}")
        # The layout's gather and return, the burst copies' gather and return, the next layer's prefetch.
        assert got["calls"] == 5
        assert (got["sent"], got["received"]) == charged
        assert burst["sent"][r] + burst["received"][r] > 0
