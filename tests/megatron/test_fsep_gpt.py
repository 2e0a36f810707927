"""FSEP GPTModel vs stock EP: training parity with a new layout every step, checkpoints across modes
and EP sizes, and a rank killed mid-run.

Two launches of 4 CPU ranks (gloo), both through Megatron's DistributedDataParallel (fp32 main
gradients, overlapped reduction), 2 micro-batches per step with deferred gradient sync,
finalize_model_grads and Adam on the main gradients (megatron-core's optimizers need CUDA; Adam
is elementwise, so stepping on shards is stepping on experts).

Launch 1 (EP = 4). The stock model (alltoall dispatcher) and the FSEP model start from the same
weights and train 20 steps on skewed routing. The FSEP layers re-plan every step with the OR-Tools
FSEP planner in a planner process (a plan identical to the current layout is perturbed by a slot
swap, so the layout really changes every step) under the ``keep`` memory policy. Checked every
step: losses (1e-4), every main gradient including the experts' (1e-5 relative, shards against the
same slices of stock's expert gradients), the clipping norm; bytes, measured by a spy on
torch.distributed (what each rank hands to the collectives): the adoption of a new layout sends
only the placement broadcast, and what the gathers and gradient returns send and receive on the
shard group equals the simulator cost model's FSEP charge for the step's layouts, per rank. Every
EP rank draws its own experts (all experts distinct); a spy on the expert call counts the rows each
copy ran and names the expert it ran by its weights, and with the router's choices (a spy on
``route``): every routed (token, expert) pair ran exactly once, on a copy of that expert, some
expert's tokens were split over copies, and the busiest rank ran fewer rows than under stock EP's
home placement.
Checkpoints (model and optimizer, Megatron distributed checkpoint) at steps 14 and 16. Then a fresh
FSEP model (``regather`` policy: the same byte check, two gathers) resumes from step 14, checkpoints
at step 16 and trains until rank 3 dies (``os._exit``) in step 17.

Launch 2 resumes FSEP EP = 4 from the last checkpoint (step 16) and trains to step 20; loads the
step-14 checkpoint into FSEP at EP = 2 and into stock EP at EP = 2 and trains both to step 20; and
loads a stock EP = 2 checkpoint back into FSEP. All loss curves must continue the launch-1 curve.

Layout state. The checkpoints carry each FSEP layer's layout, routing history and pending plan: the
run resumed from step 14 must use launch 1's step-15 layout (the plan pending at the save) with
launch 1's history. At EP = 2 the saved layout cannot apply: the history is kept and the first step
re-plans, which is logged; stock EP loads the checkpoint with exactly the layout objects left over,
and FSEP loads a stock checkpoint with exactly those absent (logged). Malformed or foreign layout
states are rejected with a message naming the problem.
"""

import contextlib
import logging
import multiprocessing
import os
import pickle
import random

import numpy as np
import pytest
import torch
from _changing_planner import ChangingPlanner
from _expert_rows import (
    assert_each_routed_pair_ran_once,
    calls_across_ranks,
    count_expert_rows,
    count_routed_tokens,
    name_slot_experts,
)
from _gpt_case import fsep_moe_config, gpt_model, synthetic_batches

from megatron_microep.glue.distributed import RankFailedError, init_megatron_parallel, spawn_gloo
from megatron_microep.runtime.comm_spy import CollectiveSpy

NUM_EXPERTS = 8
HOT_EXPERTS = (0, 1)
VOCAB = 64
SEQ_LEN = 16
MICRO_BATCH = 2
MICRO_BATCHES = 2
STEPS = 20
CKPT_STEPS = (14, 16)
KILL_STEP = 17
KILLED_RANK = 3
LOSS_TOL = 1e-4
GRAD_TOL = 1e-5
# Megatron-LM's --dist-ckpt-strictness default (core_v0.16.1 to core_v0.19.0).
MEGATRON_LM_DEFAULT_STRICTNESS = "assume_ok_unexpected"


