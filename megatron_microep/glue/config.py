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
    defaults resolved (``MicroEPConfig.for_model``). ``config`` is a TransformerConfig or args-like.

    Reads ``num_moe_experts`` (or ``num_experts``), ``expert_model_parallel_size`` and
    ``expert_tensor_parallel_size`` plus the MoE options named below.
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
    unsupported = {
        "moe_expert_capacity_factor": "MicroEP is dropless",
        "moe_pad_expert_input_to_capacity": "MicroEP is dropless",
        "moe_router_padding_for_quantization": "FP8/FP4 expert padding is not supported",
        "fp8": "FP8 experts are not supported",
        "fp4": "FP4 experts are not supported",
        "moe_shared_expert_overlap": "shared-expert overlap needs the alltoall/flex dispatcher",
        "overlap_moe_expert_parallel_comm": "EP communication overlap is not supported",
        "use_te_activation_func": "TransformerEngine activation modules are not supported",
        "moe_use_legacy_grouped_gemm": "the legacy GroupedMLP experts are not supported",
        "mtp_num_layers": "multi-token prediction layers are not supported",
    }
    for name, why in unsupported.items():
        if getattr(config, name, None):
            raise MicroEPConfigError(f"{flag(name)} cannot be used with --moe-token-dispatcher-type microep: {why}")
    recompute = getattr(config, "recompute_modules", None) or []
    if getattr(config, "recompute_granularity", None) == "selective" and "moe_act" in recompute:
        raise MicroEPConfigError(
            "--recompute-modules moe_act cannot be used with --moe-token-dispatcher-type microep "
            "(the MicroEP experts do not recompute activations)"
        )
    return settings


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
