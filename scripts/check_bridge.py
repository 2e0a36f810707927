#!/usr/bin/env python3
"""Check ``megatron_microep.glue.bridge`` against the real Megatron-Bridge, on 2 CPU ranks (gloo, EP = 2).

Needs Python 3.12 with torch, megatron-core 0.19, megatron-bridge 0.6 and this package; make the
environment with ``scripts/setup_bridge_env.sh VENV`` and run ``VENV/bin/python scripts/check_bridge.py``
(docs/launch.md has the measured cost). What runs against Bridge's own code:

- ``GPTModelProvider`` (a recipe-like provider: DeepSeek-V3's block-spec callable, local modules),
  Bridge's ``apply_flex_dispatcher_backend`` as a recipe ends, then ``apply_microep``; Bridge's
  ``finalize()`` and ``provide()`` build the model on each rank: every MoE layer must be MicroEP's;
- Bridge's ``mtp_block_spec(provider)`` for ``mtp_num_layers=1``: its MoE layer must be MicroEP's
  (the spec only, with megatron-core's MTP spec function on the local backend: Bridge asks for
  TransformerEngine MTP modules, absent here);
- the provider through Megatron's config serialisation (``ConfigContainerBase._convert_value_to_dict``,
  the YAML representers, ``instantiate``), which Bridge uses for its run config: the MicroEP
  settings in the layer spec survive the round trip (after
  ``register_allowed_target_prefix("megatron_microep.")``: Bridge instantiates allow-listed modules only);
- ``CallbackManager.add(MicroEPCallback())`` and ``fire(event, CallbackContext(...))`` in the order of
  Bridge's ``train()`` for 4 steps, TensorBoard through a real ``SummaryWriter``: the step clock in
  every forward, MicroEP scalars in the event file at iterations 2 and 4.

Not run: Bridge's ``pretrain()`` itself (CUDA-only), and its ``GlobalState``: ``import megatron.bridge``
and the modules behind ``GlobalState`` import TransformerEngine, which cannot be installed without
CUDA; this script imports the Bridge modules it uses with the package initialisers skipped, and
stands in for ``GlobalState`` with an object of the same attributes (as tests/megatron/test_bridge.py).
Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import sys
import tempfile
import types
from types import SimpleNamespace

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo

EP = 2
STEPS, LOG_INTERVAL, MICRO_BATCHES = 4, 2, 2
VOCAB, SEQ_LEN, MICRO_BATCH = 64, 16, 2
# Package initialisers that import TransformerEngine (via peft) or every model bridge.
SKIPPED_INITS = ("megatron.bridge", "megatron.bridge.models", "megatron.bridge.training", "megatron.bridge.peft")


def import_bridge_modules():
    for name in SKIPPED_INITS:
        spec = importlib.util.find_spec(name)
        package = types.ModuleType(name)
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules[name] = package
    from megatron.bridge import package_info
    from megatron.bridge.models import gpt_provider
    from megatron.bridge.training import callbacks, flex_dispatcher_backend

    return package_info.__version__, gpt_provider, callbacks, flex_dispatcher_backend


def settings():
    from megatron_microep.glue.config import MicroEPConfig

    return MicroEPConfig(redundant_slots=1, replan_interval=2, replan_lag=1, planner="greedy", history_window=4)


def provider(gpt_provider, flex, **overrides):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    fields = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        moe_ffn_hidden_size=32,
        num_moe_experts=4,
        moe_router_topk=2,
        expert_model_parallel_size=EP,
        add_bias_linear=False,
        transformer_impl="local",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moe_router_load_balancing_type="none",
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,
        moe_token_dispatcher_type="alltoall",
        vocab_size=VOCAB,
        seq_length=SEQ_LEN,
        position_embedding_type="rope",
        masked_softmax_fusion=False,
        cross_entropy_loss_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        transformer_layer_spec=functools.partial(get_gpt_decoder_block_spec, use_transformer_engine=False),
    )
    fields.update(overrides)
    model_provider = gpt_provider.GPTModelProvider(**fields)
    flex.apply_flex_dispatcher_backend(model_provider, "deepep")  # as Bridge's MoE recipes end
    return model_provider


class State:
    """Stands in for Bridge's GlobalState (see the module docstring): TensorBoard on the last rank."""

    def __init__(self, tensorboard_dir, last: bool):
        from megatron.core.distributed import DistributedDataParallelConfig

        self.cfg = SimpleNamespace(
            logger=SimpleNamespace(log_interval=LOG_INTERVAL), ddp=DistributedDataParallelConfig(), dist=None
        )
        self.train_state = SimpleNamespace(step=0)
        self.wandb_logger = self.mlflow_logger = self.comet_logger = None
        if last:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard_logger = SummaryWriter(tensorboard_dir)
        else:
            self.tensorboard_logger = None


