"""``glue.bridge`` against stand-ins that follow Megatron-Bridge 0.6.2's interfaces (Bridge needs Python 3.12).

Stand-ins, each limited to what Bridge's code does with the object:
- ``_Provider``: a GPTModelProvider is a TransformerConfig subclass whose ``__post_init__`` waits for
  ``finalize()``, whose ``transformer_layer_spec`` is a ModuleSpec or a callable called as
  ``spec(provider, vp_stage=...)`` (DeepSeek-V3's: ``partial(get_gpt_decoder_block_spec, ...)``), and
  whose ``provide(vp_stage=)`` builds a GPTModel with the MTP block spec made from that same layer spec;
- ``_State``: ``GlobalState`` with ``train_state.step``, ``cfg.logger.log_interval``, ``cfg.ddp`` /
  ``cfg.dist`` and the loggers as properties that exist on the last rank only;
- ``_run_loop``: Bridge's ``train()`` event order: ``on_train_start``, then per step
  ``on_train_step_start``, the step, ``on_train_step_end``, ``train_state.step += 1``.
The real package is exercised by ``scripts/check_bridge.py`` (docs/launch.md). (Here, not in
tests/launch, for the GPT helpers of ``_gpt_case``.)

One launch of 2 CPU ranks (EP = 2) builds the provider's model and trains it 4 steps under the
callback; unit tests cover ``apply_microep``'s settings, spec and rejections.
"""

import dataclasses
import functools
import os
import random
from types import SimpleNamespace

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from test_microep_telemetry import _Recorder as TelemetryRecorder  # noqa: E402

from megatron_microep.glue.config import MicroEPConfig, MicroEPConfigError  # noqa: E402
from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo  # noqa: E402

WORLD = EP = 2
STEPS, LOG_INTERVAL, MICRO_BATCHES = 4, 2, 2
VOCAB, SEQ_LEN, MICRO_BATCH = 64, 16, 2
SETTINGS = MicroEPConfig(redundant_slots=1, replan_interval=2, replan_lag=1, planner="greedy", history_window=4)


def _provider_class():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    @dataclasses.dataclass
    class _Provider(TransformerConfig):
        transformer_layer_spec: object = functools.partial(get_gpt_decoder_block_spec, use_transformer_engine=False)
        vocab_size: int = VOCAB
        seq_length: int = SEQ_LEN

        def __post_init__(self):
            pass  # deferred to finalize(), as Bridge's TransformerConfig

        def finalize(self):
            TransformerConfig.__post_init__(self)

        def provide(self, vp_stage=None):
            spec = self.transformer_layer_spec
            if callable(spec):
                spec = spec(self, vp_stage=vp_stage)
            mtp = get_gpt_mtp_block_spec(self, spec, False, vp_stage=vp_stage) if self.mtp_num_layers else None
            return GPTModel(
                self,
                transformer_layer_spec=spec,
                vocab_size=self.vocab_size,
                max_sequence_length=self.seq_length,
                position_embedding_type="rope",
                mtp_block_spec=mtp,
                vp_stage=vp_stage,
            )

    return _Provider


def _provider(**overrides):
    from _gpt_case import SMALL_MOE

    fields = dict(
        SMALL_MOE,
        num_layers=2,
        num_moe_experts=4,
        expert_model_parallel_size=EP,
        mtp_num_layers=1,
        moe_token_dispatcher_type="flex",  # what a recipe's apply_flex_dispatcher_backend leaves
        moe_flex_dispatcher_backend="deepep",
        cuda_graph_impl="none",
        cuda_graph_scope="full",  # recipes' defaults
    )
    fields.update(overrides)
    return _provider_class()(**fields)


def test_apply_microep_sets_dispatcher_settings_and_spec():
    from megatron_microep.glue.bridge import apply_microep, microep_bridge_layer_spec

    provider = _provider()
    original = provider.transformer_layer_spec
    assert apply_microep(provider, SETTINGS) is provider
    assert provider.moe_token_dispatcher_type == "microep"
    assert provider.moe_flex_dispatcher_backend is None
    assert provider.microep == SETTINGS
    spec = provider.transformer_layer_spec
    assert spec.func is microep_bridge_layer_spec and spec.keywords["base_spec"] is original
    assert spec.keywords["microep"] == dataclasses.asdict(SETTINGS)  # plain values: Bridge's YAML dump keeps them
    other = MicroEPConfig(redundant_slots=1)
    apply_microep(provider, other)  # again: the original spec, the new settings, no nesting
    assert provider.transformer_layer_spec.keywords == {"base_spec": original, "microep": dataclasses.asdict(other)}


