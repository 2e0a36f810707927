"""The --microep-* flags, the 'microep' dispatcher type, and configuration-time errors naming the flag."""

import argparse

import pytest

from megatron_microep.glue.args import add_microep_args, microep_config_from_args, validate_microep_args
from megatron_microep.glue.config import (
    MicroEPConfig,
    MicroEPConfigError,
    check_megatron_compatibility,
    resolve_microep_config,
)


def _megatron_like_parser():
    """The Megatron-LM flags these checks read, as Megatron-LM declares them (choices included)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall", "flex"], default="allgather")
    parser.add_argument("--num-experts", type=int)
    parser.add_argument("--expert-model-parallel-size", type=int, default=1)
    parser.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    parser.add_argument("--moe-expert-capacity-factor", type=float, default=None)
    parser.add_argument("--mtp-num-layers", type=int, default=None)
    return parser


def _parse(*argv):
    return add_microep_args(_megatron_like_parser()).parse_args(list(argv))


BASE = ("--moe-token-dispatcher-type", "microep", "--num-experts", "8", "--expert-model-parallel-size", "4")


def test_flags_parse_into_settings():
    args = _parse(
        *BASE,
        "--microep-redundant-slots",
        "1",
        "--microep-replan-interval",
        "50",
        "--microep-planner",
        "greedy",
        "--microep-history-window",
        "20",
        "--microep-trace-dir",
        "/tmp/t",
        "--microep-expert-backend",
        "loop",
        "--microep-gpus-per-node",
        "8",
        "--microep-forecast-burst",
        "2.5",
    )
    settings = validate_microep_args(args)
    assert settings == MicroEPConfig(
        redundant_slots=1,
        replan_interval=50,
        planner="greedy",
        history_window=20,
        trace_dir="/tmp/t",
        expert_backend="loop",
        gpus_per_node=8,
        forecast_burst=2.5,
    )


@pytest.mark.parametrize(
    "experts, ep, extra, slots, interval",
    [
        (256, 64, (), 2, 1),  # DeepSeek-V3 at EP 64: 4 experts per rank
        (8, 4, (), 1, 1),  # 2 per rank: one replica slot leaves a home expert per rank
        (8, 8, (), 0, 0),  # 1 per rank: no room for a replica, nothing to place
        (8, 1, (), 0, 0),  # no expert parallelism: every expert is local
        (64, 8, ("--microep-redundant-slots", "0"), 0, 0),  # stock Megatron EP
        (64, 8, ("--microep-replan-interval", "0"), 2, 0),  # replicas, placement never re-planned
        (64, 8, ("--microep-expert-sharding", "fsep"), 0, 1),  # FSEP re-lays out its experts every step
    ],
)
def test_defaults_are_sized_for_the_model(experts, ep, extra, slots, interval):
    argv = ("--moe-token-dispatcher-type", "microep", "--num-experts", str(experts))
    settings = validate_microep_args(_parse(*argv, "--expert-model-parallel-size", str(ep), *extra))
    assert (settings.redundant_slots, settings.replan_interval) == (slots, interval)
    assert settings.planner_time_limit_s == 0.5


def test_other_dispatchers_are_untouched():
    assert validate_microep_args(_parse("--moe-token-dispatcher-type", "alltoall")) is None
    with pytest.raises(SystemExit):  # argparse still rejects unknown dispatcher names
        _parse("--moe-token-dispatcher-type", "nonsense")


def test_unknown_planner_is_rejected_by_argparse():
    with pytest.raises(SystemExit):
        _parse(*BASE, "--microep-planner", "magic")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (
            ("--microep-redundant-slots", "2"),
            "--microep-redundant-slots 2 must be smaller than the experts per EP rank",
        ),
        (("--microep-redundant-slots", "-1"), "--microep-redundant-slots must be >= 0"),
        (
            ("--microep-redundant-slots", "0", "--microep-replan-interval", "10"),
            "--microep-replan-interval > 0 needs --microep-redundant-slots",
        ),
        (("--microep-history-window", "0"), "--microep-history-window must be >= 1"),
        (("--microep-replan-lag", "0"), "--microep-replan-lag must be >= 1"),
        (("--microep-forecast-burst", "0.5"), "--microep-forecast-burst must be 0 \\(off\\) or >= 1"),
        (("--moe-expert-capacity-factor", "1.5"), "--moe-expert-capacity-factor cannot be used"),
    ],
)
def test_invalid_combinations_name_the_flag(argv, flag):
    with pytest.raises(MicroEPConfigError, match=flag.replace("+", r"\+")):
        validate_microep_args(_parse(*BASE, *argv))


def test_replicas_need_expert_parallelism():
    args = _parse("--moe-token-dispatcher-type", "microep", "--num-experts", "8", "--microep-redundant-slots", "1")
    with pytest.raises(
        MicroEPConfigError, match="--microep-redundant-slots > 0 needs --expert-model-parallel-size > 1"
    ):
        validate_microep_args(args)


def test_missing_flags_are_reported():
    with pytest.raises(SystemExit):  # without add_microep_args, 'microep' is no dispatcher type
        _megatron_like_parser().parse_args(list(BASE))
    args = argparse.Namespace(moe_token_dispatcher_type="microep", num_experts=8, expert_model_parallel_size=4)
    with pytest.raises(MicroEPConfigError, match="add_microep_args"):
        validate_microep_args(args)


def test_settings_reach_a_transformer_config_and_are_checked_there():
    from megatron.core.transformer.transformer_config import TransformerConfig

    def config(**kw):
        return TransformerConfig(
            num_layers=1,
            hidden_size=8,
            num_attention_heads=2,
            num_moe_experts=8,
            moe_token_dispatcher_type="microep",
            expert_model_parallel_size=4,
            moe_ffn_hidden_size=6,
            **kw,
        )

    c = microep_config_from_args(_parse(*BASE, "--microep-redundant-slots", "1"), config())
    assert resolve_microep_config(c) == MicroEPConfig(redundant_slots=1, replan_interval=1)
    with pytest.raises(MicroEPConfigError, match="no MicroEP settings"):
        resolve_microep_config(config())
    with pytest.raises(MicroEPConfigError, match="--microep-redundant-slots 2 must be smaller"):
        resolve_microep_config(config(), MicroEPConfig(redundant_slots=2))
    with pytest.raises(MicroEPConfigError, match="--expert-tensor-parallel-size 4 must divide --moe-ffn-hidden-size 6"):
        check_megatron_compatibility(
            MicroEPConfig(),
            argparse.Namespace(
                num_moe_experts=8, expert_model_parallel_size=4, expert_tensor_parallel_size=4, moe_ffn_hidden_size=6
            ),
        )
