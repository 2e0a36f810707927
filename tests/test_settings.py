"""One declaration per MicroEP setting (megatron_microep/settings.py) and everything derived from it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from megatron_microep.glue.args import add_microep_args
from megatron_microep.glue.config_schema import SECTIONS
from megatron_microep.planning.policies.microep import MicroEpParams
from megatron_microep.settings import (
    MicroEPConfig,
    MicroEPConfigError,
    flag_of,
    settings,
    settings_table,
    simulator_params,
    value_type,
)

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings()


def _parser():
    return add_microep_args(argparse.ArgumentParser())


def test_every_setting_is_a_flag_with_the_declared_default_type_and_choices():
    actions = {a.dest: a for a in _parser()._actions}
    for f, spec in SETTINGS:
        action = actions[f"microep_{f.name}"]
        assert action.option_strings == [flag_of(f.name)]
        assert action.default == f.default and action.type is value_type(f)
        assert tuple(action.choices or ()) == spec.all_choices()
        assert action.help == spec.help
    assert sum(dest.startswith("microep_") for dest in actions) == len(SETTINGS)


def test_defaults_parse_back_into_the_default_settings():
    assert MicroEPConfig.from_args(_parser().parse_args([])) == MicroEPConfig()


def test_every_setting_is_a_yaml_option_with_the_flag_and_help():
    options = {o.key: o for o in SECTIONS["microep"]}
    assert list(options) == [f.name for f, _ in SETTINGS]
    for f, spec in SETTINGS:
        assert options[f.name].cli_flag == flag_of(f.name) and options[f.name].help == spec.help
        assert options[f.name].choices == spec.all_choices()


@pytest.mark.parametrize("name", [f.name for f, s in SETTINGS if s.minimum is not None or s.above is not None])
def test_each_range_is_checked_and_the_error_names_the_flag(name):
    f, spec = next((f, s) for f, s in SETTINGS if f.name == name)
    bound = spec.minimum if spec.minimum is not None else spec.above
    below = value_type(f)(bound - 1)
    if below == spec.off:  # the value that switches the feature off is allowed: test between it and the range
        below = value_type(f)((bound + spec.off) / 2)
    if below != spec.off:  # (an int range that starts right after its off value has nothing between)
        with pytest.raises(MicroEPConfigError, match=f"^{flag_of(name)} must be .*>"):
            MicroEPConfig(**{name: below}).validate()
    if spec.off is not None:
        MicroEPConfig(**{name: value_type(f)(spec.off)}).validate()
    if spec.above is None:  # the inclusive bound itself is allowed (unless a relation rule forbids it)
        try:
            MicroEPConfig(**{name: value_type(f)(bound)}).validate()
        except MicroEPConfigError as err:
            assert flag_of(name) not in str(err).split(" ")[0], err


@pytest.mark.parametrize("name", [f.name for f, s in SETTINGS if s.all_choices()])
def test_each_choice_is_checked_and_the_error_names_the_flag(name):
    with pytest.raises(MicroEPConfigError, match=f"^{flag_of(name)} must be one of"):
        MicroEPConfig(**{name: "no-such-choice"}).validate()


@pytest.mark.parametrize("name", [f.name for f, _ in SETTINGS])
def test_wrong_types_are_rejected_by_name(name):
    f = next(f for f, _ in SETTINGS if f.name == name)
    wrong = "text" if value_type(f) is not str else 3
    with pytest.raises(MicroEPConfigError, match=f"^{flag_of(name)} must be"):
        MicroEPConfig(**{name: wrong}).validate()
    if value_type(f) is int:
        with pytest.raises(MicroEPConfigError, match=f"^{flag_of(name)} must be int"):
            MicroEPConfig(**{name: True}).validate()


def test_simulator_params_name_real_policy_parameters_and_carry_the_values():
    fields = {f.name for f in dataclasses.fields(MicroEpParams)}
    config = MicroEPConfig(
        redundant_slots=2, replan_interval=7, planner="greedy", history_window=3, planner_time_limit_s=0.25
    ).validate()
    params = simulator_params(config, micro_batches_per_step=4)
    assert set(params) <= fields
    assert params["replan_interval"] == 7 and params["time_limit_s"] == 0.25
    assert params["history_micro_batches"] == 12 and params["planner"] == "eplb"
    MicroEpParams(**params).validate()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"planner": "greedy", "planner_time_limit_s": 2.5, "move_penalty": 3.0, "forecast_samples": 0},
        {"gpus_per_node": 2, "forecast_burst": 0.0, "forecast_recent": 5},
    ],
)
def test_the_simulator_replays_with_the_runtime_planner_settings(overrides):
    from megatron_microep.glue.layer import planner_settings
    from megatron_microep.planning.policies import make_policy
    from megatron_microep.planning.policies.base import Layout

    config = MicroEPConfig(redundant_slots=2, replan_interval=3, history_window=5, **overrides).validate()
    layout = Layout(num_gpus=4, num_experts=16, redundant_slots=2, gpus_per_node=config.gpus_per_node)
    policy = make_policy("microep", layout, **simulator_params(config, micro_batches_per_step=8))
    assert policy.planner_settings() == planner_settings(config)
    assert policy.replan_interval == 3 and policy.history_needs() == (40, 1)


def test_simulator_microep_defaults_are_the_runtime_defaults():
    runtime = simulator_params(MicroEPConfig(), micro_batches_per_step=4)
    simulator = MicroEpParams()
    mapped = {name: value for name, value in runtime.items() if name != "history_micro_batches"}
    assert mapped == {name: getattr(simulator, name) for name in mapped}
    assert mapped["replan_interval"] == 1 and mapped["node_confined"] is False and mapped["time_limit_s"] == 0.5


def test_docs_flag_table_is_the_generated_one():
    doc = (ROOT / "docs" / "dispatcher.md").read_text(encoding="utf-8")
    assert settings_table() in doc, "docs/dispatcher.md is stale: run python scripts/update_settings_table.py"


def test_burst_slots_are_accepted_under_fsep():
    MicroEPConfig(burst_slots=2).validate()
    assert MicroEPConfig(burst_slots=2, expert_sharding="fsep").validate().burst_slots == 2