@pytest.mark.parametrize(
    "overrides, ddp, message",
    [
        (dict(moe_shared_expert_overlap=True), None, "--moe-shared-expert-overlap cannot be used"),
        (
            dict(cuda_graph_impl="transformer_engine", cuda_graph_scope="moe"),
            None,
            "--cuda-graph-impl transformer_engine --cuda-graph-scope moe cannot be used",
        ),
        ({}, SimpleNamespace(use_megatron_fsdp=True), "--use-megatron-fsdp cannot be used"),
    ],
)
def test_apply_microep_rejects_before_changing_the_provider(overrides, ddp, message):
    from megatron_microep.glue.bridge import apply_microep

    provider = _provider(**overrides)
    with pytest.raises(MicroEPConfigError, match=f"GPT model provider: {message}"):
        apply_microep(provider, SETTINGS, ddp_config=ddp)
    assert provider.moe_token_dispatcher_type == "flex" and not hasattr(provider, "microep")
    # The neighbours: the overlap off, the router graphed, plain DDP with the distributed optimizer.
    fine = dict(moe_shared_expert_overlap=False, cuda_graph_impl="transformer_engine", cuda_graph_scope="moe_router")
    apply_microep(
        _provider(**fine), SETTINGS, ddp_config=SimpleNamespace(use_megatron_fsdp=False, use_distributed_optimizer=True)
    )


class _Recorder(TelemetryRecorder):
    """Stands in for TensorBoard's SummaryWriter, the W&B module, and MLflow/Comet clients."""

    def log_metrics(self, values, step):
        self.calls.append(("log_metrics", dict(values), step))


class _State:
    """Bridge's GlobalState as the callback sees it: loggers on the last rank only."""

    def __init__(self, last: bool, ddp=None):
        logger_cfg = SimpleNamespace(log_interval=LOG_INTERVAL)
        self.cfg = SimpleNamespace(logger=logger_cfg, ddp=ddp or SimpleNamespace(use_megatron_fsdp=False), dist=None)
        self.train_state = SimpleNamespace(step=0)
        self.recorders = {name: _Recorder() for name in ("tensorboard", "wandb", "mlflow", "comet")} if last else {}

    tensorboard_logger = property(lambda self: self.recorders.get("tensorboard"))
    wandb_logger = property(lambda self: self.recorders.get("wandb"))
    mlflow_logger = property(lambda self: self.recorders.get("mlflow"))
    comet_logger = property(lambda self: self.recorders.get("comet"))


def _run_loop(model, callback, state, seed):
    """Bridge's train() order of events around plain forward/backward steps; per step the clock each
    MicroEP layer saw in its forwards, and each rank's own summaries before every report."""
    import torch.distributed as dist
    from _gpt_case import synthetic_batches

    from megatron_microep.glue.layer import STEP_CLOCK, microep_layers
    from megatron_microep.runtime.telemetry import summarize

    layers = microep_layers(model)
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda *_: seen.append(STEP_CLOCK.current())) for layer in layers]
    context = SimpleNamespace(state=state, model=[model])
    callback.on_train_start(context)
    own, optimizer = [], torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(STEPS):
        step = state.train_state.step
        callback.on_train_step_start(context)
        optimizer.zero_grad()
        for tokens, labels, positions, mask in synthetic_batches(
            seed + 100 * step + dist.get_rank(), VOCAB, SEQ_LEN, MICRO_BATCH, MICRO_BATCHES
        ):
            model(tokens, positions, mask, labels=labels).float().mean().backward()
        optimizer.step()
        if (step + 1) % LOG_INTERVAL == 0:
            own.append([summarize(list(layer.telemetry.rows)) for layer in layers])
        callback.on_train_step_end(context)
        state.train_state.step += 1
    for hook in hooks:
        hook.remove()
    return seen, own


