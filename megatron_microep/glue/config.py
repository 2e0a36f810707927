"""How MicroEP settings reach each MoE layer, and which Megatron configurations they accept.

Settings travel as a ``MicroEPConfig`` (declared once, in ``megatron_microep.settings``). A layer
finds them, in this order: the ``microep`` argument of its spec (``swap_moe_layers(...,
microep=...)``); ``config.microep`` (set by ``attach_microep_config`` or
``microep_config_from_args``); the ``--microep-*`` flags of the running Megatron-LM job
(``megatron.training`` global args). Validation runs when settings are built from
flags and again when a layer is built, and names the offending flag.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from megatron_microep.settings import DISPATCHER_TYPE, MicroEPConfig, MicroEPConfigError

__all__ = [
    "DISPATCHER_TYPE",
    "MicroEPConfig",
    "MicroEPConfigError",
    "attach_microep_config",
    "check_megatron_compatibility",
    "resolve_microep_config",
]


def flag(name: str) -> str:
    """Megatron's flag for a TransformerConfig / argument name: ``moe_router_topk`` -> ``--moe-router-topk``."""
    return "--" + name.replace("_", "-")


def check_megatron_compatibility(settings: MicroEPConfig, config) -> MicroEPConfig:
    """Reject Megatron settings MicroEP cannot honour; returns ``settings`` with the model-dependent
    defaults resolved (``MicroEPConfig.for_model``). ``config`` is a TransformerConfig or an args-like
    namespace (absent attributes count as unset); ``check_unsupported_settings`` alone takes any
    object, e.g. a DistributedDataParallelConfig (Megatron-FSDP lives there).

    Reads ``num_moe_experts`` (or ``num_experts``), ``expert_model_parallel_size`` and
    ``expert_tensor_parallel_size``, then every setting of ``UNSUPPORTED_SETTINGS``.
    """
    num_experts = getattr(config, "num_moe_experts", None) or getattr(config, "num_experts", None)
    ep = getattr(config, "expert_model_parallel_size", 1) or 1
    etp = getattr(config, "expert_tensor_parallel_size", None) or 1
    if not num_experts:
        raise MicroEPConfigError("--moe-token-dispatcher-type microep needs an MoE model (--num-experts)")
    if num_experts % ep:
        raise MicroEPConfigError(f"--num-experts {num_experts} is not divisible by --expert-model-parallel-size {ep}")
    per_rank = num_experts // ep
    settings = settings.for_model(num_experts, ep)
    if settings.redundant_slots > 0 and ep == 1:
        raise MicroEPConfigError(
            "--microep-redundant-slots > 0 needs --expert-model-parallel-size > 1 "
            "(with EP = 1 every expert is already local)"
        )
    if settings.expert_sharding == "fsep":
        if etp != 1:
            raise MicroEPConfigError("--microep-expert-sharding fsep needs --expert-tensor-parallel-size 1")
        if per_rank + settings.redundant_slots > num_experts:
            raise MicroEPConfigError(
                f"--microep-redundant-slots {settings.redundant_slots}: FSEP slots per rank ({per_rank} + "
                f"{settings.redundant_slots}) exceed the {num_experts} experts (one copy of an expert per rank)"
            )
    elif settings.redundant_slots >= per_rank:
        raise MicroEPConfigError(
            f"--microep-redundant-slots {settings.redundant_slots} must be smaller than the experts per "
            f"EP rank ({num_experts} / --expert-model-parallel-size {ep} = {per_rank})"
        )
    ffn = getattr(config, "moe_ffn_hidden_size", None)
    if ffn is not None and ffn % etp:
        raise MicroEPConfigError(f"--expert-tensor-parallel-size {etp} must divide --moe-ffn-hidden-size {ffn}")
    check_unsupported_settings(config)
    return settings


def check_unsupported_settings(config) -> None:
    """Raise ``MicroEPConfigError`` naming the first setting of ``UNSUPPORTED_SETTINGS`` that ``config`` has."""
    for rule in UNSUPPORTED_SETTINGS:
        setting = rule.offending(config)
        if setting is not None:
            raise MicroEPConfigError(
                f"{setting} cannot be used with --moe-token-dispatcher-type microep: {rule.reason}"
            )


@dataclass(frozen=True)
class UnsupportedSetting:
    """A Megatron setting MicroEP rejects: ``offending(config)`` is the setting as flags (e.g.
    ``--cuda-graph-impl local``) when ``config`` has it, else None."""

    offending: Callable[[object], str | None]
    reason: str


def _enabled(name: str) -> Callable[[object], str | None]:
    return lambda config: flag(name) if getattr(config, name, None) else None


def _equal(name: str, value) -> Callable[[object], str | None]:
    return lambda config: f"{flag(name)} {value}" if getattr(config, name, None) == value else None


