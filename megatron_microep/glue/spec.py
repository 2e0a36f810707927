"""Layer specs that put ``MicroEPMoELayer`` where Megatron's GPT specs put ``MoELayer``.

Two entry points:

- ``microep_layer_spec``: a ``ModuleSpec`` for Megatron-LM's ``--spec megatron_microep.glue.spec
  microep_layer_spec``. Megatron-LM imports the named object as is (it does not call it) and, for a
  layer spec, builds every decoder layer of the pipeline stage from it. Each layer then looks up
  Megatron's own GPT spec for its global layer number (dense or MoE, per ``--moe-layer-freq``;
  TransformerEngine or local modules, per ``--transformer-impl``) and swaps the MoE mlp.
- ``microep_decoder_block_spec(config, vp_stage=None)``: the same decoder block spec as Megatron's
  ``get_gpt_decoder_block_spec``, MoE layers swapped, for model providers that build specs in code.

``swap_moe_layers`` does the swap on any layer spec, list of layer specs or block spec. On
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
from megatron_microep.glue.config import MicroEPConfig
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


def swap_moe_layers(spec, microep: MicroEPConfig | None = None):
    """Copy of ``spec`` (layer ModuleSpec, list of them, or TransformerBlockSubmodules) with every
    MoE mlp built as ``MicroEPMoELayer`` (with ``microep`` settings if given). Dense layers stay."""
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
            raise ValueError("microep_layer_spec builds decoder layers only; MTP layers are not supported")
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