def _bridge_rank(rank, world_size, seed):
    import torch.distributed as dist
    from _gpt_case import skew_router

    from megatron_microep.glue.bridge import MicroEPCallback, apply_microep
    from megatron_microep.glue.layer import microep_layers

    init_megatron_parallel(expert_model_parallel_size=EP, seed=seed)
    provider = _provider()
    apply_microep(provider, SETTINGS)
    provider.finalize()
    model = provider.provide()
    skew_router(model, [0])
    layers = microep_layers(model)
    last = rank == world_size - 1
    state = _State(last)
    seen, own = _run_loop(model, MicroEPCallback(), state, seed)
    refused = None
    try:
        MicroEPCallback().on_train_start(
            SimpleNamespace(state=_State(last, ddp=SimpleNamespace(use_megatron_fsdp=True)), model=[model])
        )
    except MicroEPConfigError as err:
        refused = str(err)
    dist.barrier()
    return {
        "layers": [
            (layer.layer_number, type(layer).__name__, bool(getattr(layer, "is_mtp_layer", False))) for layer in layers
        ],
        "mtp_layers": len(microep_layers(model.mtp)),
        "seen": seen,
        "versions": [layer.placement_controller.version for layer in layers],
        "own": own,
        "calls": {name: r.calls for name, r in state.recorders.items()},
        "refused": refused,
    }


@pytest.fixture(scope="module")
def bridge_run():
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"Bridge test seed: {seed} (rerun with MICROEP_TEST_SEED={seed})")
    return spawn_gloo(_bridge_rank, WORLD, seed, timeout_s=600)


def test_provider_builds_microep_layers_in_decoder_and_mtp(bridge_run):
    for res in bridge_run:
        assert [name for _, name, _ in res["layers"]] == ["MicroEPMoELayer"] * 3
        assert res["mtp_layers"] == 1


def test_step_clock_follows_bridge_steps_and_replanning_runs(bridge_run):
    for res in bridge_run:
        # Every forward of step s (both micro-batches, all three layers) saw s.
        assert res["seen"] == [s for s in range(STEPS) for _ in range(MICRO_BATCHES * 3)]
        assert all(v >= 1 for v in res["versions"]), "no re-planned placement was adopted"


def _tags(res):
    """Per layer (in model order) its tag: MTP layers are numbered on their own from megatron-core 0.19."""
    return [f"microep/{'mtp_layer' if is_mtp else 'layer'}{number}" for number, _, is_mtp in res["layers"]]


def test_telemetry_goes_through_the_last_rank_loggers(bridge_run):
    *others, last = bridge_run
    assert all(not res["calls"] for res in others)
    tags = _tags(last)
    reports = [step for step in range(1, STEPS + 1) if step % LOG_INTERVAL == 0]
    for i, iteration in enumerate(reports):
        expected = {}
        for index, tag in enumerate(tags):
            rows = [res["own"][i][index] for res in bridge_run if res["own"][i][index]]
            assert rows, f"no telemetry for {tag}"
            expected[tag] = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}
        flat = {f"{tag}/{key}": value for tag, summary in expected.items() for key, value in summary.items()}
        scalars = {tag: v for kind, tag, v, step in last["calls"]["tensorboard"] if step == iteration}
        assert scalars == pytest.approx(flat)
        assert [v for kind, v, step in last["calls"]["wandb"] if step == iteration] == [pytest.approx(flat)]
        assert [v for kind, v, step in last["calls"]["comet"] if step == iteration] == [pytest.approx(flat)]
        mlflow = {f"{tag}_{key}": value for tag, summary in expected.items() for key, value in summary.items()}
        assert [v for kind, v, step in last["calls"]["mlflow"] if step == iteration] == [pytest.approx(mlflow)]
    assert {step for _, _, _, step in last["calls"]["tensorboard"]} == set(reports)
    assert any(v > 0 for tag, v in scalars.items() if tag.endswith("/replica_tokens"))


def test_megatron_fsdp_refused_when_training_starts(bridge_run):
    for res in bridge_run:
        assert res["refused"] is not None and "--use-megatron-fsdp cannot be used" in res["refused"]
