"""MicroEP trained through Megatron's own training stack on CPU ranks, against stock EP.

Megatron's ``DistributedDataParallel`` (gradient buffers), ``get_megatron_optimizer`` (Adam, fp32,
with and without the distributed optimizer, gradient clipping) and ``get_forward_backward_func``
(several micro-batches) train a small MoE ``GPTModel`` for a few steps, once with the stock
alltoall dispatcher and once with ``microep_layer_spec`` from the same weights. Routing is skewed
towards expert 0 and MicroEP holds a replica of it on the other EP rank, so replicas carry tokens in
every micro-batch and their gradients must come home before Megatron reduces expert gradients.

The placement changes at every step boundary (the replica moves between two experts), so replica
weights are refreshed and gradients returned for a new layout each step.

Launch 1 (4 ranks, EP = 2, expert data parallelism 2, no pipelining):
- DDP without overlap, non-distributed and distributed optimizer, 3 micro-batches: losses within
  1e-4, parameters within 1e-5 relative; the expert gradients that Megatron's expert-DP reduction
  starts from (captured as each bucket group starts reducing) already equal stock's, replicas'
  included;
- DDP with overlapped reduction, distributed optimizer with overlapped parameter all-gather, with 3
  micro-batches and with 1; overlapped reduction with 8 micro-batches and full activation
  recompute: the same parity, and the same for the gradients as the overlapped reduction starts
  (in the backward: the replica gradients must be in main_grad by then);
- controls (the checks can fail): with the replica-gradient return removed, parity breaks; with
  the replica refresh started before DDP's pre-hooks finish the overlapped parameter all-gather
  (stale home weights), parity breaks;
- bf16 (both optimizers): MicroEP at most 1.1x as far from an fp32 run as stock is (replica gradients
  accumulate and return in fp32, so only the summation order differs).
Launch 2 (4 ranks, PP = 2 x EP = 2): Megatron's 1F1B schedule, same parity per stage, without and
with overlapped reduction (then ``config.grad_sync_func`` starts the last stage's reduction after
its last backward, which ran inside ``no_sync``).
"""

import contextlib
import os
import random

import pytest
import torch
from _expert_rows import count_expert_rows
from _gpt_case import forward_step, skew_router, synthetic_batches, tiny_moe_config

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo

WORLD = 4
NUM_EXPERTS = 4
# Step s uses PLACEMENTS[s % 2]: expert 0 (home EP rank 0, hot) or expert 1 (same home, so its tokens
# move off the overloaded rank 0) also on EP rank 1.
PLACEMENTS = ([[0, 1], [0], [1], [1]], [[0], [0, 1], [1], [1]])
VOCAB, SEQ_LEN, MICRO_BATCH = 64, 16, 2
MICRO_BATCHES = 3
TOPK = 2
STEPS = 4
LOSS_TOL = 1e-4
PARAM_REL_TOL = 1e-5


