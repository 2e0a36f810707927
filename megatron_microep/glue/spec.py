"""Layer specs that put ``MicroEPMoELayer`` where Megatron's GPT specs put ``MoELayer``.

Two entry points:

- ``microep_layer_spec``: a ``ModuleSpec`` for Megatron-LM's ``--spec megatron_microep.glue.spec
  microep_layer_spec``. Megatron-LM imports the named object as is (it does not call it) and, for a
  layer spec, builds every decoder layer of the pipeline stage from it. Each layer then looks up
  Megatron's own GPT spec for its global layer number (dense or MoE, per ``--moe-layer-freq``;
  TransformerEngine or local modules, per ``--transformer-impl``) and swaps the MoE mlp.
- ``microep_decoder_block_spec(config, vp_stage=None)``: the same decoder block spec as Megatron's
  ``get_gpt_decoder_block_spec``, MoE layers swapped, for model providers that build specs in code.
- ``microep_mtp_block_spec(config, vp_stage=None)``: Megatron's multi-token-prediction block spec
  (built from the model's last decoder layer, as Megatron-LM's model builders do), its MoE layers
  swapped. ``build_mtp_blocks_with_microep()`` makes Megatron-LM's own builders (``gpt_builders``
  and, from core_r0.19, ``GPTModelBuilder``) do the same, which ``--spec`` alone cannot: they build
  the MTP block from Megatron's stock layer specs.

``swap_moe_layers`` does the swap on any layer spec, list of layer specs, block spec or MTP block
spec. On
megatron-core before 0.18 it also builds the MoE layers as ``MicroEPDecoderLayer``, a
TransformerLayer that hands its process groups to the MicroEP mlp (those versions pass them only to
an mlp that is exactly ``MoELayer``).
"""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_microep.glue import compat
from megatron_microep.glue.config import DISPATCHER_TYPE, MicroEPConfig
from megatron_microep.glue.layer import MicroEPMoELayer


def _uses_transformer_engine(config) -> bool:
    return getattr(config, "transformer_impl", "transformer_engine") == "transformer_engine"


def _is_subclass(obj, cls: type) -> bool:
    return isinstance(obj, type) and issubclass(obj, cls)


def _swap_layer(layer_spec, microep: MicroEPConfig | None):
    submodules = getattr(layer_spec, "submodules", None)
    if submodules is None or not compat.is_moe_mlp_spec(getattr(submodules, "mlp", None)):
        return layer_spec
    params = {} if microep is None else {"microep": microep}
    mlp = compat.swap_moe_mlp(submodules.mlp, MicroEPMoELayer, **params)
    spec = dataclasses.replace(layer_spec, submodules=dataclasses.replace(submodules, mlp=mlp))
    if compat.LAYER_PASSES_GROUPS_TO_ANY_MLP or _is_subclass(spec.module, MicroEPDecoderLayer):
        return spec
    if spec.module is not TransformerLayer:
        raise TypeError(
            f"the MoE layer spec builds {getattr(spec.module, '__name__', spec.module)}; on megatron-core before "
            "0.18 MicroEP replaces TransformerLayer by MicroEPDecoderLayer to hand the layer's process groups "
            "to the MoE mlp, and cannot do so for other layer classes"
        )
    return dataclasses.replace(spec, module=MicroEPDecoderLayer)


# The field of MultiTokenPredictionLayerSubmodules holding the MTP layer's transformer layer spec.
_MTP_INNER_LAYER_FIELDS = ("mtp_model_layer", "transformer_layer")  # 0.19 on, before 0.19


def _swap_mtp_layer(mtp_layer_spec, microep: MicroEPConfig | None):
    submodules = mtp_layer_spec.submodules
    field = next((f for f in _MTP_INNER_LAYER_FIELDS if hasattr(submodules, f)), None)
    if field is None:
        raise TypeError(f"MTP layer submodules {type(submodules).__name__} name none of {_MTP_INNER_LAYER_FIELDS}")
    inner = _swap_layer(getattr(submodules, field), microep)
    return dataclasses.replace(mtp_layer_spec, submodules=dataclasses.replace(submodules, **{field: inner}))


def swap_moe_layers(spec, microep: MicroEPConfig | None = None):
    """Copy of ``spec`` (layer ModuleSpec, list of them, TransformerBlockSubmodules or
    MultiTokenPredictionBlockSubmodules) with every MoE mlp built as ``MicroEPMoELayer`` (with
    ``microep`` settings if given). Dense layers stay; None (no MTP block on this stage) stays None."""
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlockSubmodules

    if spec is None:
        return None
    if isinstance(spec, MultiTokenPredictionBlockSubmodules):
        return dataclasses.replace(spec, layer_specs=[_swap_mtp_layer(s, microep) for s in spec.layer_specs])
    if isinstance(spec, TransformerBlockSubmodules):
        return dataclasses.replace(spec, layer_specs=[_swap_layer(s, microep) for s in spec.layer_specs])
    if isinstance(spec, (list, tuple)):
        return [_swap_layer(s, microep) for s in spec]
    return _swap_layer(spec, microep)