def _config(dispatcher: str, ep: int, policy: str = "keep"):
    return fsep_moe_config(
        policy if dispatcher == "microep" else None,
        dict(redundant_slots=1, replan_interval=1, replan_lag=1, history_window=4, planner_time_limit_s=0.3),
        num_layers=2,
        num_moe_experts=NUM_EXPERTS,
        expert_model_parallel_size=ep,
        # Each EP rank draws its own experts (Megatron's RNG tracker, as on GPU): with
        # use_cpu_initialization=True every EP rank holds identical experts, which would hide a copy
        # running the wrong expert's weights.
        use_cpu_initialization=False,
        bf16=False,
        params_dtype=torch.float32,
    )


def _build(config, seed: int):
    """GPTModel with the stock or the FSEP MoE layers (MicroEP's block spec: the layer class follows
    --microep-expert-sharding); the same seed gives the same weights."""
    return gpt_model(config, seed, VOCAB, SEQ_LEN, HOT_EXPERTS)


class _ShardedAdam:
    """torch Adam on DDP's main gradients, with a Megatron sharded state dict (the model's own
    checkpoint layout, via megatron's ``optim_state_to_sharding_state``)."""

    def __init__(self, model, ep_group):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.adam = torch.optim.Adam(self.params, lr=3e-3)
        self.ep_group = ep_group
        self.steps = 0

    def grad_norm(self) -> float:
        dense = torch.zeros(1, dtype=torch.float64)
        expert = torch.zeros(1, dtype=torch.float64)
        for p in self.params:
            (dense if getattr(p, "allreduce", True) else expert).add_(p.main_grad.double().square().sum())
        torch.distributed.all_reduce(expert, group=self.ep_group)
        return float((dense + expert).sqrt())

    def step(self):
        for p in self.params:
            p.grad = p.main_grad
        self.adam.step()
        for p in self.params:
            p.grad = None
        self.steps += 1

    def _init_state(self):
        for p in self.params:
            if p not in self.adam.state:
                self.adam.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }

    def sharded_state_dict(self, model_sharded):
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        self._init_state()
        state = self.adam.state_dict()
        optim_state_to_sharding_state(
            state, get_param_id_to_sharded_param_map(model_sharded, self.params), exclude_keys=("step",)
        )
        return {"adam": state, "steps": self.steps}

    def load(self, loaded):
        state = loaded["adam"]
        for values in state["state"].values():
            values["step"] = torch.tensor(float(loaded["steps"]))
        self.adam.load_state_dict(state)
        self.steps = loaded["steps"]


def _wrap(model, config):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True), model
    )
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp, _ShardedAdam(ddp, parallel_state.get_expert_model_parallel_group())


def _batches(seed: int, step: int):
    import torch.distributed as dist

    return synthetic_batches(seed + 1000 * step + dist.get_rank(), VOCAB, SEQ_LEN, MICRO_BATCH, MICRO_BATCHES)


def _sharded(ddp, optimizer, metadata):
    model_sd = ddp.module.sharded_state_dict(metadata=metadata)
    return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}


def _save(ddp, optimizer, directory):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization

    os.makedirs(directory, exist_ok=True)
    # The torch_dist writer starts helper processes, which a daemonic spawn_gloo rank may not do.
    process = multiprocessing.current_process()
    daemon = process._config.get("daemon")
    process._config["daemon"] = False
    # As Megatron-LM: one metadata dict goes to sharded_state_dict and, after it, into the checkpoint.
    metadata = {}
    sharded = _sharded(ddp, optimizer, metadata)
    try:
        dist_checkpointing.save(sharded, directory, content_metadata=_clean_metadata_for_serialization(metadata))
    finally:
        process._config["daemon"] = daemon


def _load(ddp, optimizer, directory, other_mode=False, strict=None):
    """Load strictly; across modes (FSEP <-> stock) return the keys only one side has, as
    megatron's (missing: in the checkpoint only, unexpected: in the model only). ``strict`` (a
    ``StrictHandling``) replaces that choice. As Megatron-LM, the model's sharded state dict is built
    with the checkpoint's content metadata."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    if strict is None:
        strict = StrictHandling.RETURN_ALL if other_mode else StrictHandling.RAISE_ALL
    metadata = dist_checkpointing.load_content_metadata(directory) or {}
    loaded = dist_checkpointing.load(_sharded(ddp, optimizer, metadata), directory, strict=strict)
    mismatch = None
    if StrictHandling.requires_returning_mismatch_keys(strict):
        loaded, missing, unexpected = loaded
        mismatch = (sorted(missing), sorted(unexpected))
    ddp.module.load_state_dict(loaded["model"], strict=True)
    optimizer.load(loaded["optimizer"])
    return mismatch


class _LogRecords(logging.Handler):
    """Messages of megatron_microep.glue.fsep's logger in this process."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []
        fsep_logger = logging.getLogger("megatron_microep.glue.fsep")
        fsep_logger.setLevel(logging.INFO)
        fsep_logger.addHandler(self)

    def emit(self, record):
        self.messages.append(record.getMessage())


