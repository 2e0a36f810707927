"""What the embedded run trains: config checks, the GPTModel, and Megatron's training stack around it
(DistributedDataParallel, ``get_megatron_optimizer``, ``OptimizerParamScheduler``), wired as
Megatron-LM's ``pretrain`` wires them. Keys a config leaves out take megatron-core's defaults."""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from megatron_microep.glue.config import DISPATCHER_TYPE
from megatron_microep.glue.config_schema import (
    MEGATRON_DATA,
    SECTIONS,
    TRANSFORMER,
    LaunchConfig,
    embedded_unsupported,
)
from megatron_microep.glue.embedded import TrainError

# Warnings megatron-core gives every CPU process of this run, about nothing the config could change:
# TransformerEngine and apex are absent by design, and 0.16's own default CUDA-graph scope is deprecated.
QUIET_WARNINGS = (r".*(Apex|Transformer Engine and Apex) (is|are) not installed", r"full scope is deprecated")

# Megatron's flag names that differ from the TransformerConfig field they set.
_TRANSFORMER_FIELD = {"num_experts": "num_moe_experts", "norm_epsilon": "layernorm_epsilon"}
# training.<key> -> OptimizerConfig field, where the config sets it (else megatron-core's default).
_OPTIMIZER_FIELDS = ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad")


def check_embedded_support(config: LaunchConfig) -> list[str]:
    """Raise TrainError for settings this CPU run cannot honour; return notes on what it leaves out."""
    unsupported = embedded_unsupported(config)
    if unsupported:
        raise TrainError(
            f"{config.source}: the embedded CPU run cannot honour {', '.join(unsupported)} "
            "(Megatron-LM only: use scripts/pretrain_gpt_microep.py, docs/launch.md)"
        )
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        if config.get("parallel", key, 1) != 1:
            raise TrainError(f"{config.source}: parallel.{key} must be 1 in the embedded CPU run")
    if config.get("parallel", "expert_tensor_parallel_size", 1) != 1:
        raise TrainError(f"{config.source}: parallel.expert_tensor_parallel_size must be 1 in the embedded CPU run")
    if config.get("model", "transformer_impl", "local") != "local":
        raise TrainError(
            f"{config.source}: the embedded CPU run needs model.transformer_impl: local (TransformerEngine needs CUDA)"
        )
    if config.get("moe", "moe_grouped_gemm", False):
        raise TrainError(
            f"{config.source}: moe.moe_grouped_gemm needs TransformerEngine (CUDA); "
            "set it to false for the embedded CPU run"
        )
    if config.get("model", "group_query_attention", False) and config.get("model", "num_query_groups") is None:
        raise TrainError(f"{config.source}: model.group_query_attention needs model.num_query_groups")
    notes = []
    data = [
        k
        for k, v in config.sections.get("data", {}).items()
        if {o.key: o for o in SECTIONS["data"]}[k].embedded == MEGATRON_DATA and v is not False
    ]
    if data:
        notes.append(
            f"data.{', data.'.join(data)}: Megatron-LM data settings, not used here (this run "
            "trains on the Python standard-library corpus)"
        )
    if config.dispatcher != DISPATCHER_TYPE and config.sections.get("microep"):
        notes.append(
            f"microep section not used: moe.moe_token_dispatcher_type is {config.dispatcher} "
            "(the balance report still uses microep.redundant_slots)"
        )
    return notes


