"""What the GPT tests share: routing skewed to chosen experts, a GPTModel with stock or MicroEP MoE layers,
synthetic batches and the forward step Megatron's schedules call.

Imported by module name (pytest puts this folder on sys.path); tests/megatron has no __init__.py, which
would shadow the ``megatron`` package.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Megatron's ``forward_step_func`` as the embedded run passes it to the schedules: the next batch
# through the model, its mean token loss reported as "lm loss".
from megatron_microep.glue.embedded.loop import forward_step  # noqa: F401 - re-exported for the GPT tests

HOT_BIAS = 0.6  # router expert bias of a hot expert: most tokens pick it

# A small MoE GPT with local modules, no dropout, and routing steered only by skew_router's fixed expert bias.
SMALL_MOE = dict(
    hidden_size=32,
    num_attention_heads=4,
    ffn_hidden_size=64,
    moe_ffn_hidden_size=32,
    moe_router_topk=2,
    add_bias_linear=False,
    transformer_impl="local",
    hidden_dropout=0.0,
    attention_dropout=0.0,
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    moe_router_bias_update_rate=0.0,
    moe_router_load_balancing_type="none",
)


def moe_config(dispatcher: str, microep=None, **fields):
    """TransformerConfig of ``SMALL_MOE`` plus ``fields``, the dispatcher set; for ``microep`` the
    ``microep`` settings (a MicroEPConfig) attached."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_microep.glue.config import attach_microep_config

    config = TransformerConfig(moe_token_dispatcher_type=dispatcher, **{**SMALL_MOE, **fields})
    if dispatcher == "microep":
        attach_microep_config(config, microep)
    return config


def fsep_moe_config(policy: str | None, microep: dict, **fields):
    """``moe_config`` with gated experts: stock EP (the alltoall dispatcher) when ``policy`` is None,
    else FSEP layers under memory policy ``policy`` with the MicroEPConfig fields ``microep``."""
    from megatron_microep.glue.config import MicroEPConfig

    if policy is None:
        return moe_config("alltoall", gated_linear_unit=True, **fields)
    settings = MicroEPConfig(expert_sharding="fsep", fsep_memory_policy=policy, **microep)
    return moe_config("microep", settings, gated_linear_unit=True, **fields)


def skew_router(model, hot_experts: Iterable[int], bias: float = HOT_BIAS) -> None:
    """Route most tokens to ``hot_experts``: a fixed router expert bias (bias update rate 0 keeps it)."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("router.expert_bias"):
                buffer.zero_()
                buffer[list(hot_experts)] = bias


def tiny_moe_config(dispatcher: str, ep: int, num_experts: int, dtype=torch.float32, **overrides):
    """``SMALL_MOE`` as a TransformerConfig of 2 layers, ``num_experts`` experts over ``ep`` EP ranks,
    fp32 or bf16 weights; ``overrides`` replace or add TransformerConfig fields (no settings attached)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        SMALL_MOE,
        num_layers=2,
        num_moe_experts=num_experts,
        moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=ep,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
    )
    return TransformerConfig(**{**fields, **overrides})


def gpt_model(config, seed: int, vocab: int, seq_len: int, hot_experts: Iterable[int], **gpt_kwargs):
    """GPTModel with MicroEP's block spec when the config's dispatcher is microep (the layer class follows
    --microep-expert-sharding), else the stock local spec; the same seed gives the same weights."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_microep.glue import compat
    from megatron_microep.glue.spec import microep_decoder_block_spec

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    if config.moe_token_dispatcher_type == "microep":
        spec = microep_decoder_block_spec(config, use_transformer_engine=False)
    else:
        spec = compat.stock_decoder_block_spec(config, False)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=seq_len,
        position_embedding_type="rope",
        **gpt_kwargs,
    )
    skew_router(model, hot_experts)
    return model


def synthetic_batches(seed: int, vocab: int, seq_len: int, micro_batch: int, micro_batches: int):
    """``micro_batches`` tuples (tokens, labels, positions, causal mask) of [micro_batch, seq_len];
    the next token is the token + 1 (mod vocab), a pattern the model can learn so the loss moves."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)[None, None]
    positions = torch.arange(seq_len)[None].expand(micro_batch, seq_len)
    out = []
    for _ in range(micro_batches):
        start = torch.randint(0, vocab, (micro_batch, 1), generator=gen)
        tokens = (start + torch.arange(seq_len + 1)) % vocab
        out.append((tokens[:, :-1], tokens[:, 1:], positions, mask))
    return out


def stock_full_experts(moe) -> list[torch.Tensor]:
    """A stock MoE layer's experts as full tensors [E, *shape], one per expert tensor (all-gathered over EP)."""
    import torch.distributed as dist

    from megatron_microep.glue import compat

    out = []
    for mine in zip(*compat.expert_tensors(moe.experts)):
        local = torch.stack([t.detach() for t in mine])
        everyone = [torch.empty_like(local) for _ in range(dist.get_world_size(moe.ep_group))]
        dist.all_gather(everyone, local, group=moe.ep_group)
        out.append(torch.cat(everyone))
    return out