def check_rank(rank, world_size, seed, tensorboard_dir):
    import torch
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.config.container import ConfigContainerBase
    from megatron.training.config.instantiate_utils import instantiate
    from megatron.training.config.yaml_utils import safe_yaml_representers

    from megatron_microep.glue.bridge import MicroEPCallback, apply_microep
    from megatron_microep.glue.layer import STEP_CLOCK, MicroEPMoELayer, microep_layers

    init_megatron_parallel(expert_model_parallel_size=EP, seed=seed)
    version, gpt_provider, callbacks, flex = import_bridge_modules()
    out = {"bridge": version}

    # Provider: a recipe's, then MicroEP; Bridge finalizes and provides.
    model_provider = apply_microep(provider(gpt_provider, flex), settings())
    model_provider.finalize()
    model_provider._pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    model = model_provider.provide()
    with torch.no_grad():  # expert 0 hot, so that the planner's copies of it carry tokens
        for name, buffer in model.named_buffers():
            if name.endswith("router.expert_bias"):
                buffer[0] = 0.6
    layers = microep_layers(model)
    moe = [m for m in model.modules() if type(m).__name__.endswith("MoELayer")]
    out["layers"] = len(layers) == len(moe) == 2 and model_provider.moe_flex_dispatcher_backend is None

    # MTP: Bridge's own choice of the MTP layer spec (from the provider's layer spec); Bridge asks
    # megatron-core for TransformerEngine MTP modules, so megatron-core's function is called with the
    # local backend here (no TE).
    from megatron.core.models.gpt import gpt_layer_specs

    mtp_provider = apply_microep(provider(gpt_provider, flex, mtp_num_layers=1), settings())
    mtp_provider.finalize()
    te_mtp = gpt_layer_specs.get_gpt_mtp_block_spec

    def local_mtp(config, spec, use_transformer_engine=True, vp_stage=None):
        return te_mtp(config, spec, use_transformer_engine=False, vp_stage=vp_stage)

    gpt_layer_specs.get_gpt_mtp_block_spec = local_mtp
    try:
        (mtp_layer,) = gpt_provider.mtp_block_spec(mtp_provider).layer_specs
    finally:
        gpt_layer_specs.get_gpt_mtp_block_spec = te_mtp
    inner = getattr(mtp_layer.submodules, "mtp_model_layer", None) or mtp_layer.submodules.transformer_layer
    mlp = inner.submodules.mlp
    out["mtp_spec"] = (getattr(mlp, "module", None) or getattr(mlp, "func", None)) is MicroEPMoELayer

    # The run config's YAML round trip keeps the settings in the layer spec.
    import yaml
    from megatron.bridge.utils.instantiate_utils import register_allowed_target_prefix

    register_allowed_target_prefix("megatron_microep.")  # Bridge instantiates allow-listed modules only
    with safe_yaml_representers():
        text = yaml.safe_dump(ConfigContainerBase._convert_value_to_dict(model_provider))
    spec = instantiate(yaml.safe_load(text)["transformer_layer_spec"])
    out["yaml"] = spec.keywords["microep"] == dataclasses.asdict(settings())

    # The callback through Bridge's CallbackManager, events in train()'s order.
    manager = callbacks.CallbackManager()
    manager.add(MicroEPCallback())
    events = ("on_train_start", "on_train_step_start", "on_train_step_end")
    out["events"] = all(manager.has_callbacks(e) for e in events)
    state = State(tensorboard_dir, rank == world_size - 1)
    seen = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda *_: seen.append(STEP_CLOCK.current()))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def context():
        return callbacks.CallbackContext(state=state, model=[model], user_state=manager.user_state)

    manager.fire("on_train_start", context())
    mask = torch.triu(torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool), diagonal=1)[None, None]
    positions = torch.arange(SEQ_LEN)[None].expand(MICRO_BATCH, SEQ_LEN)
    generator = torch.Generator().manual_seed(seed + rank)
    for _ in range(STEPS):
        manager.fire("on_train_step_start", context())
        optimizer.zero_grad()
        for _ in range(MICRO_BATCHES):
            tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ_LEN + 1), generator=generator)
            model(tokens[:, :-1], positions, mask, labels=tokens[:, 1:]).float().mean().backward()
        optimizer.step()
        manager.fire("on_train_step_end", context())
        state.train_state.step += 1
    out["clock"] = seen == [s for s in range(STEPS) for _ in range(MICRO_BATCHES * len(layers))]
    if state.tensorboard_logger is not None:
        state.tensorboard_logger.close()
    dist.barrier()
    return out


def main() -> int:
    seed = int(os.environ.get("MICROEP_TEST_SEED", "1234"))
    with tempfile.TemporaryDirectory() as tensorboard_dir:
        results = spawn_gloo(check_rank, EP, seed, tensorboard_dir, timeout_s=900)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(tensorboard_dir)
        events.Reload()
        tags = sorted(t for t in events.Tags()["scalars"] if t.startswith("microep/"))
        steps = sorted({e.step for t in tags for e in events.Scalars(t)})
        replica_tokens = [e.value for t in tags if t.endswith("/replica_tokens") for e in events.Scalars(t)]
    print(f"check_bridge: megatron-bridge {results[0]['bridge']}, {EP} CPU ranks")
    failed = 0
    for name, what in [
        ("layers", "GPTModelProvider.provide() built MicroEP layers for every MoE layer, flex backend cleared"),
        ("mtp_spec", "Bridge's mtp_block_spec gives the MTP layer a MicroEP MoE layer"),
        ("yaml", "settings survive the config's YAML round trip (instantiate)"),
        ("events", "CallbackManager registered on_train_start / on_train_step_start / on_train_step_end"),
        ("clock", "every forward of step s saw step s"),
    ]:
        ok = all(r[name] for r in results)
        failed += not ok
        print(f"  {'OK  ' if ok else 'FAIL'} {what}")
    ok = len(tags) == 2 * 10 and steps == [LOG_INTERVAL, 2 * LOG_INTERVAL] and max(replica_tokens, default=0) > 0
    failed += not ok
    print(f"  {'OK  ' if ok else 'FAIL'} TensorBoard: {len(tags)} microep scalars at iterations {steps}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
