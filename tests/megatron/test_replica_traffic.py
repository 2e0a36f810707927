"""Replica traffic per optimizer step, measured on the collectives the runtime calls, against its accounting.

One launch of 2 CPU ranks (EP = 2). A GPTModel with MicroEP layers (one replica slot per rank; the
placement switches between two at every step boundary, routing skewed to the replicated experts)
trains through Megatron's protocol: DDP, get_forward_backward_func, finalize_model_grads and
Megatron's optimizer. A spy on ``torch.distributed.all_to_all_single`` records the bytes of the
input tensor every call is handed, by process group and training step.

- M = 2 and M = 4 identical micro-batches per step (fp32, overlapped gradient reduction,
  ``config.no_sync_func`` set): the replica group carries exactly one refresh and one fp32
  gradient return per replica and step, the bytes ``planning.replica_traffic`` counts for each
  step's placement, in both runs; the token all-to-alls of the first step scale with M.
- bf16 weights, distributed optimizer, no ``config.no_sync_func`` (Megatron-LM without
  ``--overlap-grad-reduce``): the refresh moves bf16, the return fp32, still once per step; from
  the second step (once the schedule runs MicroEP's counting no_sync) the returns start in the
  backward, before its last token all-to-all, in the first at finalize_model_grads.
- The simulator replays the fp32 M = 2 run's recorded trace (``--microep-trace-dir``) with the
  run's placements and charges per step the replica bytes the spy measured on both ranks.
"""

import os
import random

import numpy as np
import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from _gpt_case import forward_step, skew_router, synthetic_batches, tiny_moe_config  # noqa: E402

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo  # noqa: E402

WORLD = 2
NUM_EXPERTS = 4
PLACEMENTS = ([[0, 1], [0], [1], [1]], [[0], [0], [1, 0], [1]])  # step s uses PLACEMENTS[s % 2]
VOCAB, SEQ_LEN, MICRO_BATCH, HIDDEN, FFN = 64, 16, 2, 32, 32
LAYERS = 2
STEPS = 3


def _seed() -> int:
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"replica-traffic test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return seed


class _AllToAllSpy:
    """Records (step, group, input bytes, input dtype) of every ``all_to_all_single`` call."""

    def __init__(self):
        self.calls = []
        self.step = None

    def __enter__(self):
        import torch.distributed as dist

        self._original = original = dist.all_to_all_single

        def spy(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            self.calls.append((self.step, group, input.numel() * input.element_size(), input.dtype))
            return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = spy
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        dist.all_to_all_single = self._original


def _model(seed, dtype, trace_dir, dispatcher="microep", microep=None, hot=(0, 2)):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_microep.glue import compat
    from megatron_microep.glue.config import MicroEPConfig, attach_microep_config
    from megatron_microep.glue.spec import microep_layer_spec

    config = tiny_moe_config(dispatcher, 2, NUM_EXPERTS, dtype, num_layers=LAYERS, moe_ffn_hidden_size=FFN)
    if dispatcher == "microep":
        settings = microep or MicroEPConfig(redundant_slots=1, replan_interval=0, trace_dir=trace_dir)
        attach_microep_config(config, settings)
        spec = microep_layer_spec
    else:
        spec = compat.stock_decoder_block_spec(config, False)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ_LEN, position_embedding_type="rope")
    skew_router(model, list(hot))  # PLACEMENTS replicate experts 0 and 2
    return model, config


