"""Megatron settings MicroEP cannot honour are configuration errors naming the flag; their neighbours pass.

Each case is one setting of ``UNSUPPORTED_SETTINGS`` as Megatron-LM's parsed arguments (or a Bridge
provider before ``finalize()``) carry it, next to the closest setting that must still be accepted.
The CUDA-graph cases use the names of both generations: ``--cuda-graph-scope`` (0.16; parsed into
``cuda_graph_scope_deprecated`` from 0.19) and ``--cuda-graph-modules`` (0.19 on), the implementations
``local`` / ``transformer_engine`` / ``full_iteration`` and their deprecated switches. The last test
runs the same check on real TransformerConfigs after Megatron's own ``__post_init__`` normalisation.
"""

import enum
import re
from types import SimpleNamespace

import pytest

from megatron_microep.glue.config import MicroEPConfig, MicroEPConfigError, check_megatron_compatibility

MOE = dict(num_moe_experts=8, expert_model_parallel_size=4, moe_ffn_hidden_size=32)


class Region(enum.Enum):
    """Stands in for Megatron's CudaGraphScope / CudaGraphModule: only ``.name`` is read."""

    attn = 1
    mlp = 2
    moe = 3
    moe_router = 4
    moe_preprocess = 5
    full_iteration = 6


def _check(**settings):
    check_megatron_compatibility(MicroEPConfig(), SimpleNamespace(**MOE, **settings))