def quiet_megatron_warnings() -> None:
    """Silence ``QUIET_WARNINGS`` in this process (call before megatron-core is imported)."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def transformer_config(config: LaunchConfig):
    """The TransformerConfig the config's model/moe/parallel keys describe, for CPU (fp32, local spec)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    kwargs = {}
    for section in ("model", "moe", "parallel"):
        options = {o.key: o for o in SECTIONS[section]}
        for key, value in config.sections.get(section, {}).items():
            if options[key].embedded != TRANSFORMER:
                continue
            if key == "swiglu":
                if value:
                    kwargs.update(gated_linear_unit=True, activation_func=torch.nn.functional.silu)
                continue
            if key == "disable_bias_linear":
                kwargs["add_bias_linear"] = not value
                continue
            name = _TRANSFORMER_FIELD.get(key, key)
            if name not in fields:
                raise TrainError(f"{section}.{key}: this megatron-core has no TransformerConfig.{name}")
            kwargs[name] = value
    # Megatron's per-EP-rank expert initialisation (the CPU harness makes it work): with CPU
    # initialisation every EP rank would start from identical local experts.
    kwargs.update(
        use_cpu_initialization=False,
        params_dtype=torch.float32,
        bf16=False,
        fp16=False,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )
    config_obj = TransformerConfig(**kwargs)
    settings = config.microep_settings()
    if settings is not None:
        from megatron_microep.glue.config import attach_microep_config

        attach_microep_config(config_obj, settings)
    return config_obj


def padded_vocab_size(vocab_size: int, config: LaunchConfig) -> int:
    multiple = config.get("model", "make_vocab_size_divisible_by", 128)
    return int(math.ceil(vocab_size / multiple) * multiple)


def build_model(config: LaunchConfig, tconfig, vocab_size: int):
    """GPTModel with Megatron's local decoder block spec, MoE layers swapped for MicroEP ones if selected."""
    from megatron.core.models.gpt import GPTModel

    from megatron_microep.glue import compat

    if config.dispatcher == DISPATCHER_TYPE:
        from megatron_microep.glue.spec import microep_decoder_block_spec

        spec = microep_decoder_block_spec(tconfig, use_transformer_engine=False)
    else:
        spec = compat.stock_decoder_block_spec(tconfig, use_transformer_engine=False)
    seq = config.get("model", "seq_length")
    gpt_kwargs = dict(
        position_embedding_type=config.get("model", "position_embedding_type", "learned_absolute"),
        share_embeddings_and_output_weights=not config.get("model", "untie_embeddings_and_output_weights", False),
    )
    for key in ("rotary_base", "rotary_percent"):
        if config.get("model", key) is not None:
            gpt_kwargs[key] = config.get("model", key)
    return GPTModel(
        config=tconfig,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(vocab_size, config),
        max_sequence_length=config.get("model", "max_position_embeddings", seq),
        **gpt_kwargs,
    )


def moe_layers(model) -> list[torch.nn.Module]:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def optimizer_config(config: LaunchConfig):
    """Megatron's OptimizerConfig for the config's ``training`` keys: Adam (decoupled weight decay),
    fp32, not distributed; keys the config omits keep megatron-core's defaults."""
    from megatron.core.optimizer import OptimizerConfig

    given = {key: config.get("training", key) for key in _OPTIMIZER_FIELDS if config.get("training", key) is not None}
    return OptimizerConfig(
        optimizer="adam", bf16=False, fp16=False, params_dtype=torch.float32, use_distributed_optimizer=False, **given
    )


def training_stack(config: LaunchConfig, tconfig, model):
    """(ddp, optimizer, scheduler): Megatron's DistributedDataParallel around ``model``, the optimizer
    ``get_megatron_optimizer`` builds (dense and expert parameters in their own optimizers, Megatron's
    weight-decay and clipping rules), and the learning-rate / weight-decay schedule in steps. The
    TransformerConfig gets the hooks Megatron's schedules call (``no_sync``, ``finalize_model_grads``,
    loss scaling), as Megatron-LM's ``pretrain`` sets them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    ddp = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt_config = optimizer_config(config)
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    tconfig.no_sync_func = ddp.no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    train_iters = config.get("training", "train_iters")
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt_config.lr,
        min_lr=opt_config.min_lr or 0.0,
        lr_warmup_steps=config.get("training", "lr_warmup_iters", 0),
        lr_decay_steps=config.get("training", "lr_decay_iters", train_iters),
        lr_decay_style=config.get("training", "lr_decay_style", "linear"),
        start_wd=opt_config.weight_decay,
        end_wd=opt_config.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
    )
    return ddp, optimizer, scheduler


def optimizer_names(optimizer) -> list[str]:
    """The Megatron optimizer classes in use (one per parameter group family: dense, expert)."""
    return [type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])]
