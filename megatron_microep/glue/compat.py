"""What differs between megatron-core 0.16 and 0.20 (and what MicroEP reads from Megatron objects).

- MoE mlp specs are ``ModuleSpec(module=MoELayer, ...)`` in 0.16 and ``functools.partial(MoELayer,
  ...)`` in 0.19; ``swap_moe_mlp`` rewrites either.
- Before 0.18, ``TransformerLayer`` hands its process groups only to mlp ModuleSpecs whose module is
  exactly ``MoELayer`` (or a stock expert class); any other ModuleSpec, a ``MoELayer`` subclass
  included, is built with default groups after an "Unknown MLP type" warning. From 0.18 it calls
  every mlp spec with ``pg_collection``. ``bind_mlp_process_groups`` closes the gap.
- ``MoELayer.__init__`` builds its dispatcher with an if/elif on ``moe_token_dispatcher_type``;
  ``stock_dispatcher_during_init`` lets it build a throw-away stock one that the subclass replaces.
- Expert weights are read from the stock experts module (``SequentialMLP``: one MLP per expert;
  ``TEGroupedMLP``: ``weight{i}`` / ``bias{i}`` of two GroupedLinear), never copied. From 0.20 TE
  may keep all local experts in one grouped parameter (``moe_single_grouped_weight`` /
  ``moe_single_grouped_bias``); MicroEP reads and sends single experts, so those are rejected by name
  (``glue/config.py``'s registry; ``expert_tensors`` also refuses such a GroupedLinear);
  ``moe_use_grouped_tensor`` alone changes only TE's own GEMM, which MicroEP does not call.
- SwiGLU clamping (``activation_func_clamp_value``): the unfused paths clamp in every version; the
  fused SwiGLU kernels (``bias_activation_fusion``) ignore the clamp before 0.20 and apply it from
  0.20. ``expert_math`` follows the running version, so MicroEP computes what stock computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types

import torch
import torch.nn.functional as F
from megatron.core import package_info
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_microep.glue.config import MicroEPConfigError, check_unsupported_settings
from megatron_microep.runtime.experts import ExpertMath, ExpertWeights

MCORE_VERSION = (int(package_info.MAJOR), int(package_info.MINOR))


@contextlib.contextmanager
def stock_dispatcher_during_init(config):
    """Let ``MoELayer.__init__`` build the cheap allgather dispatcher (no stream, no buffer); the
    caller replaces it. The config is restored even if construction fails."""
    original = config.moe_token_dispatcher_type
    config.moe_token_dispatcher_type = "allgather"
    try:
        yield
    finally:
        config.moe_token_dispatcher_type = original


def default_pg_collection():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


def _is_moe_layer_class(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, MoELayer)


def is_moe_mlp_spec(mlp) -> bool:
    if isinstance(mlp, ModuleSpec):
        return _is_moe_layer_class(mlp.module)
    if isinstance(mlp, functools.partial):
        return _is_moe_layer_class(mlp.func)
    return _is_moe_layer_class(mlp)


def swap_moe_mlp(mlp, layer_class: type, **params):
    """The same MoE mlp spec building ``layer_class`` (with extra constructor ``params``) instead."""
    if isinstance(mlp, ModuleSpec):
        return ModuleSpec(
            module=layer_class,
            submodules=mlp.submodules,
            params={**mlp.params, **params},
            **({"metainfo": mlp.metainfo} if hasattr(mlp, "metainfo") else {}),
        )
    if isinstance(mlp, functools.partial):
        return functools.partial(layer_class, *mlp.args, **{**mlp.keywords, **params})
    raise TypeError(f"not an MoE mlp spec: {mlp!r}")


LAYER_PASSES_GROUPS_TO_ANY_MLP = MCORE_VERSION >= (0, 18)
# megatron-core 0.20 (Megatron-LM #5940) passes activation_func_clamp_value to its fused SwiGLU kernels.
FUSED_SWIGLU_CLAMPS = MCORE_VERSION >= (0, 20)
# TransformerConfig fields (0.20) that store every local expert in one TE GroupedTensor parameter
# (rejected in glue/config.py's UNSUPPORTED_SETTINGS).
SINGLE_GROUPED_PARAMS = ("moe_single_grouped_weight", "moe_single_grouped_bias")


@dataclasses.dataclass(frozen=True)
class GroupBoundSpec:
    """An mlp spec whose params include the layer's ``pg_collection``.

    Deliberately not a ``ModuleSpec``: TransformerLayer before 0.18 then adds no kwargs of its own
    and logs nothing, and its ``build_module`` reads ``module``, ``params`` and ``submodules`` from
    this object as from a ModuleSpec.
    """

    module: type
    params: dict
    submodules: object = None


def bind_mlp_process_groups(submodules, pg_collection):
    """``submodules`` (TransformerLayerSubmodules) whose MoE-subclass mlp is built with ``pg_collection``.

    Unchanged where TransformerLayer passes the groups itself (0.18 on, or a stock ``MoELayer``).
    """
    mlp = getattr(submodules, "mlp", None)
    if LAYER_PASSES_GROUPS_TO_ANY_MLP or not isinstance(mlp, ModuleSpec):
        return submodules
    if mlp.module is MoELayer or not _is_moe_layer_class(mlp.module):
        return submodules
    bound = GroupBoundSpec(
        module=mlp.module, params={**mlp.params, "pg_collection": pg_collection}, submodules=mlp.submodules
    )
    return dataclasses.replace(submodules, mlp=bound)


def reads_stock_experts(experts: torch.nn.Module) -> bool:
    """Whether ``expert_tensors`` reads ``experts`` (Megatron's SequentialMLP or TEGroupedMLP)."""
    return isinstance(experts, (SequentialMLP, TEGroupedMLP))


def expert_tensors(experts: torch.nn.Module) -> list[list[torch.Tensor]]:
    """Per local expert: [fc1 weight, fc2 weight] + [fc1 bias, fc2 bias] when the model has biases.

    Shapes: fc1 [F1/ETP, H], fc2 [H, F/ETP], biases [F1/ETP] and [H]. Raises TypeError for expert
    classes MicroEP cannot read (e.g. the legacy GroupedMLP) and MicroEPConfigError for TE's single
    grouped parameters (0.20).
    """
    if isinstance(experts, SequentialMLP):
        out = []
        for mlp in experts.local_experts:
            tensors = [mlp.linear_fc1.weight, mlp.linear_fc2.weight]
            if mlp.linear_fc1.bias is not None:
                tensors += [mlp.linear_fc1.bias, mlp.linear_fc2.bias]
            out.append(tensors)
        return out
    if isinstance(experts, TEGroupedMLP):
        fc1, fc2 = experts.linear_fc1, experts.linear_fc2
        for linear in (fc1, fc2):
            for name in SINGLE_GROUPED_PARAMS:  # TE's GroupedLinear attribute: the name without "moe_"
                if getattr(linear, name.removeprefix("moe_"), False):
                    check_unsupported_settings(types.SimpleNamespace(**{name: True}))
        out = []
        for i in range(experts.num_local_experts):
            tensors = [getattr(fc1, f"weight{i}"), getattr(fc2, f"weight{i}")]
            if getattr(fc1, f"bias{i}", None) is not None:
                tensors += [getattr(fc1, f"bias{i}"), getattr(fc2, f"bias{i}")]
            out.append(tensors)
        return out
    raise TypeError(
        f"MicroEP cannot run experts of type {type(experts).__name__}; use SequentialMLP (local spec) "
        "or TEGroupedMLP (--moe-grouped-gemm with TransformerEngine)"
    )


def expert_weights(tensors: list[torch.Tensor], feeds_replicas: bool = False) -> ExpertWeights:
    """``ExpertWeights`` from the tensor list of ``expert_tensors`` (or a replica copy of it);
    ``feeds_replicas``: copies of this expert run elsewhere (see ``ExpertWeights``)."""
    if len(tensors) == 4:
        return ExpertWeights(tensors[0], tensors[1], tensors[2], tensors[3], feeds_replicas)
    return ExpertWeights(fc1=tensors[0], fc2=tensors[1], feeds_replicas=feeds_replicas)


def stock_activation_clamp(config) -> float | None:
    """The SwiGLU/GLU clamp stock experts apply with ``config`` on the running megatron-core."""
    clamp = getattr(config, "activation_func_clamp_value", None)
    fused_swiglu = (
        bool(getattr(config, "bias_activation_fusion", False))
        and not getattr(config, "use_te_activation_func", False)
        and config.activation_func is F.silu
        and bool(config.gated_linear_unit)
    )
    if clamp is None or (fused_swiglu and not FUSED_SWIGLU_CLAMPS):
        return None
    return clamp


def expert_math(config) -> ExpertMath:
    """How Megatron's grouped expert MLP (``TEGroupedMLP``) computes for ``config``: its fused
    weighted activation where ``bias_activation_fusion`` selects one, and weight gradients into
    ``main_grad`` under ``gradient_accumulation_fusion``."""
    if getattr(config, "gated_linear_unit", False) and getattr(config, "moe_mlp_glu_interleave_size", None):
        raise MicroEPConfigError(
            "--moe-mlp-glu-interleave-size cannot be used with --moe-token-dispatcher-type microep "
            "(MicroEP's experts do not de-interleave fc1)"
        )
    return ExpertMath(
        activation=config.activation_func,
        gated=bool(config.gated_linear_unit),
        clamp=stock_activation_clamp(config),
        glu_offset=float(getattr(config, "glu_linear_offset", 0.0) or 0.0),
        probs_on_input=bool(getattr(config, "moe_apply_probs_on_input", False)),
        weighted_activation=weighted_activation(config),
        accumulate_into_main_grad=bool(getattr(config, "gradient_accumulation_fusion", False)),
    )


def weighted_activation(config):
    """Megatron's fused probability-weighted activation ``(h [N, F1], probs [N, 1]) -> [N, F]``
    that ``TEGroupedMLP`` uses for ``config`` (same branches: fused SwiGLU or quick-GEGLU under
    ``bias_activation_fusion``, fused squared ReLU under ``use_fused_weighted_squared_relu``), or
    None where it computes unfused (``runtime.experts`` then computes the same unfused math)."""
    import torch.nn.functional as F
    from megatron.core.activations import squared_relu
    from megatron.core.fusions.fused_bias_geglu import WeightedQuickGeGLUFunction, quick_gelu
    from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
    from megatron.core.fusions.fused_weighted_squared_relu import weighted_squared_relu_impl

    func, gated = config.activation_func, bool(config.gated_linear_unit)
    fp8_store = bool(getattr(config, "activation_func_fp8_input_store", False))
    clamp = getattr(config, "activation_func_clamp_value", None)
    if getattr(config, "bias_activation_fusion", False) and gated and func is F.silu:
        # megatron-core 0.20 clamps inside the fused SwiGLU; 0.16-0.19 do not (their experts pass no clamp).
        if "clamp_value" in inspect.signature(weighted_bias_swiglu_impl).parameters:
            return lambda h, probs: weighted_bias_swiglu_impl(h, None, probs, fp8_store, clamp)
        return lambda h, probs: weighted_bias_swiglu_impl(h, None, probs, fp8_store)
    if getattr(config, "bias_activation_fusion", False) and gated and func is quick_gelu:
        offset = float(getattr(config, "glu_linear_offset", 0.0) or 0.0)

        def quick_geglu(h, probs):
            # weighted_bias_quick_geglu_impl without its torch.tensor(offset, device=...), a blocking
            # host-to-device copy; the offset is filled on the device instead.
            if clamp is not None:
                gate, linear = h.chunk(2, -1)
                h = torch.cat((gate.clamp(min=None, max=clamp), linear.clamp(min=-clamp, max=clamp)), -1)
            offset_tensor = torch.full((), offset, dtype=h.dtype, device=h.device)
            return WeightedQuickGeGLUFunction.apply(h, probs, fp8_store, offset_tensor)

        return quick_geglu
    if func is squared_relu and getattr(config, "use_fused_weighted_squared_relu", False):
        return weighted_squared_relu_impl
    return None


def sync_expert_params(experts: torch.nn.Module) -> None:
    """Run the experts' forward pre-hooks without running the experts.

    MicroEP reads the expert weights directly; Megatron's DDP with overlapped parameter all-gather
    waits for a module's parameters in that module's forward pre-hook, so the hooks must run
    before the weights are read. Hooks must not need inputs (DDP's do not).
    """
    for module in experts.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if key in module._forward_pre_hooks_with_kwargs:
                result = hook(module, (), {})
            else:
                result = hook(module, ())
            if result is not None:
                raise RuntimeError(
                    f"a forward pre-hook of {type(module).__name__} rewrites its inputs; MicroEP reads "
                    "expert weights without calling the module and cannot honour it"
                )


def layer_offset(config, vp_stage: int | None, pp_rank: int) -> int:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(config, vp_stage, pp_rank)


def stock_decoder_layer_specs(config, use_transformer_engine: bool) -> list:
    """Megatron's per-layer GPT specs for the whole model (dense and MoE layers), 0.16 to 0.19."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs

    return get_gpt_decoder_layer_specs(
        config, use_transformer_engine, normalization=config.normalization, qk_l2_norm=config.qk_l2_norm
    )


def stock_decoder_block_spec(config, use_transformer_engine: bool, vp_stage: int | None = None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_transformer_engine,
        normalization=config.normalization,
        qk_l2_norm=config.qk_l2_norm,
        vp_stage=vp_stage,
    )