def _moe_act_recompute(config) -> str | None:
    recompute = getattr(config, "recompute_modules", None) or []
    selective = getattr(config, "recompute_granularity", None) == "selective"
    return "--recompute-modules moe_act" if selective and "moe_act" in recompute else None


def _expert_gtp(config) -> str | None:
    """Expert generalized TP: ``expert_gtp_weight_remat_size`` once resolved (validated args,
    TransformerConfig), else the user-facing shard count above expert-TP."""
    shards = getattr(config, "expert_tensor_parallel_num_weight_shards", None)
    etp = getattr(config, "expert_tensor_parallel_size", None) or getattr(config, "tensor_model_parallel_size", 1) or 1
    if (getattr(config, "expert_gtp_weight_remat_size", 1) or 1) > 1 or (shards is not None and shards > etp):
        return f"--expert-tensor-parallel-num-weight-shards {shards} (expert-TP {etp})"
    return None


# CUDA graphs. Megatron names the capture regions --cuda-graph-scope (0.16; deprecated from 0.19, where
# Megatron-LM parses it into cuda_graph_scope_deprecated) and --cuda-graph-modules (0.19 on); an empty
# list (or "full") means the whole layer. --enable-cuda-graph / --external-cuda-graph are the deprecated
# spellings of --cuda-graph-impl local / transformer_engine.
_SCOPE_ATTRS = ("cuda_graph_scope_deprecated", "cuda_graph_scope", "cuda_graph_modules")
_SCOPE_FLAG = {"cuda_graph_scope_deprecated": "--cuda-graph-scope"}
# Regions that never hold an MoE layer's dispatch: attention, the router (TransformerEngine graphs stop
# after it), dense MLPs, Mamba mixers. Under the local implementation only the last two: it graphs a
# whole TransformerLayer as soon as it graphs any part of it (attention included).
TE_GRAPH_SCOPES_WITHOUT_DISPATCH = frozenset({"attn", "moe_router", "mlp", "mamba"})
LOCAL_GRAPH_SCOPES_WITHOUT_DISPATCH = frozenset({"mlp", "mamba"})


def _scope_names(value) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else [value]
    names = []
    for item in items:
        if isinstance(item, str):
            names += [n for n in item.split(",") if n and n != "full"]
        elif item is not None:
            names.append(item.name)  # CudaGraphScope / CudaGraphModule
    return names


def _cuda_graph(config) -> tuple[str, str, list[str]]:
    """(implementation, how the user set it, capture regions: [] = the whole layer)."""
    impl = getattr(config, "cuda_graph_impl", "none") or "none"
    impl_flag = f"--cuda-graph-impl {impl}"
    if getattr(config, "enable_cuda_graph", False):
        impl, impl_flag = "local", "--enable-cuda-graph"
    elif getattr(config, "external_cuda_graph", False):
        impl, impl_flag = "transformer_engine", "--external-cuda-graph"
    for attr in _SCOPE_ATTRS:
        names = _scope_names(getattr(config, attr, None))
        if names:
            setting = f"{impl_flag} {_SCOPE_FLAG.get(attr, flag(attr))} {' '.join(names)}"
            # A scope of --cuda-graph-impl local in 0.16; from 0.19 migrated to that implementation
            # whatever --cuda-graph-impl says.
            return ("full_iteration" if "full_iteration" in names else impl), setting, names
    return impl, f"{impl_flag} (whole layer)", []


def _graph_offending(impl: str, allowed: frozenset[str] | None) -> Callable[[object], str | None]:
    """``impl`` graphs that capture an MoE layer's dispatch: any (``allowed`` None) or any whose regions
    are not all in ``allowed`` (no region = the whole layer)."""

    def offending(config) -> str | None:
        used, setting, names = _cuda_graph(config)
        if used != impl:
            return None
        if allowed is None or not names or not set(names) <= allowed:
            return setting
        return None

    return offending


_DISPATCH_ON_HOST = "MicroEP schedules every micro-batch's tokens on the host and cannot be replayed from a graph"