# name: (rejected settings, text the error must contain, accepted neighbour settings)
CASES = {
    "glu_interleave": (
        dict(gated_linear_unit=True, moe_mlp_glu_interleave_size=32),
        "--moe-mlp-glu-interleave-size cannot be used",
        dict(gated_linear_unit=True, moe_mlp_glu_interleave_size=None),
    ),
    "inference_optimized": (
        dict(transformer_impl="inference_optimized"),
        "--transformer-impl inference_optimized cannot be used",
        dict(transformer_impl="transformer_engine"),
    ),
    "megatron_fsdp": (
        dict(use_megatron_fsdp=True),
        "--use-megatron-fsdp cannot be used",
        dict(use_megatron_fsdp=False, use_distributed_optimizer=True),
    ),
    "custom_fsdp": (
        dict(use_custom_fsdp=True),
        "--use-custom-fsdp cannot be used",
        dict(use_custom_fsdp=False, use_distributed_optimizer=True),
    ),
    "overlap_dispatch_backward_wgrad": (
        dict(overlap_dispatch_backward_with_experts_wgrad=True),
        "--overlap-dispatch-backward-with-experts-wgrad cannot be used",
        dict(overlap_dispatch_backward_with_experts_wgrad=False),
    ),
    "expert_gtp_flag": (
        dict(expert_tensor_parallel_size=1, expert_tensor_parallel_num_weight_shards=4),
        "--expert-tensor-parallel-num-weight-shards 4 (expert-TP 1) cannot be used",
        dict(expert_tensor_parallel_size=2, expert_tensor_parallel_num_weight_shards=2),
    ),
    "expert_gtp_resolved": (  # validated args / TransformerConfig: the derived remat size
        dict(expert_tensor_parallel_num_weight_shards=8, expert_gtp_weight_remat_size=8),
        "--expert-tensor-parallel-num-weight-shards 8",
        dict(expert_tensor_parallel_num_weight_shards=1, expert_gtp_weight_remat_size=1),
    ),
    "latent_moe": (
        dict(moe_latent_size=64),
        "--moe-latent-size cannot be used",
        dict(moe_latent_size=None),
    ),
    "single_grouped_weight": (  # megatron-core 0.20
        dict(moe_use_grouped_tensor=True, moe_single_grouped_weight=True),
        "--moe-single-grouped-weight cannot be used",
        dict(moe_use_grouped_tensor=True, moe_single_grouped_weight=False),
    ),
    "single_grouped_bias": (
        dict(moe_use_grouped_tensor=True, moe_single_grouped_bias=True),
        "--moe-single-grouped-bias cannot be used",
        dict(moe_use_grouped_tensor=True, moe_single_grouped_bias=False),
    ),
    # --- CUDA graphs, TransformerEngine implementation --------------------------------------------------
    "te_graph_moe": (
        dict(cuda_graph_impl="transformer_engine", cuda_graph_scope=[Region.moe]),
        "--cuda-graph-impl transformer_engine --cuda-graph-scope moe cannot be used",
        dict(cuda_graph_impl="transformer_engine", cuda_graph_scope=[Region.attn, Region.moe_router]),
    ),
    "te_graph_moe_preprocess": (
        dict(cuda_graph_impl="transformer_engine", cuda_graph_modules=[Region.moe_router, Region.moe_preprocess]),
        "--cuda-graph-modules moe_router moe_preprocess cannot be used",
        dict(cuda_graph_impl="transformer_engine", cuda_graph_modules=[Region.moe_router]),
    ),
    "te_graph_whole_layer": (
        dict(cuda_graph_impl="transformer_engine", cuda_graph_modules=[]),
        "--cuda-graph-impl transformer_engine (whole layer) cannot be used",
        dict(cuda_graph_impl="transformer_engine", cuda_graph_modules=[Region.attn]),
    ),
    "te_graph_deprecated_switch": (
        dict(external_cuda_graph=True, cuda_graph_scope=[Region.moe]),
        "--external-cuda-graph --cuda-graph-scope moe cannot be used",
        dict(external_cuda_graph=True, cuda_graph_scope=[Region.attn]),
    ),
    "te_graph_strings": (  # a Bridge provider before finalize(): comma-separated strings, "full" default
        dict(cuda_graph_impl="transformer_engine", cuda_graph_modules="full"),
        "(whole layer) cannot be used",
        dict(cuda_graph_impl="transformer_engine", cuda_graph_modules="attn,moe_router"),
    ),
    "te_graph_scope_deprecated_0_19": (  # Megatron-LM 0.19's raw parse of --cuda-graph-scope
        dict(cuda_graph_impl="transformer_engine", cuda_graph_scope_deprecated=[Region.moe], cuda_graph_modules=[]),
        "--cuda-graph-impl transformer_engine --cuda-graph-scope moe cannot be used",
        dict(cuda_graph_impl="transformer_engine", cuda_graph_scope_deprecated=None, cuda_graph_modules=[Region.attn]),
    ),
    # --- CUDA graphs, local implementation: whole TransformerLayers -------------------------------------
    "local_graph_attn": (
        dict(cuda_graph_impl="local", cuda_graph_modules=[Region.attn]),
        "--cuda-graph-impl local --cuda-graph-modules attn cannot be used",
        dict(cuda_graph_impl="local", cuda_graph_modules=[Region.mlp]),
    ),
    "local_graph_router": (
        dict(cuda_graph_impl="local", cuda_graph_scope=[Region.moe_router]),
        "--cuda-graph-impl local --cuda-graph-scope moe_router cannot be used",
        dict(cuda_graph_impl="transformer_engine", cuda_graph_scope=[Region.moe_router]),
    ),
    "local_graph_deprecated_switch": (
        dict(enable_cuda_graph=True, cuda_graph_scope=[]),
        "--enable-cuda-graph (whole layer) cannot be used",
        dict(enable_cuda_graph=False, cuda_graph_impl="none", cuda_graph_scope=[]),
    ),
    # --- CUDA graphs, full iteration ---------------------------------------------------------------------
    "full_iteration_impl": (
        dict(cuda_graph_impl="full_iteration", cuda_graph_modules=[]),
        "--cuda-graph-impl full_iteration",
        dict(cuda_graph_impl="none", cuda_graph_modules=[]),
    ),
    "full_iteration_scope_0_16": (
        dict(cuda_graph_impl="local", cuda_graph_scope=[Region.full_iteration]),
        "--cuda-graph-impl local --cuda-graph-scope full_iteration cannot be used",
        dict(cuda_graph_impl="local", cuda_graph_scope=[Region.mlp]),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rejected_with_the_flag_named_and_the_neighbour_accepted(name):
    rejected, message, accepted = CASES[name]
    with pytest.raises(MicroEPConfigError, match=re.escape(message)) as err:
        _check(**rejected)
    assert "--moe-token-dispatcher-type microep" in str(err.value)
    _check(**accepted)


def test_every_rule_is_exercised():
    """Each registry entry rejects at least one case above (a new entry needs its case)."""
    from megatron_microep.glue.config import UNSUPPORTED_SETTINGS

    cases = [SimpleNamespace(**MOE, **rejected) for rejected, _, _ in CASES.values()]
    previous = [
        dict(moe_expert_capacity_factor=1.0),
        dict(moe_pad_expert_input_to_capacity=True),
        dict(moe_router_padding_for_quantization=True),
        dict(fp8="hybrid"),
        dict(fp4="nvfp4"),
        dict(moe_shared_expert_overlap=True),
        dict(overlap_moe_expert_parallel_comm=True),
        dict(use_te_activation_func=True),
        dict(moe_use_legacy_grouped_gemm=True),
        dict(recompute_granularity="selective", recompute_modules=["moe_act"]),
    ]
    cases += [SimpleNamespace(**MOE, **settings) for settings in previous]
    for rule in UNSUPPORTED_SETTINGS:
        assert any(rule.offending(case) for case in cases), rule.reason


def test_mtp_is_accepted():
    _check(mtp_num_layers=1)


def test_real_transformer_configs_after_post_init():
    """The same rules on TransformerConfigs as Megatron normalises them (0.16: cuda_graph_scope enums;
    0.19: cuda_graph_modules), where the installed megatron-core can build them on CPU."""
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    regions = "cuda_graph_modules" if "cuda_graph_modules" in names else "cuda_graph_scope"

    def config(**kw):
        return TransformerConfig(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            transformer_impl="local",
            moe_token_dispatcher_type="microep",
            **MOE,
            **kw,
        )

    def check(c):
        check_megatron_compatibility(MicroEPConfig(), c)

    check(config(cuda_graph_impl="transformer_engine", **{regions: ["attn", "moe_router"]}))
    for kw, message in [
        (dict(cuda_graph_impl="transformer_engine"), "--cuda-graph-impl transformer_engine (whole layer)"),
        (
            dict(cuda_graph_impl="transformer_engine", **{regions: ["moe_router", "moe_preprocess"]}),
            f"--{regions.replace('_', '-')} moe_router moe_preprocess",
        ),
        (
            dict(cuda_graph_impl="local", **{regions: ["attn"]}),
            f"--cuda-graph-impl local --{regions.replace('_', '-')} attn",
        ),
        (dict(enable_cuda_graph=True), "--enable-cuda-graph (whole layer)"),
        (dict(moe_latent_size=16), "--moe-latent-size"),
    ]:
        with pytest.raises(MicroEPConfigError, match=re.escape(message)):
            check(config(**kw))
    if "moe_mlp_glu_interleave_size" in names:  # 0.19 on
        check(config(gated_linear_unit=True))
        with pytest.raises(MicroEPConfigError, match="--moe-mlp-glu-interleave-size"):
            check(config(gated_linear_unit=True, moe_mlp_glu_interleave_size=32))