def _histories(layers):
    return [layer.placement_controller.history().tolist() for layer in layers]


def _expert_grads_as_shards(stock_ddp, fsep_layers):
    """Stock EP's expert main gradients cut like each FSEP layer's shards: [E, S] per layer."""
    import torch.distributed as dist
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_microep.glue import compat

    stock_layers = [m for m in stock_ddp.module.modules() if isinstance(m, MoELayer)]
    out = []
    for stock, fsep in zip(stock_layers, fsep_layers):
        group = fsep.microep_groups.ep
        per_tensor = []
        for i in range(len(fsep.fsep_spec.shapes)):
            mine = torch.stack([t[i].main_grad for t in compat.expert_tensors(stock.experts)])
            everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(everyone, mine.contiguous(), group=group)
            per_tensor.append(torch.cat(everyone))
        out.append(fsep.fsep_spec.to_shards(per_tensor)[:, fsep.microep_groups.ep_rank])
    return out


def _rel(a, b) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def _fsep_step_bytes(spy_calls, layers):
    """(sent, received) bytes of one step's calls on the layers' shard group, as the spy measured them."""
    group = layers[0]._shard_exchange.group
    mine = [c for c in spy_calls if c.group is group]
    assert all(c.op == "all_to_all_single" for c in mine), {c.op for c in mine}
    return sum(c.sent for c in mine), sum(c.received for c in mine)


def _charged_bytes(layers, policy):
    """The simulator cost model's FSEP charge for this rank and step: per layer and micro-batch, the
    gathers and the gradient return of the layer's layout (fp32 weights, no biases)."""
    import dataclasses

    from megatron_microep.simulator.cost import FSEP_MEMORY_POLICY_CHARGES, CostModel

    model = dataclasses.replace(
        CostModel(hidden_size=32, ffn_hidden_size=32, gated=True, param_bytes=4.0),
        **FSEP_MEMORY_POLICY_CHARGES[policy],
    )
    sent = received = 0.0
    for layer in layers:
        charge = model.fsep_rank_bytes(layer.layout.placement)
        rank = layer.microep_groups.ep_rank
        sent += MICRO_BATCHES * charge["sent"][rank]
        received += MICRO_BATCHES * charge["received"][rank]
    return sent, received


def _step(ddp, optimizer, seed, step, fsep):
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron_microep.glue.layer import set_training_step

    if fsep:
        set_training_step(step)
    ddp.zero_grad_buffer()
    losses = []
    batches = _batches(seed, step)
    for i, (tokens, labels, positions, mask) in enumerate(batches):
        sync = contextlib.nullcontext() if i == len(batches) - 1 else ddp.no_sync()
        with sync:
            loss = ddp(tokens, positions, mask, labels=labels).float().mean()
            (loss / len(batches)).backward()
        losses.append(loss.item())
    finalize_model_grads([ddp])
    return sum(losses) / len(losses)


def _placements(layers):
    return [layer.layout.placement.to_lists() for layer in layers]