UNSUPPORTED_SETTINGS: tuple[UnsupportedSetting, ...] = (
    UnsupportedSetting(_enabled("moe_expert_capacity_factor"), "MicroEP is dropless"),
    UnsupportedSetting(_enabled("moe_pad_expert_input_to_capacity"), "MicroEP is dropless"),
    UnsupportedSetting(_enabled("moe_router_padding_for_quantization"), "FP8/FP4 expert padding is not supported"),
    UnsupportedSetting(_enabled("fp8"), "FP8 experts are not supported"),
    UnsupportedSetting(_enabled("fp4"), "FP4 experts are not supported"),
    UnsupportedSetting(
        _enabled("moe_shared_expert_overlap"), "shared-expert overlap needs the alltoall/flex dispatcher"
    ),
    UnsupportedSetting(_enabled("overlap_moe_expert_parallel_comm"), "EP communication overlap is not supported"),
    UnsupportedSetting(_enabled("use_te_activation_func"), "TransformerEngine activation modules are not supported"),
    UnsupportedSetting(_enabled("moe_use_legacy_grouped_gemm"), "the legacy GroupedMLP experts are not supported"),
    UnsupportedSetting(_moe_act_recompute, "the MicroEP experts do not recompute activations"),
    UnsupportedSetting(
        _enabled("moe_mlp_glu_interleave_size"),
        "TransformerEngine de-interleaves fc1 before the GLU split, MicroEP's experts split it contiguously "
        "(a different function, and checkpoints would no longer swap with stock)",
    ),
    UnsupportedSetting(
        _equal("transformer_impl", "inference_optimized"),
        "inference-optimized layers put MoELayer's own dispatcher back in every forward",
    ),
    UnsupportedSetting(
        _enabled("use_megatron_fsdp"),
        "Megatron-FSDP gathers and frees expert weights around the experts module's forward and backward, "
        "which MicroEP does not run (it computes with the expert weights directly); use --use-distributed-optimizer",
    ),
    UnsupportedSetting(
        _enabled("use_custom_fsdp"), "Megatron-FSDP (its old name) is not supported, as --use-megatron-fsdp"
    ),
    UnsupportedSetting(
        _graph_offending("full_iteration", None),
        f"a full-iteration CUDA graph captures every MoE dispatch; {_DISPATCH_ON_HOST}",
    ),
    UnsupportedSetting(
        _graph_offending("local", LOCAL_GRAPH_SCOPES_WITHOUT_DISPATCH),
        "the local implementation graphs a whole TransformerLayer, its MoE dispatch included, once any region "
        f"but mlp/mamba applies to it; {_DISPATCH_ON_HOST} (use --cuda-graph-impl transformer_engine with "
        "attn and/or moe_router)",
    ),
    UnsupportedSetting(
        _graph_offending("transformer_engine", TE_GRAPH_SCOPES_WITHOUT_DISPATCH),
        f"the graph captures the MoE dispatch (regions moe, moe_preprocess or the whole layer); {_DISPATCH_ON_HOST} "
        f"(regions {', '.join(sorted(TE_GRAPH_SCOPES_WITHOUT_DISPATCH))} are allowed)",
    ),
    UnsupportedSetting(
        _enabled("overlap_dispatch_backward_with_experts_wgrad"),
        "it defers the weight gradients of Megatron's TransformerEngine grouped experts, which MicroEP does not run",
    ),
    UnsupportedSetting(
        _expert_gtp,
        "expert generalized TP gathers expert weight shards inside Megatron's expert modules, which MicroEP "
        "does not run (it reads the expert weights as stored)",
    ),
    UnsupportedSetting(
        _enabled("moe_latent_size"), "latent MoE projections (TransformerEngine only) are not supported"
    ),
    *(
        UnsupportedSetting(
            _enabled(name),
            "TransformerEngine then keeps all local experts in one grouped parameter, and MicroEP reads and "
            "sends single experts (--moe-use-grouped-tensor alone is fine)",
        )
        for name in ("moe_single_grouped_weight", "moe_single_grouped_bias")  # megatron-core 0.20
    ),
)


def attach_microep_config(config, settings: MicroEPConfig):
    """Attach ``settings`` to a TransformerConfig (as ``config.microep``) after checking them; returns config."""
    check_megatron_compatibility(settings.validate(), config)
    config.microep = settings
    return config


def _megatron_training_args():
    """The running Megatron-LM job's parsed args, if megatron.training is loaded and initialised."""
    global_vars = sys.modules.get("megatron.training.global_vars")
    return getattr(global_vars, "_GLOBAL_ARGS", None) if global_vars is not None else None


def resolve_microep_config(config, explicit: MicroEPConfig | None = None) -> MicroEPConfig:
    """The settings a layer built from ``config`` uses (see the module docstring), validated."""
    if explicit is not None:
        settings = explicit.validate()
    elif getattr(config, "microep", None) is not None:
        settings = config.microep.validate()
    else:
        args = _megatron_training_args()
        if args is None or not hasattr(args, "microep_redundant_slots"):
            raise MicroEPConfigError(
                "no MicroEP settings for this layer: pass microep= to the spec, call "
                "megatron_microep.glue.config.attach_microep_config(config, ...), or register the "
                "--microep-* flags with megatron_microep.glue.args.add_microep_args"
            )
        settings = MicroEPConfig.from_args(args)
    return check_megatron_compatibility(settings, config)
