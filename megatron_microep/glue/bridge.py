"""MicroEP in Megatron-Bridge recipes: ``apply_microep`` for a GPT model provider, ``MicroEPCallback`` for the loop.

Megatron-Bridge (0.6) describes a model by a provider: a TransformerConfig subclass whose
``transformer_layer_spec`` is a ModuleSpec or a callable ``(provider, vp_stage=None)`` and whose
``provide()`` builds the GPTModel, the MTP block spec taken from the same layer spec. Its recipes
end by choosing the dispatcher (``apply_flex_dispatcher_backend(provider, backend)``);
``apply_microep(provider, settings)`` is MicroEP's counterpart, applied after the recipe::

    cfg = deepseek_v3_pretrain_config(...)
    apply_microep(cfg.model, MicroEPConfig(redundant_slots=1, replan_interval=50), ddp_config=cfg.ddp)
    pretrain(cfg, forward_step, callbacks=[MicroEPCallback()])

Bridge never sets ``megatron.training``'s global args, which is where the MicroEP layers otherwise
find the training step (re-planning and replica reuse need it) and the log interval. The callback
sets the step clock at the start of every step and, every ``cfg.logger.log_interval`` steps, writes
each MicroEP layer's telemetry summary through Bridge's own loggers.

Nothing here imports Megatron-Bridge (it needs Python 3.12); the interfaces used are those of
Megatron-Bridge 0.6.2's ``GPTModelProvider``, ``training.callbacks`` (``CallbackManager.add`` takes
any object with ``on_<event>(context)`` methods) and ``training.state.GlobalState``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging

import numpy as np
import torch.distributed as dist
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_microep.glue.config import (
    DISPATCHER_TYPE,
    MicroEPConfig,
    MicroEPConfigError,
    check_megatron_compatibility,
    check_unsupported_settings,
)
from megatron_microep.glue.layer import microep_layers, set_training_step
from megatron_microep.glue.spec import swap_moe_layers
from megatron_microep.runtime.telemetry import summarize

logger = logging.getLogger(__name__)

# GlobalState properties holding Bridge's loggers (None on every rank but the last, or when not configured).
BRIDGE_LOGGERS = ("tensorboard_logger", "wandb_logger", "mlflow_logger", "comet_logger")


def microep_bridge_layer_spec(provider, vp_stage: int | None = None, *, base_spec, microep: dict):
    """The provider's own layer spec (``base_spec``: a ModuleSpec or Bridge's callable), MoE layers MicroEP's.

    ``microep``: the settings as a plain dict, so that Bridge's YAML dump of the config keeps them.
    """
    spec = base_spec
    if callable(spec) and not isinstance(spec, ModuleSpec):
        spec = spec(provider, vp_stage=vp_stage) if "vp_stage" in inspect.signature(spec).parameters else spec(provider)
    return swap_moe_layers(spec, MicroEPConfig(**microep))


def apply_microep(provider, settings: MicroEPConfig, ddp_config=None):
    """Make a Bridge GPT model provider build MicroEP MoE layers (decoder and MTP) with ``settings``.

    Sets the dispatcher type (and clears a flex backend), attaches the settings and wraps the
    provider's ``transformer_layer_spec``, after checking the settings against the provider's fields
    and, when given, the DDP config (``cfg.ddp``: Megatron-FSDP). Raises ``MicroEPConfigError``
    naming the field as its flag. Returns the provider.
    """
    settings = settings.validate()
    try:
        check_megatron_compatibility(settings, provider)
        if ddp_config is not None:
            check_unsupported_settings(ddp_config)
    except MicroEPConfigError as err:
        raise MicroEPConfigError(f"GPT model provider: {err} (flags are provider fields with dashes)") from None
    provider.moe_token_dispatcher_type = DISPATCHER_TYPE
    if hasattr(provider, "moe_flex_dispatcher_backend"):
        provider.moe_flex_dispatcher_backend = None
    provider.microep = settings
    base = provider.transformer_layer_spec
    if isinstance(base, functools.partial) and base.func is microep_bridge_layer_spec:
        base = base.keywords["base_spec"]  # applied again: wrap the original spec, with the new settings
    provider.transformer_layer_spec = functools.partial(
        microep_bridge_layer_spec, base_spec=base, microep=dataclasses.asdict(settings)
    )
    return provider


class MicroEPCallback:
    """Bridge training callback: the step clock every step, MicroEP telemetry every log interval.

    Pass it to ``megatron.bridge.training.pretrain(..., callbacks=[MicroEPCallback()])``. Events used:
    ``on_train_start`` (settings against ``cfg.ddp`` / ``cfg.dist``; the clock at the resumed step),
    ``on_train_step_start`` (``set_training_step(state.train_state.step)``, the step Megatron-LM's
    ``args.curr_iteration`` holds) and ``on_train_step_end`` (telemetry when the steps done are a
    multiple of ``cfg.logger.log_interval``, under Bridge's iteration number).

    Telemetry: each rank summarises its layers' micro-batches since the last report
    (``runtime.telemetry.summarize``); the last rank, which holds Bridge's loggers, gets every rank's
    summaries (one gather), averages each layer's figures over the ranks that hold the layer, logs a
    line per layer and writes ``microep/layer<N>/<figure>`` (``microep/mtp_layer<N>/...`` for MTP
    layers) to TensorBoard, W&B, MLflow and Comet, whichever Bridge configured.
    """

    def on_train_start(self, context) -> None:
        cfg = context.state.cfg
        if microep_layers(context.model):
            for part in ("ddp", "dist"):
                if getattr(cfg, part, None) is not None:
                    check_unsupported_settings(getattr(cfg, part))
        set_training_step(context.state.train_state.step)

    def on_train_step_start(self, context) -> None:
        set_training_step(context.state.train_state.step)

    def on_train_step_end(self, context) -> None:
        done = context.state.train_state.step + 1  # Bridge increments the step after this event
        interval = getattr(context.state.cfg.logger, "log_interval", None)
        if interval and done % interval == 0:
            self.report(context.state, context.model, done)

    def report(self, state, model, iteration: int) -> dict[str, dict[str, float]]:
        """Summarise and clear every rank's MicroEP telemetry; write it through ``state``'s loggers on
        the last rank. Call on every rank. Returns the averaged summaries on the last rank, else {}."""
        local = {}
        for layer in microep_layers(model):
            summary = summarize(layer.telemetry.drain())
            if summary:
                block = "mtp_layer" if getattr(layer, "is_mtp_layer", False) else "layer"
                local[f"microep/{block}{layer.layer_number}"] = summary
        last = dist.get_world_size() - 1
        gathered = [None] * dist.get_world_size() if dist.get_rank() == last else None
        dist.gather_object(local, gathered, dst=last)
        if dist.get_rank() != last:
            return {}
        merged = {}
        for tag in sorted({tag for ranks in gathered for tag in ranks}):
            rows = [ranks[tag] for ranks in gathered if tag in ranks]
            merged[tag] = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
        self._write(state, merged, iteration)
        return merged

    @staticmethod
    def _write(state, merged: dict[str, dict[str, float]], iteration: int) -> None:
        for tag, summary in merged.items():
            logger.info(
                "MicroEP %s iteration %d: max/mean before %.3f after %.3f, remote tokens %.0f -> %.0f, "
                "%.1f replicas carrying %.0f tokens, scheduling %.2f ms per micro-batch",
                tag,
                iteration,
                summary["imbalance_before"],
                summary["imbalance_after"],
                summary["remote_before"],
                summary["remote_after"],
                summary["replicas"],
                summary["replica_tokens"],
                summary["scheduling_ms"],
            )
        metrics = {f"{tag}/{key}": value for tag, summary in merged.items() for key, value in summary.items()}
        loggers = {name: getattr(state, name, None) for name in BRIDGE_LOGGERS}
        if loggers["tensorboard_logger"] is not None:
            for name, value in metrics.items():
                loggers["tensorboard_logger"].add_scalar(name, value, iteration)
        if loggers["wandb_logger"] is not None:
            loggers["wandb_logger"].log(metrics, iteration)
        if loggers["comet_logger"] is not None:
            loggers["comet_logger"].log_metrics(metrics, step=iteration)
        if loggers["mlflow_logger"] is not None:
            # One "/" per MLflow metric name, as Bridge writes its own: microep/layer3_imbalance_after.
            flat = {f"{tag}_{key}": value for tag, summary in merged.items() for key, value in summary.items()}
            loggers["mlflow_logger"].log_metrics(flat, step=iteration)