def _parity_and_kill_rank(rank, world_size, seed, tmp_dir):
    import torch.distributed as dist

    from megatron_microep.glue.fsep import fsep_layers, full_experts

    init_megatron_parallel(expert_model_parallel_size=4, seed=seed)
    stock_config, fsep_config = _config("alltoall", 4), _config("microep", 4)
    stock, fsep = _build(stock_config, seed), _build(fsep_config, seed)
    layers = fsep_layers(fsep)
    for layer in layers:
        layer.placement_controller.planner = ChangingPlanner(layer.placement_controller.planner, seed)
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_microep.glue import compat

    init_equal = True
    for stock_layer, layer in zip([m for m in stock.modules() if isinstance(m, MoELayer)], layers):
        full = full_experts(layer)
        mine = compat.expert_tensors(stock_layer.experts)
        n = len(mine)
        for i, tensor in enumerate(full):
            local = torch.stack([t[i] for t in mine])
            init_equal &= torch.equal(tensor[rank * n : (rank + 1) * n], local.detach())
    # Every expert its own weights (what lets the spy below tell which expert a copy ran).
    experts_distinct = all(
        len({full_experts(layer)[0][e].numpy().tobytes() for e in range(NUM_EXPERTS)}) == NUM_EXPERTS
        for layer in layers
    )
    stock_ddp, stock_opt = _wrap(stock, stock_config)
    fsep_ddp, fsep_opt = _wrap(fsep, fsep_config)
    spy = CollectiveSpy()
    result = {
        "init_equal": bool(init_equal),
        "experts_distinct": experts_distinct,
        "expert_rows": [],
        "routed": [],
        "stock": [],
        "fsep": [],
        "grad_err": [],
        "norm_err": [],
        "placements": [],
        "adopt_bytes": [],
        "adopt_calls": [],
        "fsep_bytes": [],
        "charged_bytes": [],
    }
    for step in range(1, STEPS + 1):
        result["stock"].append(_step(stock_ddp, stock_opt, seed, step, fsep=False))
        # Adopt this step's layouts explicitly (the forward would): count what that sends.
        from megatron_microep.glue.layer import set_training_step

        set_training_step(step)
        with spy.active():
            start = len(spy.calls)
            for layer in layers:
                layer._on_new_step(step)
            adoption = spy.calls[start:]
        result["adopt_bytes"].append(sum(c.nbytes for c in adoption))
        result["adopt_calls"].append(sorted({c.op for c in adoption}))
        result["placements"].append(_placements(layers))
        result.setdefault("histories", []).append(_histories(layers))
        with spy.active(), count_expert_rows(keep_fc1=True) as rows, count_routed_tokens() as routed:
            start = len(spy.calls)
            result["fsep"].append(_step(fsep_ddp, fsep_opt, seed, step, fsep=True))
            result["fsep_bytes"].append(_fsep_step_bytes(spy.calls[start:], layers))
        name_slot_experts(rows, layers)  # this step's weights: before the optimizer step
        result["expert_rows"] += rows
        result["routed"] += routed
        result["charged_bytes"].append(_charged_bytes(layers, "keep"))
        # Gradients: dense main grads by name, expert main grads as shards, and the clipping norm.
        stock_grads = dict(stock_ddp.named_parameters())
        errors = [
            _rel(p.main_grad, stock_grads[n].main_grad)
            for n, p in fsep_ddp.named_parameters()
            if getattr(p, "allreduce", True)
        ]
        for layer, ref in zip(layers, _expert_grads_as_shards(stock_ddp, layers)):
            errors.append(_rel(layer.experts.shards.main_grad.view_as(ref), ref))
        result["grad_err"].append(max(errors))
        norms = stock_opt.grad_norm(), fsep_opt.grad_norm()
        result["norm_err"].append(abs(norms[0] - norms[1]) / norms[0])
        state_ptrs = (
            [fsep_opt.adam.state[layer.experts.shards]["exp_avg"].data_ptr() for layer in layers] if step > 1 else None
        )
        stock_opt.step()
        fsep_opt.step()
        if state_ptrs is not None:
            result.setdefault("state_moved", []).append(
                state_ptrs != [fsep_opt.adam.state[layer.experts.shards]["exp_avg"].data_ptr() for layer in layers]
            )
        if step in CKPT_STEPS:
            _save(fsep_ddp, fsep_opt, os.path.join(tmp_dir, f"fsep_ep4_step{step}"))
    result["prefetch_hits"] = [layer.prefetch_hits for layer in layers]
    result["placement_bytes"] = (NUM_EXPERTS + 1 + 4 * layers[0].slots_per_rank) * 8 * len(layers)
    with open(os.path.join(tmp_dir, f"launch1_rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    dist.barrier()

    # Resume from the first checkpoint with the regather policy, checkpoint again, die mid-run.
    config = _config("microep", 4, policy="regather")
    model = _build(config, seed + 1)
    ddp, opt = _wrap(model, config)
    _load(ddp, opt, os.path.join(tmp_dir, f"fsep_ep4_step{CKPT_STEPS[0]}"))
    spy = CollectiveSpy()
    resumed, regather_bytes = [], []
    resumed_layers = fsep_layers(model)
    for step in range(CKPT_STEPS[0] + 1, STEPS + 1):
        if step == KILL_STEP and rank == KILLED_RANK:
            with open(os.path.join(tmp_dir, f"victim_rank{rank}.pkl"), "wb") as f:
                pickle.dump(resumed, f)
            os._exit(17)
        with spy.active():
            start = len(spy.calls)
            loss = _step(ddp, opt, seed, step, fsep=True)
            regather_bytes.append(_fsep_step_bytes(spy.calls[start:], resumed_layers))
        regather_bytes[-1] = (regather_bytes[-1], _charged_bytes(resumed_layers, "regather"))
        with open(os.path.join(tmp_dir, f"regather_bytes_rank{rank}.pkl"), "wb") as f:
            pickle.dump(regather_bytes, f)
        opt.step()
        resumed.append(loss)
        if step == CKPT_STEPS[0] + 1:
            with open(os.path.join(tmp_dir, f"resumed_layout_rank{rank}.pkl"), "wb") as f:
                pickle.dump((_placements(resumed_layers), _histories(resumed_layers)), f)
        with open(os.path.join(tmp_dir, f"victim_rank{rank}.pkl"), "wb") as f:
            pickle.dump(resumed, f)
        dist.barrier()  # every rank's record is on disk before the victim dies
        if step == CKPT_STEPS[1]:
            _save(ddp, opt, os.path.join(tmp_dir, "victim_last"))
    return "not killed"


def _train_from(config, seed, directory, first_step, last_step, other_mode=False, out=None, name=None):
    model = _build(config, seed + 7)
    ddp, opt = _wrap(model, config)
    mismatch = _load(ddp, opt, directory, other_mode)
    if out is not None:
        out[f"{name}_mismatch"] = mismatch
        out[f"{name}_history_steps"] = [
            len(layer.placement_controller.history()) // MICRO_BATCHES for layer in _fsep_layers(model)
        ]
    losses = []
    for step in range(first_step, last_step + 1):
        losses.append(_step(ddp, opt, seed, step, fsep=config.moe_token_dispatcher_type == "microep"))
        opt.step()
    return ddp, opt, losses


def _fsep_layers(model):
    from megatron_microep.glue.fsep import fsep_layers

    return fsep_layers(model)


def _bad_layout_states(layer):
    """Error messages of load_layout_state for malformed or foreign states built from the layer's own."""
    from megatron_microep.glue.fsep import FSEPLayoutStateError

    good = layer.layout_state()
    E = good["num_experts"]
    bad = {
        "not a dict": [1, 2],
        "field missing": {k: v for k, v in good.items() if k != "history"},
        "other model": {**good, "num_experts": E * 2},
        "expert without copy": {**good, "placement": [[]] + good["placement"][1:]},
        "too many copies on a rank": {**good, "placement": [[0]] * E},
        "history shape": {**good, "history": [np.zeros((2, E + 1), dtype=np.int64)]},
        "negative loads": {**good, "current_rows": -np.ones((1, E), dtype=np.int64)},
        "format": {**good, "format": 99},
    }
    messages = {}
    for name, state in bad.items():
        try:
            layer.load_layout_state(state)
            messages[name] = None
        except FSEPLayoutStateError as err:
            messages[name] = str(err)
    return messages


def _restart_rank(rank, world_size, seed, tmp_dir):
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_microep.glue.fsep import LAYOUT_STATE_KEY, fsep_layers, full_experts

    logs = _LogRecords()
    out = {"layout_key": LAYOUT_STATE_KEY}
    init_megatron_parallel(expert_model_parallel_size=4, seed=seed)
    resumed, _, out["resumed_ep4"] = _train_from(
        _config("microep", 4, "regather"), seed, os.path.join(tmp_dir, "victim_last"), CKPT_STEPS[1] + 1, STEPS
    )
    out["regather_prefetch_hits"] = [layer.prefetch_hits for layer in fsep_layers(resumed.module)]
    init_megatron_parallel(expert_model_parallel_size=2, seed=seed)
    first = os.path.join(tmp_dir, f"fsep_ep4_step{CKPT_STEPS[0]}")
    logs.messages.clear()
    fsep_ep2, _, out["fsep_ep2"] = _train_from(
        _config("microep", 2), seed, first, CKPT_STEPS[0] + 1, STEPS, out=out, name="fsep_ep2"
    )
    out["fsep_ep2_logs"] = list(logs.messages)
    out["bad_states"] = _bad_layout_states(fsep_layers(fsep_ep2.module)[0])
    stock_ddp, stock_opt, out["stock_ep2"] = _train_from(
        _config("alltoall", 2), seed, first, CKPT_STEPS[0] + 1, STEPS, other_mode=True, out=out, name="stock_ep2"
    )
    # And back: the trained stock EP=2 checkpoint into FSEP EP=2, parameters equal.
    back_dir = os.path.join(tmp_dir, "stock_ep2_end")
    _save(stock_ddp, stock_opt, back_dir)
    dist.barrier()
    config = _config("microep", 2)
    fsep = _build(config, seed + 11)
    ddp, opt = _wrap(fsep, config)
    logs.messages.clear()
    # With Megatron-LM's default strictness, which fails on any requested key the checkpoint lacks.
    _load(ddp, opt, back_dir, strict=StrictHandling(MEGATRON_LM_DEFAULT_STRICTNESS))
    out["back_logs"] = list(logs.messages)
    out["back_mismatch"] = _load(ddp, opt, back_dir, other_mode=True)
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_microep.glue import compat

    ep_rank = fsep_layers(fsep)[0].microep_groups.ep_rank
    stock_layers = [m for m in stock_ddp.module.modules() if isinstance(m, MoELayer)]
    err = 0.0
    for stock_layer, layer in zip(stock_layers, fsep_layers(fsep)):
        mine = compat.expert_tensors(stock_layer.experts)
        n = len(mine)
        for i, tensor in enumerate(full_experts(layer)):
            local = torch.stack([t[i].detach() for t in mine])
            err = max(err, (tensor[ep_rank * n : (ep_rank + 1) * n] - local).abs().max().item())
    stock_params = dict(stock_ddp.named_parameters())
    for name, p in ddp.named_parameters():
        if getattr(p, "allreduce", True):
            err = max(err, (p.detach() - stock_params[name].detach()).abs().max().item())
    out["stock_to_fsep_err"] = err
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"FSEP GPT test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    tmp_dir = str(tmp_path_factory.mktemp("fsep"))
    with pytest.raises(RankFailedError, match=f"rank {KILLED_RANK} of 4 exited with code 17"):
        spawn_gloo(_parity_and_kill_rank, 4, seed, tmp_dir, timeout_s=400)
    launch1 = []
    for rank in range(4):
        with open(os.path.join(tmp_dir, f"launch1_rank{rank}.pkl"), "rb") as f:
            launch1.append(pickle.load(f))
        with open(os.path.join(tmp_dir, f"victim_rank{rank}.pkl"), "rb") as f:
            launch1[rank]["victim"] = pickle.load(f)
        with open(os.path.join(tmp_dir, f"resumed_layout_rank{rank}.pkl"), "rb") as f:
            launch1[rank]["resumed_layout"] = pickle.load(f)
        with open(os.path.join(tmp_dir, f"regather_bytes_rank{rank}.pkl"), "rb") as f:
            launch1[rank]["regather_bytes"] = pickle.load(f)
    launch2 = spawn_gloo(_restart_rank, 4, seed, tmp_dir, timeout_s=400)
    return launch1, launch2


def test_fsep_trains_like_stock_ep_with_a_new_layout_every_step(runs):
    launch1, _ = runs
    for rank, res in enumerate(launch1):
        assert res["init_equal"], f"rank {rank}: FSEP shards do not hold Megatron's initial experts"
        diffs = [abs(a - b) for a, b in zip(res["fsep"], res["stock"])]
        assert len(diffs) == STEPS and max(diffs) <= LOSS_TOL, f"rank {rank}: loss diffs {diffs}"
        assert max(res["grad_err"]) <= GRAD_TOL, f"rank {rank}: gradient rel errors {res['grad_err']}"
        assert max(res["norm_err"]) <= GRAD_TOL, f"rank {rank}: grad-norm rel errors {res['norm_err']}"
    losses = launch1[0]["stock"]
    assert losses[-1] < losses[0] - 0.1, "training did not learn"
    placements = launch1[0]["placements"]
    changed = [placements[i] != placements[i - 1] for i in range(1, STEPS)]
    # A plan started at step s is adopted at s + 1 (lag 1): new layouts from step 3 on, every step.
    assert all(changed[1:]), f"layout unchanged at steps {[i + 2 for i, c in enumerate(changed) if not c]}"


def test_scheduler_balances_over_the_fsep_layouts(runs):
    # On the rows the experts processed (a spy on the expert call; which expert a copy ran, by its
    # weights) and the router's choices, not the schedule's telemetry: every (token, expert) pair the
    # router chose ran exactly once, on a copy of that expert; some expert's tokens were split over
    # copies; the busiest rank ran fewer rows than under stock EP's home placement.
    launch1, _ = runs
    assert all(res["experts_distinct"] for res in launch1), "EP ranks hold identical experts"
    home = NUM_EXPERTS // len(launch1)  # home experts per rank
    split_calls = after = before = 0
    for layer in (1, 2):
        calls = calls_across_ranks(
            [res["expert_rows"] for res in launch1], [res["routed"] for res in launch1], layer, NUM_EXPERTS
        )
        assert len(calls) == STEPS * MICRO_BATCHES  # every micro-batch
        pairs = len(launch1) * MICRO_BATCH * SEQ_LEN * 2  # top-2 of every token
        split_calls += sum(assert_each_routed_pair_ran_once(calls, pairs, f"layer {layer}"))
        after += sum(max(call["rank_rows"]) for call in calls)
        before += sum(call["routed"].reshape(-1, home).sum(axis=1).max() for call in calls)
    assert split_calls > 0, "no expert's tokens were split over copies"
    assert after < before, (after, before)


def test_a_changed_layout_moves_no_optimizer_state(runs):
    launch1, _ = runs
    for res in launch1:
        for step in range(2, STEPS):
            # Adopting a layout sends the placement (a broadcast of a few integers), nothing else.
            assert res["adopt_bytes"][step] == res["placement_bytes"], (step, res["adopt_bytes"][step])
            assert res["adopt_calls"][step] == ["broadcast"]
        assert not any(res["state_moved"]), "optimizer state tensors were reallocated"


def test_measured_fsep_bytes_are_the_cost_models_charge(runs):
    # The bytes handed to the shard group's all-to-alls in every step (a spy on torch.distributed)
    # equal what the simulator's cost model charges for that step's layouts: keep (one gather and
    # one return per layer and micro-batch, 20 layouts) and regather (two gathers and one return).
    launch1, _ = runs
    for rank, res in enumerate(launch1):
        assert len(res["fsep_bytes"]) == STEPS and res["fsep_bytes"] == res["charged_bytes"], rank
        assert all(sent > 0 for sent, _ in res["fsep_bytes"])
        regather = res["regather_bytes"]
        assert len(regather) >= KILL_STEP - CKPT_STEPS[0] - 1
        assert all(measured == charged for measured, charged in regather), (rank, regather)


def test_next_layer_gather_is_prefetched(runs):
    launch1, _ = runs
    for res in launch1:
        # The second MoE layer's gather is started by the first in every micro-batch's forward.
        assert res["prefetch_hits"] == [0, STEPS * MICRO_BATCHES]
    # Under regather, the first layer's backward gather is also started early (by the second's backward).
    passes = (STEPS - CKPT_STEPS[1]) * MICRO_BATCHES
    for res in runs[1]:
        assert res["regather_prefetch_hits"] == [passes, passes]


def test_checkpoint_loads_at_other_ep_size_and_into_stock(runs):
    launch1, launch2 = runs
    for rank in range(4):
        reference = launch1[rank]["fsep"][CKPT_STEPS[0] :]
        for name in ("fsep_ep2", "stock_ep2"):
            diffs = [abs(a - b) for a, b in zip(launch2[rank][name], reference)]
            assert len(diffs) == STEPS - CKPT_STEPS[0] and max(diffs) <= LOSS_TOL, f"rank {rank} {name}: {diffs}"
        assert launch2[rank]["stock_to_fsep_err"] == 0.0


def test_killed_rank_restart_continues_the_curve(runs):
    launch1, launch2 = runs
    for rank in range(4):
        reference = launch1[rank]["fsep"]
        victim = launch1[rank]["victim"]
        assert len(victim) == KILL_STEP - CKPT_STEPS[0] - 1  # the killed step never finished
        diffs = [abs(a - b) for a, b in zip(victim, reference[CKPT_STEPS[0] :])]
        assert max(diffs) <= LOSS_TOL, f"rank {rank}: resumed-from-checkpoint diffs {diffs}"
        resumed = launch2[rank]["resumed_ep4"]
        diffs = [abs(a - b) for a, b in zip(resumed, reference[CKPT_STEPS[1] :])]
        assert len(resumed) == STEPS - CKPT_STEPS[1] and max(diffs) <= LOSS_TOL, f"rank {rank}: {diffs}"


def _layout_keys(mismatch_keys, layout_key):
    # Megatron stacks the layers' objects along a layer axis: one key for both MoE layers.
    return mismatch_keys == [f"decoder.layers.mlp.{layout_key}"]


def test_resumed_run_uses_the_saved_layout_and_history(runs):
    launch1, _ = runs
    first = CKPT_STEPS[0] + 1
    for rank, res in enumerate(launch1):
        placements, histories = res["resumed_layout"]
        # The plan pending at the step-14 save is the step-15 layout of the run that saved it.
        assert placements == res["placements"][first - 1], f"rank {rank}: resumed with another layout"
        assert placements != res["placements"][first - 2]
        assert histories == res["histories"][first - 1], f"rank {rank}: resumed with another routing history"
        assert len(histories[0]) > 0


def test_layout_state_across_ep_sizes_and_modes(runs):
    _, launch2 = runs
    for rank, res in enumerate(launch2):
        key = res["layout_key"]
        # EP = 4 layout at EP = 2: history kept (4-step window), re-planned at the first step, logged
        # once per layer (EP rank 0 of expert-data-parallel replica 0: global rank 0).
        assert res["fsep_ep2_history_steps"] == [4, 4]
        replanned = [
            m for m in res["fsep_ep2_logs"] if "layout is for EP=4" in m and "re-planned at the first step" in m
        ]
        assert len(replanned) == (2 if rank == 0 else 0), res["fsep_ep2_logs"]
        # Stock EP leaves exactly the layers' layout objects of the FSEP checkpoint unread ...
        missing, unexpected = res["stock_ep2_mismatch"]
        assert _layout_keys(missing, key) and unexpected == [], res["stock_ep2_mismatch"]
        # ... and FSEP, told by the stock checkpoint's content metadata that it has no layout state,
        # does not ask for one (it loaded under Megatron-LM's default strictness), and says so.
        assert res["back_mismatch"] == ([], []), res["back_mismatch"]
        absent = [m for m in res["back_logs"] if "no FSEP layout state" in m]
        assert len(absent) == (2 if rank == 0 else 0), res["back_logs"]


def test_malformed_layout_state_is_rejected(runs):
    _, launch2 = runs
    expected = {
        "not a dict": "malformed FSEP layout state",
        "field missing": "malformed FSEP layout state",
        "other model": "is for 16 experts, this layer has 8",
        "expert without copy": "not an FSEP layout",
        "too many copies on a rank": "not an FSEP layout",
        "history shape": "saved routing history, step 0",
        "negative loads": "saved current-step loads",
        "format": "format 99",
    }
    for res in launch2:
        for name, fragment in expected.items():
            message = res["bad_states"][name]
            assert message is not None and fragment in message and "FSEP layer" in message, (name, message)