def _train(
    seed,
    micro_batches,
    dtype=torch.float32,
    overlap=True,
    distributed_optimizer=False,
    trace_dir=None,
    model=None,
    placements=PLACEMENTS,
):
    """STEPS steps of ``micro_batches`` identical micro-batches (placements switched at every step
    boundary unless ``placements`` is None); per step: replica-group bytes and calls, other
    all-to-all bytes, and the bytes planning.replica_traffic expects from this rank."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from megatron_microep.glue.layer import close_traces, microep_layers, set_training_step
    from megatron_microep.planning.placement import Placement
    from megatron_microep.planning.replica_traffic import replica_step_traffic, replicas_of

    model, config = model or _model(seed, dtype, trace_dir)
    layers = microep_layers(model)
    wrapped = Float16Module(config, model) if config.bf16 else model
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=overlap, use_distributed_optimizer=distributed_optimizer
        ),
        wrapped,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=3e-3,
            bf16=config.bf16,
            params_dtype=dtype,
            use_distributed_optimizer=distributed_optimizer,
        ),
        [ddp],
    )
    config.no_sync_func = ddp.no_sync if overlap else None  # as Megatron-LM sets it
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    batch = synthetic_batches(seed, VOCAB, SEQ_LEN, MICRO_BATCH, 1)
    ep_rank = layers[0].microep_groups.ep_rank if layers else None
    param_bytes = torch.empty((), dtype=dtype).element_size()
    per_step, losses = {}, []
    with _AllToAllSpy() as spy:
        for step in range(1, STEPS + 1):
            for layer in layers if placements else []:
                layer.set_placement(Placement.from_lists(placements[step % 2], 2))
            set_training_step(step)
            spy.step = step
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            results = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(batch * micro_batches),
                model=[ddp],
                num_microbatches=micro_batches,
                seq_length=SEQ_LEN,
                micro_batch_size=MICRO_BATCH,
                forward_only=False,
            )
            assert optimizer.step()[0]
            losses.append(sum(r["lm loss"].item() for r in results) / len(results))
            expected = 0.0
            for layer in layers:
                numel = sum(t.numel() for t in layer.replica_home_params()[:2])  # one expert: fc1, fc2
                _, home, holder = replicas_of(layer.layout.placement)
                expected += replica_step_traffic(home, holder, numel, param_bytes).sent(2)[ep_rank]
            per_step[step] = {"expected": expected}
    close_traces()
    replica_group = layers[0]._replicas.group if layers else None
    for step, counts in per_step.items():
        calls = [c for c in spy.calls if c[0] == step]
        replica = [c for c in calls if c[1] is replica_group]
        counts["replica_bytes"] = sum(c[2] for c in replica)
        counts["replica_calls"] = len(replica)
        counts["replica_dtypes"] = sorted({str(c[3]) for c in replica})
        counts["token_bytes"] = sum(c[2] for c in calls if c[1] is not replica_group)
        # Gradient returns (fp32) issued while the backward still had token all-to-alls to run.
        last_token_call = max((i for i, c in enumerate(calls) if c[1] is not replica_group), default=0)
        counts["returns_in_backward"] = sum(
            c[1] is replica_group and c[3] == torch.float32 for c in calls[:last_token_call]
        )
    return {
        "steps": per_step,
        "placements": [placements[s % 2] for s in range(1, STEPS + 1)] if placements else None,
        "own_group": replica_group is not None and replica_group is not layers[0].microep_groups.ep,
        "losses": losses,
        "params": {n: p.detach().float().clone() for n, p in model.named_parameters()},
        "layers": [
            {
                "redundant_slots": layer.layout.redundant_slots,
                "replan_interval": layer.placement_controller.replan_interval,
                "has_replicas": layer.layout.has_replicas,
                "replica_group": layer._replicas.group is not None,
                "version": layer.placement_controller.version,
                # DDP found: every home expert's bucket group waits for the replica gradients.
                "guarded": all(p in layer.replica_buckets for p in layer.replica_home_params()),
            }
            for layer in layers
        ],
    }


def _defaults_and_stock(seed):
    """With the settings' defaults only: replicas and re-planning on this model; with
    ``redundant_slots=0``: stock Megatron EP (against the alltoall dispatcher from the same weights)."""
    from megatron_microep.glue.config import MicroEPConfig

    defaults = _train(
        seed, 2, model=_model(seed, torch.float32, None, microep=MicroEPConfig(), hot=[0]), placements=None
    )
    stock_model = _model(seed, torch.float32, None, dispatcher="alltoall", hot=[0])
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in stock_model[0].state_dict().items()}
    r0_model = _model(seed, torch.float32, None, microep=MicroEPConfig(redundant_slots=0), hot=[0])
    r0_model[0].load_state_dict(state, strict=True)
    r0 = _train(seed, 2, model=r0_model, placements=None)
    stock = _train(seed, 2, model=stock_model, placements=None)
    return {"defaults": defaults, "r0": r0, "stock": stock}


def _rank(rank, world_size, seed, trace_dir):
    init_megatron_parallel(expert_model_parallel_size=2, seed=seed)
    return {
        "m2": _train(seed, 2, trace_dir=trace_dir),
        "m4": _train(seed, 4),
        "bf16": _train(seed, 2, dtype=torch.bfloat16, overlap=False, distributed_optimizer=True),
        **_defaults_and_stock(seed),
    }


@pytest.fixture(scope="module")
def traffic_run(tmp_path_factory):
    trace_dir = str(tmp_path_factory.mktemp("replica_trace"))
    return spawn_gloo(_rank, WORLD, _seed(), trace_dir, timeout_s=600), trace_dir


def test_replica_bytes_per_step_do_not_depend_on_micro_batches(traffic_run):
    results, _ = traffic_run
    for rank, res in enumerate(results):
        for step in range(1, STEPS + 1):
            m2, m4 = res["m2"]["steps"][step], res["m4"]["steps"][step]
            print(f"rank {rank} step {step}: M=2 {m2}, M=4 {m4}")
            for counts in (m2, m4):
                assert res["m2"]["own_group"]  # replica traffic does not queue behind the token all-to-alls
                assert counts["replica_calls"] == 2 * LAYERS  # one refresh, one gradient return per layer
                assert counts["replica_bytes"] == counts["expected"] > 0
            assert m2["replica_bytes"] == m4["replica_bytes"]
        assert all(layer["guarded"] for run in ("m2", "m4", "bf16") for layer in res[run]["layers"])
        # Same weights in the first step, identical micro-batches: the token traffic scales with M.
        assert res["m4"]["steps"][1]["token_bytes"] == 2 * res["m2"]["steps"][1]["token_bytes"] > 0


def test_bf16_weights_refresh_in_bf16_and_gradients_return_in_fp32(traffic_run):
    results, _ = traffic_run
    for rank, res in enumerate(results):
        for step, counts in res["bf16"]["steps"].items():
            print(f"bf16 rank {rank} step {step}: {counts}")
            assert counts["replica_calls"] == 2 * LAYERS
            assert counts["replica_bytes"] == counts["expected"] > 0
            assert counts["replica_dtypes"] == ["torch.bfloat16", "torch.float32"]
            # Megatron-LM leaves config.no_sync_func None without overlap; MicroEP's counting wrapper is
            # in place from the second step's schedule on: the returns then start in the backward.
            assert counts["returns_in_backward"] == (0 if step == 1 else LAYERS)


def test_simulator_charges_the_measured_replica_bytes(traffic_run):
    from megatron_microep.planning.placement import Placement
    from megatron_microep.planning.policies import Layout
    from megatron_microep.planning.policies.microep import MicroEpParams, MicroEpPolicy
    from megatron_microep.simulator.cost import CostModel
    from megatron_microep.simulator.engine import Simulation
    from megatron_microep.simulator.traces import read_native

    results, trace_dir = traffic_run
    placements = [Placement.from_lists(p, WORLD) for p in results[0]["m2"]["placements"]]

    class Replay(MicroEpPolicy):
        """The run's placement of each step (the scheduler as microep's)."""

        def history_needs(self):
            return (1, STEPS)

        def initial_placement(self):
            return placements[0]

        def place(self, history, current):
            return placements[len(history.step_tokens)]  # one per completed step

    layout = Layout(num_gpus=WORLD, num_experts=NUM_EXPERTS, redundant_slots=1)
    cost = CostModel(hidden_size=HIDDEN, ffn_hidden_size=FFN, gated=False, param_bytes=4.0)
    info, records = read_native(os.path.join(trace_dir, "routing_rank0.mept"))
    assert info.num_gpus == WORLD and info.num_experts == NUM_EXPERTS
    policy = Replay(layout, MicroEpParams(replan_interval=1))
    (result,) = Simulation(layout, [policy], cost, warmup_steps=0).run(records)
    measured = {s: sum(r["m2"]["steps"][s]["replica_bytes"] for r in results) for s in range(1, STEPS + 1)}
    print(f"replica bytes per step: simulator {result.replica_bytes}, measured {measured}")
    assert result.replica_bytes == measured
    assert np.all(np.array(list(measured.values())) > 0)


def test_defaults_give_replicas_and_replanning_sized_for_the_model(traffic_run):
    results, _ = traffic_run
    for rank, res in enumerate(results):
        layers = res["defaults"]["layers"]
        print(
            f"rank {rank}: defaults {layers}; replica bytes per step {[c['replica_bytes'] for c in res['defaults']['steps'].values()]}"
        )
        # 2 experts per EP rank: R = min(2, 2 - 1); re-planned every step from the routing history.
        assert all(layer["redundant_slots"] == 1 and layer["replan_interval"] == 1 for layer in layers)
        assert all(layer["has_replicas"] and layer["version"] > 0 for layer in layers)  # hot expert 0 got a replica
        assert res["defaults"]["steps"][STEPS]["replica_calls"] == 2 * LAYERS


def test_zero_redundant_slots_is_stock_expert_parallelism(traffic_run):
    results, _ = traffic_run
    for rank, res in enumerate(results):
        r0, stock = res["r0"], res["stock"]
        assert all(
            layer["redundant_slots"] == 0 and layer["replan_interval"] == 0 and layer["version"] == 0
            for layer in r0["layers"]
        )
        assert not any(layer["replica_group"] for layer in r0["layers"])  # no replica traffic, not even a group
        assert all(counts["replica_calls"] == 0 for counts in r0["steps"].values())
        diffs = [abs(a - b) for a, b in zip(r0["losses"], stock["losses"])]
        worst = max(((r0["params"][n] - p).norm() / p.norm()).item() for n, p in stock["params"].items())
        print(f"rank {rank}: R=0 vs stock alltoall: loss diffs {diffs}, worst parameter {worst:.1e}")
        assert max(diffs) <= 1e-5 and worst <= 1e-5