def microep_decoder_block_spec(
    config,
    vp_stage: int | None = None,
    use_transformer_engine: bool | None = None,
    microep: MicroEPConfig | None = None,
) -> TransformerBlockSubmodules:
    """Megatron's GPT decoder block spec for this pipeline stage with MicroEP MoE layers."""
    use_te = _uses_transformer_engine(config) if use_transformer_engine is None else use_transformer_engine
    return swap_moe_layers(compat.stock_decoder_block_spec(config, use_te, vp_stage=vp_stage), microep)


def microep_mtp_block_spec(
    config,
    vp_stage: int | None = None,
    use_transformer_engine: bool | None = None,
    microep: MicroEPConfig | None = None,
):
    """Megatron's MTP block spec for this pipeline stage (None where it holds no MTP layer), its MoE
    layers MicroEP's. Like Megatron-LM's builders, the MTP layer copies the model's last decoder layer."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    use_te = _uses_transformer_engine(config) if use_transformer_engine is None else use_transformer_engine
    last_layer = compat.stock_decoder_layer_specs(config, use_te)[-1]
    return swap_moe_layers(get_gpt_mtp_block_spec(config, last_layer, use_te, vp_stage=vp_stage), microep)


def build_mtp_blocks_with_microep(*modules) -> None:
    """Make ``get_gpt_mtp_block_spec`` swap the MoE layers of the MTP block when the config's dispatcher
    is ``microep`` (other dispatchers: unchanged), where ``modules`` look it up: by default
    megatron-core's ``gpt_layer_specs`` (core_r0.19's ``GPTModelBuilder`` imports it from there at call
    time) and Megatron-LM's ``gpt_builders`` when imported (it bound the name at import). Idempotent.

    A stock MoE layer cannot be built with the microep dispatcher, so without this an MTP model built
    by Megatron-LM's own builders fails; Megatron-LM's ``--spec`` reaches the decoder layers only.
    """
    import sys

    from megatron.core.models.gpt import gpt_layer_specs

    for module in modules or (gpt_layer_specs, sys.modules.get("gpt_builders")):
        if module is None:
            continue
        original = getattr(module, "get_gpt_mtp_block_spec", None)
        if original is None:
            raise RuntimeError(f"{module.__name__} has no get_gpt_mtp_block_spec to route MTP layers through MicroEP")
        if getattr(original, "_microep_swaps_moe", False):
            continue

        def get_gpt_mtp_block_spec(config, *args, _original=original, **kwargs):
            block = _original(config, *args, **kwargs)
            return swap_moe_layers(block) if config.moe_token_dispatcher_type == DISPATCHER_TYPE else block

        get_gpt_mtp_block_spec._microep_swaps_moe = True
        module.get_gpt_mtp_block_spec = get_gpt_mtp_block_spec


class MicroEPDecoderLayer(TransformerLayer):
    """A TransformerLayer that builds a MicroEP mlp with the layer's own process groups.

    megatron-core before 0.18 passes ``pg_collection`` only to an mlp whose module is exactly
    ``MoELayer`` (``compat.bind_mlp_process_groups``); ``_swap_layer`` uses this class there.
    """

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None, pg_collection=None, **kwargs):
        from megatron.core.process_groups_config import ProcessGroupCollection

        # The same default TransformerLayer would take, decided here so the mlp gets it too.
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        super().__init__(
            config,
            compat.bind_mlp_process_groups(submodules, pg_collection),
            layer_number,
            hidden_dropout,
            pg_collection=pg_collection,
            **kwargs,
        )


class MicroEPTransformerLayer(MicroEPDecoderLayer):
    """A decoder layer built from Megatron's GPT spec for its position, MoE mlp swapped.

    The spec's own ``submodules`` are ignored (``microep_layer_spec`` has none): they are looked up
    per layer so one ``--spec`` object serves dense and MoE layers alike.
    """

    def __init__(
        self, config, submodules=None, layer_number: int = 1, hidden_dropout=None, pg_collection=None, **kwargs
    ):
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.utils import get_pg_rank

        if kwargs.get("is_mtp_layer"):
            raise ValueError(
                "microep_layer_spec builds decoder layers only; build MTP blocks with microep_mtp_block_spec "
                "(or build_mtp_blocks_with_microep for Megatron-LM's builders)"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        if kwargs.get("add_layer_offset", True):
            offset = compat.layer_offset(config, kwargs.get("vp_stage"), get_pg_rank(pg_collection.pp))
        else:
            offset = 0
        global_number = layer_number + offset
        stock = compat.stock_decoder_layer_specs(config, _uses_transformer_engine(config))
        if not 1 <= global_number <= len(stock):
            raise ValueError(f"layer number {global_number} outside the model's {len(stock)} layers")
        spec = _swap_layer(stock[global_number - 1], None)
        if spec.module not in (TransformerLayer, MicroEPDecoderLayer):
            raise TypeError(
                f"Megatron's spec for layer {global_number} builds {spec.module.__name__}; "
                "microep_layer_spec only wraps TransformerLayer (use microep_decoder_block_spec)"
            )
        super().__init__(config, spec.submodules, layer_number, hidden_dropout, pg_collection=pg_collection, **kwargs)


microep_layer_spec = ModuleSpec(module=MicroEPTransformerLayer)