def _seed() -> int:
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"training-stack test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return seed


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _config(dispatcher: str, ep: int, pp: int, layers: int, dtype=torch.float32, recompute=False):
    from megatron_microep.glue.config import MicroEPConfig, attach_microep_config

    config = tiny_moe_config(
        dispatcher,
        ep,
        NUM_EXPERTS,
        dtype,
        num_layers=layers,
        moe_router_topk=TOPK,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=False,
        **(
            {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
            if recompute
            else {}
        ),
    )
    if dispatcher == "microep":
        attach_microep_config(config, MicroEPConfig(redundant_slots=1, replan_interval=0))
    return config


def _build(dispatcher: str, ep: int, pp: int, layers: int, state=None, dtype=torch.float32, recompute=False):
    """A GPTModel for this pipeline stage; stock weights skewed towards expert 0, or ``state``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_microep.glue.layer import microep_layers
    from megatron_microep.glue.spec import microep_layer_spec
    from megatron_microep.planning.placement import Placement

    config = _config(dispatcher, ep, pp, layers, dtype, recompute)
    spec = (
        microep_layer_spec
        if dispatcher == "microep"
        else get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="LayerNorm")
    )
    stage, stages = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    model = GPTModel(
        config,
        spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ_LEN,
        pre_process=stage == 0,
        post_process=stage == stages - 1,
        position_embedding_type="rope",
    )
    if state is None:
        skew_router(model, [0])
    else:
        model.load_state_dict(state, strict=True)
    for layer in microep_layers(model):
        layer.set_placement(Placement.from_lists(PLACEMENTS[1], ep))
    return model, config


def _wrap(model, config, overlap: bool, distributed_optimizer: bool):
    """Megatron's DDP and optimizer, wired into the config as Megatron-LM's training loop does
    (bf16 models inside Megatron's Float16Module, fp32 main parameters in the optimizer).

    ``overlap``: gradient reduction overlapped with backward and, with the distributed optimizer,
    the parameter all-gather with the next forward (DDP's forward pre-hooks wait for it).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    if config.bf16:
        model = Float16Module(config, model)

    overlap_param_gather = overlap and distributed_optimizer
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap,
        use_distributed_optimizer=distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
        bucket_size=2000 if overlap else None,  # several buckets, so communication interleaves with compute
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=3e-3,
            weight_decay=0.01,
            clip_grad=1.0,
            bf16=config.bf16,
            fp16=False,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=distributed_optimizer,
            overlap_param_gather=overlap_param_gather,
        ),
        [ddp],
    )
    config.no_sync_func = ddp.no_sync
    config.grad_sync_func = ddp.start_grad_sync if overlap else None
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer


def _micro_batches(seed: int, step: int, count: int = MICRO_BATCHES):
    from megatron.core import parallel_state

    # Same data on the pipeline stages of one data-parallel rank, different across them.
    dp_rank = parallel_state.get_data_parallel_rank()
    return synthetic_batches(seed + 1000 * step + dp_rank, VOCAB, SEQ_LEN, MICRO_BATCH, count)


def _capture_reduction_starts(ddp, captured: list[dict]) -> None:
    """As each expert bucket group starts its first reduction of a step, copy its parameters'
    main_grad into ``captured[-1]`` (by name): what Megatron's expert-DP reduction starts from, on
    every path (overlapped register_grad_ready, grad_sync_func, finalize_model_grads)."""
    names = {p: n for n, p in ddp.module.named_parameters()}

    def capturing(bucket_group):
        start_grad_sync = bucket_group.start_grad_sync

        def capture(*args, **kwargs):
            for p in bucket_group.params:
                captured[-1].setdefault(names[p], p.main_grad.detach().clone())
            return start_grad_sync(*args, **kwargs)

        return capture

    for bucket_group in ddp.expert_parallel_bucket_groups:
        bucket_group.start_grad_sync = capturing(bucket_group)


def _train(ddp, optimizer, config, seed: int, micro_batches: int = MICRO_BATCHES):
    """STEPS optimizer steps through get_forward_backward_func; per step the mean micro-batch loss
    (last stage; None elsewhere), and the expert gradients as DDP starts reducing them. MicroEP
    layers switch placement at every step boundary."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_microep.glue.layer import microep_layers, set_training_step
    from megatron_microep.planning.placement import Placement

    pre_reduction: list[dict] = []
    _capture_reduction_starts(ddp, pre_reduction)
    forward_backward = get_forward_backward_func()
    losses = []
    for step in range(1, STEPS + 1):
        pre_reduction.append({})
        for layer in microep_layers(ddp):
            layer.set_placement(Placement.from_lists(PLACEMENTS[step % 2], layer.microep_groups.ep_size))
        set_training_step(step)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        results = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(_micro_batches(seed, step, micro_batches)),
            model=[ddp],
            num_microbatches=micro_batches,
            seq_length=SEQ_LEN,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        update_successful, grad_norm, _ = optimizer.step()
        assert update_successful
        losses.append(sum(r["lm loss"].item() for r in results) / len(results) if results else None)
    return losses, pre_reduction


def _evaluate(ddp, seed: int):
    """Megatron-LM's evaluation after a training step: eval mode, forward only, and the step number
    (``args.curr_iteration``) still that of the step just taken. Mean loss per micro-batch (last
    stage; empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp.eval()
    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(_micro_batches(seed + 1, STEPS + 1)),
            model=[ddp],
            num_microbatches=MICRO_BATCHES,
            seq_length=SEQ_LEN,
            micro_batch_size=MICRO_BATCH,
            forward_only=True,
        )
    ddp.train()
    return [r["lm loss"].item() for r in results]


@contextlib.contextmanager
def _replica_gradients_dropped():
    """The bug the parity checks must catch: replica gradients never reach their home expert."""
    from megatron_microep.runtime.replicas import ReplicaExchange

    original = ReplicaExchange.deliver

    def dropped(self, returned, into):
        pass

    ReplicaExchange.deliver = dropped
    try:
        yield
    finally:
        ReplicaExchange.deliver = original


@contextlib.contextmanager
def _refresh_before_param_gather():
    """The bug the overlapped-param-gather case must catch: replica weights read at the start of the
    step, before DDP's forward pre-hooks have all-gathered the updated home weights."""
    from megatron_microep.glue import replica_sync

    original = replica_sync.params_current
    replica_sync.params_current = lambda module: True
    try:
        yield
    finally:
        replica_sync.params_current = original


def _params(model):
    while hasattr(model, "module"):  # DDP (and Float16Module) wrap the GPTModel
        model = model.module
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _state(model):
    """A copy: optimizers write updated weights into the parameters the state dict aliases."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}


def _ep_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_rank()


def _assert_expert_rows(results, label, micro_batches=MICRO_BATCHES):
    """On the rows the experts processed (a spy on the expert call, per rank), not the telemetry: the
    EP rank holding a replica (EP rank 1 in both ``PLACEMENTS``) ran replica rows in every training
    expert call, the other EP rank none; over all ranks every routed (token, expert) pair ran exactly
    once per call."""
    calls = 0
    for rank, res in enumerate(results):
        rows = res["expert_rows"]
        training = [call["replica"] for call in rows if call["training"]]
        assert len(training) >= STEPS * micro_batches, f"{label} rank {rank}: {len(training)} expert calls"
        if res["ep_rank"] == 1:
            assert all(training), f"{label} rank {rank}: replica idle in some micro-batch: {training}"
        else:
            assert not any(training), f"{label} rank {rank}: replica rows on a rank without replicas"
        calls += len(rows)
    processed = sum(call["rows"] for res in results for call in res["expert_rows"])
    assert processed == calls * MICRO_BATCH * SEQ_LEN * TOPK, f"{label}: {processed} rows for {calls} calls"


# Stock runs by (overlap, distributed optimizer, micro-batches, recompute), shared by the cases of one launch.
_STOCK_RUNS: dict[tuple, dict] = {}


def _stock_run(seed, ep, pp, layers, overlap, distributed_optimizer, micro_batches, recompute):
    key = (ep, pp, layers, overlap, distributed_optimizer, micro_batches, recompute)
    if key not in _STOCK_RUNS:
        stock, config = _build("alltoall", ep, pp, layers, recompute=recompute)
        state, start = _state(stock), _params(stock)
        ddp, opt = _wrap(stock, config, overlap, distributed_optimizer)
        losses, pre = _train(ddp, opt, config, seed, micro_batches=micro_batches)
        _STOCK_RUNS[key] = {
            "state": state,
            "start": start,
            "losses": losses,
            "pre": pre,
            "eval": _evaluate(ddp, seed),
            "params": _params(ddp),
        }
    return _STOCK_RUNS[key]


def _run_pair(
    seed,
    ep,
    pp,
    layers,
    overlap,
    distributed_optimizer,
    micro_batches=MICRO_BATCHES,
    recompute=False,
    control=contextlib.nullcontext,
):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    stock = _stock_run(seed, ep, pp, layers, overlap, distributed_optimizer, micro_batches, recompute)
    start, stock_losses, stock_pre, stock_eval = stock["start"], stock["losses"], stock["pre"], stock["eval"]
    micro, micro_config = _build("microep", ep, pp, layers, state=stock["state"], recompute=recompute)
    micro_ddp, micro_opt = _wrap(micro, micro_config, overlap, distributed_optimizer)
    with control(), count_expert_rows() as expert_rows:
        micro_losses, micro_pre = _train(micro_ddp, micro_opt, micro_config, seed, micro_batches=micro_batches)
        micro_eval = _evaluate(micro_ddp, seed)
    stock_params, micro_params = stock["params"], _params(micro_ddp)
    return {
        "schedule": get_forward_backward_func().__name__,
        "param_gather_pre_hooks": bool(getattr(micro_ddp, "use_forward_hook", False)),
        "optimizers": sorted({type(o).__name__ for o in getattr(micro_opt, "chained_optimizers", [micro_opt])}),
        "stock_losses": stock_losses,
        "micro_losses": micro_losses,
        "param_rel": {n: _rel(micro_params[n], p) for n, p in stock_params.items()},
        "same_names": sorted(stock_params) == sorted(micro_params),
        "moved": max((p - start[n]).abs().max().item() for n, p in stock_params.items()),
        "pre_reduction_rel": [{n: _rel(m[n], s[n]) for n in s} for s, m in zip(stock_pre, micro_pre)],
        "expert_rows": expert_rows,
        "ep_rank": _ep_rank(),
        "eval": (stock_eval, micro_eval),
    }


CASES = {
    # name: _run_pair keywords
    "plain": {"overlap": False, "distributed_optimizer": False},
    "distopt": {"overlap": False, "distributed_optimizer": True},
    "overlap_distopt": {"overlap": True, "distributed_optimizer": True},
    "overlap_distopt_m1": {"overlap": True, "distributed_optimizer": True, "micro_batches": 1},
    "overlap_m8_recompute": {"overlap": True, "distributed_optimizer": False, "micro_batches": 8, "recompute": True},
    "no_replica_grads": {"overlap": False, "distributed_optimizer": False, "control": _replica_gradients_dropped},
    "stale_refresh": {"overlap": True, "distributed_optimizer": True, "control": _refresh_before_param_gather},
}


def _run_bf16(seed, distributed_optimizer):
    """bf16 weights (fp32 main weights and gradient reduction), MicroEP and stock alltoall, each
    measured against the same model trained in fp32: MicroEP sums a replicated expert's gradient in
    parts, so it rounds differently from stock; it must not round worse."""
    runs = {}
    for name, dispatcher, dtype in (
        ("stock", "alltoall", torch.bfloat16),
        ("microep", "microep", torch.bfloat16),
        ("fp32", "alltoall", torch.float32),
    ):
        state = runs["stock"][0] if runs else None
        model, config = _build(dispatcher, 2, 1, 2, state=state, dtype=dtype)
        initial = _state(model)
        ddp, optimizer = _wrap(model, config, False, distributed_optimizer)
        with count_expert_rows() as expert_rows:
            losses, _ = _train(ddp, optimizer, config, seed)
        optimizers = sorted({type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])})
        runs[name] = (initial, losses, _params(ddp), expert_rows, optimizers)
    reference = runs["fp32"][2]

    def error(params):  # relative to the fp32 run, over all parameters of this rank
        diff = sum((params[n] - p).norm() ** 2 for n, p in reference.items()) ** 0.5
        return (diff / sum(p.norm() ** 2 for p in reference.values()) ** 0.5).item()

    return {
        "losses": {name: run[1] for name, run in runs.items()},
        "error": {name: error(runs[name][2]) for name in ("stock", "microep")},
        "expert_rows": runs["microep"][3],
        "ep_rank": _ep_rank(),
        "optimizers": runs["microep"][4],
    }


def _ep2_edp2_rank(rank, world_size, seed):
    init_megatron_parallel(expert_model_parallel_size=2, seed=seed)
    results = {name: _run_pair(seed, 2, 1, 2, **kwargs) for name, kwargs in CASES.items()}
    for distributed_optimizer in (False, True):
        results[f"bf16_distopt={distributed_optimizer}"] = _run_bf16(seed, distributed_optimizer)
    return results


def _pp2_ep2_rank(rank, world_size, seed):
    from megatron.core import parallel_state

    init_megatron_parallel(pipeline_model_parallel_size=2, expert_model_parallel_size=2, seed=seed)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    return {
        overlap: {**_run_pair(seed, 2, 2, 4, overlap=overlap, distributed_optimizer=False), "stage": stage}
        for overlap in (False, True)
    }


@pytest.fixture(scope="module")
def ep2_edp2_run():
    return spawn_gloo(_ep2_edp2_rank, WORLD, _seed(), timeout_s=600)


@pytest.fixture(scope="module")
def pp2_ep2_run():
    return spawn_gloo(_pp2_ep2_rank, WORLD, _seed(), timeout_s=600)


def _assert_parity(rank, res, label):
    assert res["same_names"]
    assert len(res["stock_losses"]) == STEPS
    if res["stock_losses"][0] is not None:
        diffs = [abs(a - b) for a, b in zip(res["micro_losses"], res["stock_losses"])]
        assert max(diffs) <= LOSS_TOL, f"{label} rank {rank}: loss diffs {diffs}"
    worst = max(res["param_rel"].items(), key=lambda kv: kv[1])
    print(
        f"{label} rank {rank}: losses stock {res['stock_losses']} microep {res['micro_losses']}; worst "
        f"parameter {worst[0]} {worst[1]:.1e}; moved {res['moved']:.2e}; replica rows "
        f"{[call['replica'] for call in res['expert_rows']]}"
    )
    assert worst[1] <= PARAM_REL_TOL, f"{label} rank {rank}: parameter {worst[0]} differs by {worst[1]:.2e}"
    assert res["moved"] > 1e-3, f"{label} rank {rank}: training did not change the weights"


@pytest.mark.parametrize("case", ["plain", "distopt", "overlap_distopt", "overlap_distopt_m1", "overlap_m8_recompute"])
def test_microep_matches_stock_through_ddp_optimizer_and_schedule(ep2_edp2_run, case):
    distributed_optimizer = CASES[case]["distributed_optimizer"]
    expected_optimizer = "DistributedOptimizer" if distributed_optimizer else "FP32Optimizer"
    for rank, res in enumerate(ep2_edp2_run):
        assert res[case]["schedule"] == "forward_backward_no_pipelining"
        assert res[case]["optimizers"] == [expected_optimizer]
        assert res[case]["param_gather_pre_hooks"] == (CASES[case]["overlap"] and distributed_optimizer)
        _assert_parity(rank, res[case], case)
    _assert_expert_rows([res[case] for res in ep2_edp2_run], case, CASES[case].get("micro_batches", MICRO_BATCHES))


@pytest.mark.parametrize("case", ["plain", "distopt", "overlap_distopt", "overlap_distopt_m1", "overlap_m8_recompute"])
def test_expert_dp_reduction_starts_from_folded_replica_gradients(ep2_edp2_run, case):
    for rank, res in enumerate(ep2_edp2_run):
        per_step = res[case]["pre_reduction_rel"]
        assert len(per_step) == STEPS and all(per_step)
        worst = max(rel for step in per_step for rel in step.values())
        print(f"rank {rank}: pre-reduction expert gradients, worst relative difference {worst:.1e}")
        assert worst <= PARAM_REL_TOL, f"rank {rank}: pre-reduction expert gradients differ by {worst:.2e}"


def test_parity_breaks_without_replica_gradient_return(ep2_edp2_run):
    _assert_expert_rows([res["no_replica_grads"] for res in ep2_edp2_run], "no_replica_grads")
    for rank, res in enumerate(ep2_edp2_run):
        control = res["no_replica_grads"]
        worst = max(rel for step in control["pre_reduction_rel"] for rel in step.values())
        print(
            f"rank {rank}: replica gradients dropped: expert gradient {worst:.1e}, parameters "
            f"{max(control['param_rel'].values()):.1e}"
        )
        assert worst > 1e-2, f"rank {rank}: dropping replica gradients went unnoticed ({worst:.2e})"
        assert max(control["param_rel"].values()) > 10 * PARAM_REL_TOL


def test_parity_breaks_with_replica_weights_read_before_the_parameter_all_gather(ep2_edp2_run):
    for rank, res in enumerate(ep2_edp2_run):
        control = res["stale_refresh"]
        assert control["param_gather_pre_hooks"]
        worst = max(control["param_rel"].values())
        print(f"rank {rank}: replica weights read before the all-gather: parameters {worst:.1e}")
        assert worst > 10 * PARAM_REL_TOL, f"rank {rank}: stale replica weights went unnoticed ({worst:.2e})"


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_bf16_microep_as_close_to_fp32_as_stock(ep2_edp2_run, distributed_optimizer):
    expected_optimizer = "DistributedOptimizer" if distributed_optimizer else "Float16OptimizerWithFloat16Params"
    key = f"bf16_distopt={distributed_optimizer}"
    _assert_expert_rows([res[key] for res in ep2_edp2_run], key)
    for rank, res in enumerate(ep2_edp2_run):
        res = res[f"bf16_distopt={distributed_optimizer}"]
        print(f"bf16 rank {rank}: losses {res['losses']}; parameters vs fp32 run: {res['error']}")
        assert res["optimizers"] == [expected_optimizer]
        losses = res["losses"]
        assert losses["microep"][0] == pytest.approx(losses["stock"][0], abs=LOSS_TOL)  # same weights, same data
        assert losses["microep"][-1] < losses["microep"][0]
        assert 0 < res["error"]["stock"] < 0.05  # bf16 rounding really shows, and stays small
        assert res["error"]["microep"] <= 1.1 * res["error"]["stock"], f"rank {rank}: {res['error']}"


def test_evaluation_after_a_step_matches_stock(ep2_edp2_run):
    # Replica weights fetched for a step must not be reused after its optimizer step (seen 1-3e-3
    # off stock on the replica's rank when glue/layer.py still reused them in evaluation).
    for rank, res in enumerate(ep2_edp2_run):
        stock_eval, micro_eval = res["plain"]["eval"]
        assert len(stock_eval) == MICRO_BATCHES
        diffs = [abs(a - b) for a, b in zip(micro_eval, stock_eval)]
        print(f"evaluation rank {rank}: loss differences {diffs}")
        assert max(diffs) <= LOSS_TOL, f"rank {rank}: evaluation loss diffs {diffs}"


@pytest.mark.parametrize("overlap", [False, True])
def test_pipeline_1f1b_matches_stock(pp2_ep2_run, overlap):
    assert sorted(res[overlap]["stage"] for res in pp2_ep2_run) == [0, 0, 1, 1]
    for rank, res in enumerate(pp2_ep2_run):
        res = res[overlap]
        assert res["schedule"] == "forward_backward_pipelining_without_interleaving"
        _assert_parity(rank, res, f"pp2_ep2 overlap={overlap}")
        if res["stage"] == 1:
            assert all(loss is not None for loss in res["stock_losses"])
    _assert_expert_rows([res[overlap] for res in pp2_ep2_run], f"pp2_ep2 overlap={overlap}")
