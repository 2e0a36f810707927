"""Launch configs: presets validate, flags round-trip through a parser built from the schema, bad input
gets an error naming file and key, and ``microep launch-args`` prints the flags or a one-line error."""

import argparse
import os
import random
import shlex
from pathlib import Path

import pytest
import yaml

from megatron_microep.cli import main
from megatron_microep.glue.config_schema import (
    KINDS,
    SECTIONS,
    ConfigError,
    embedded_unsupported,
    load_config,
    parse_config,
    preset_path,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def _eval_layer_freq(text):
    # Megatron evaluates --moe-layer-freq patterns as Python list expressions; so does this check.
    return eval(text, {"__builtins__": {}}) if "[" in text else int(text)  # noqa: S307


def _schema_parser() -> argparse.ArgumentParser:
    """An argparse parser reading every flag the schema can print, typed like Megatron's."""
    parser = argparse.ArgumentParser(add_help=False)
    for section, options in SECTIONS.items():
        for o in options:
            dest = f"{section}.{o.key}"
            if o.kind == "switch":
                parser.add_argument(o.cli_flag, dest=dest, action="store_true", default=None)
            elif o.kind == "str_list":
                parser.add_argument(o.cli_flag, dest=dest, nargs="+")
            elif o.kind == "layer_freq":
                parser.add_argument(o.cli_flag, dest=dest, type=_eval_layer_freq)
            else:
                kind = {"int": int, "float": float}.get(o.kind, str)
                parser.add_argument(o.cli_flag, dest=dest, type=kind)
    return parser


def _parsed_back(config) -> dict:
    namespace = _schema_parser().parse_args(config.megatron_flags())
    out = {}
    for dest, value in vars(namespace).items():
        if value is not None:
            section, key = dest.split(".")
            out.setdefault(section, {})[key] = value
    return out


def _flag_sections(config) -> dict:
    out = {}
    for section in ("model", "moe", "parallel", "training", "data", "microep"):
        if section == "microep" and config.microep_settings() is None:
            continue
        values = {k: v for k, v in config.sections.get(section, {}).items() if v is not False}
        if values:
            out[section] = values
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate_and_flags_round_trip(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.name == name
    assert _parsed_back(config) == _flag_sections(config)
    assert config.microep_settings() is not None  # every preset runs MicroEP


def test_presets_cover_the_issue():
    assert {"tiny-cpu", "mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b"} <= set(PRESETS)
    assert preset_path("tiny-cpu") == CONFIGS / "tiny-cpu.yaml"


def _random_value(option, rng):
    if option.choices:
        return rng.choice(option.choices)
    if option.kind == "switch":
        return rng.random() < 0.5
    if option.kind == "int":
        return rng.randint(1, 64)
    if option.kind == "float":
        return round(rng.uniform(0.0, 2.0), rng.randint(0, 6))
    if option.kind == "str":
        return rng.choice(["a", "path/to/x", "99,1,0", "name with space"])
    if option.kind == "str_list":
        return [rng.choice(["p1", "0.3 p2", "/d/x_text_document"]) for _ in range(rng.randint(1, 3))]
    raise AssertionError(option.kind)


def test_random_training_values_round_trip():
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    base = yaml.safe_load((CONFIGS / "tiny-cpu.yaml").read_text())
    free = [o for o in SECTIONS["data"] if o.key not in ("data_path", "mock_data")]
    for _ in range(30):
        raw = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
        raw["data"] = {o.key: _random_value(o, rng) for o in free if rng.random() < 0.6}
        raw["model"]["init_method_std"] = round(rng.uniform(0.001, 0.1), 5)
        raw["moe"]["moe_layer_freq"] = [rng.randint(0, 1) for _ in range(raw["model"]["num_layers"])]
        for key in ("swiglu", "disable_bias_linear", "qk_layernorm"):
            raw["model"][key] = rng.random() < 0.5
        config = parse_config(raw, "random.yaml")
        assert _parsed_back(config) == _flag_sections(config), f"seed {seed}"
        # The printed line survives a shell round trip (quoted values with spaces).
        assert shlex.split(shlex.join(config.megatron_flags())) == config.megatron_flags()


def test_layer_freq_pattern_is_what_megatron_evaluates():
    freq = [0] * 3 + [1] * 58
    rendered = KINDS["layer_freq"].render(SECTIONS["moe"][3], freq)
    assert rendered == ["--moe-layer-freq", "([0]*3+[1]*58)"]
    assert _eval_layer_freq(rendered[1]) == freq


def _tiny_raw():
    return yaml.safe_load((CONFIGS / "tiny-cpu.yaml").read_text())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(modle={}), "unknown section 'modle' (did you mean 'model'?)"),
        (lambda r: r["model"].update(hidden_sise=3), "unknown key 'model.hidden_sise' (did you mean 'hidden_size'?)"),
        (lambda r: r["model"].update(hidden_size="128"), "model.hidden_size: expected an integer, got '128'"),
        (lambda r: r["model"].update(swiglu="yes"), "model.swiglu: expected true or false"),
        (
            lambda r: r["model"].update(normalization="BatchNorm"),
            "model.normalization: expected one of LayerNorm, RMSNorm",
        ),
        (lambda r: r["training"].update(lr=-1.0), "training.lr: must be >= 0.0, got -1.0"),
        (lambda r: r["moe"].pop("num_experts"), "missing required key 'moe.num_experts'"),
        (
            lambda r: r["model"].update(num_attention_heads=3),
            "model.hidden_size 128 is not divisible by model.num_attention_heads 3",
        ),
        (
            lambda r: r["model"].update(num_query_groups=2),
            "model.num_query_groups needs model.group_query_attention: true",
        ),
        (lambda r: r["moe"].update(moe_layer_freq=[1, 0]), "moe.moe_layer_freq lists 2 layers, model.num_layers is 4"),
        (lambda r: r["moe"].update(moe_router_topk=17), "moe.moe_router_topk 17 exceeds moe.num_experts 16"),
        (
            lambda r: r["moe"].update(num_experts=18),
            "moe.num_experts 18 is not divisible by parallel.expert_model_parallel_size 4",
        ),
        (
            lambda r: r["training"].update(global_batch_size=24),
            "training.global_batch_size 24 is not divisible by training.micro_batch_size 4 x data-parallel size 4",
        ),
        (
            lambda r: r["training"].update(lr_warmup_iters=500),
            "training.lr_warmup_iters 500 must be smaller than training.lr_decay_iters 120",
        ),
        (
            lambda r: r["microep"].update(redundant_slots=4),
            "microep: --microep-redundant-slots 4 must be smaller than the experts per EP rank",
        ),
        (lambda r: r["microep"].update(planner="cplex"), "microep.planner: expected one of ortools, greedy"),
        (lambda r: r["data"].update(data_path="x"), "data.data_path and data.mock_data exclude each other"),
        (lambda r: r.update(embedded=[1]), "section 'embedded' must be a mapping"),
    ],
)
def test_bad_configs_name_the_key(edit, message):
    raw = _tiny_raw()
    edit(raw)
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "cfg.yaml")
    assert str(err.value).startswith("cfg.yaml: ")
    assert message in str(err.value)


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text((CONFIGS / "tiny-cpu.yaml").read_text())
    config = load_config(path, ["training.train_iters=7", "training.lr_warmup_iters=2", "data.mock_data="])
    assert config.get("training", "train_iters") == 7
    assert "mock_data" not in config.sections["data"]
    assert "--mock-data" not in config.megatron_flags()
    stock = load_config(path, ["moe.moe_token_dispatcher_type=alltoall"])
    assert stock.microep_settings() is None
    assert not any(f.startswith("--microep-") for f in stock.megatron_flags())
    for bad, message in [
        ("training.lr", "expected SECTION.KEY=VALUE"),
        ("lr=3", "expected SECTION.KEY=VALUE"),
        ("training.lr=[", "not valid YAML"),
        ("name.x=1", "'name' is not a section"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_config(path, [bad])


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(bad)


def test_embedded_run_lists_megatron_lm_only_keys():
    assert embedded_unsupported(load_config(CONFIGS / "tiny-cpu.yaml")) == []
    unsupported = embedded_unsupported(load_config(CONFIGS / "deepseek-v3.yaml"))
    assert {"model.multi_latent_attention", "training.bf16", "parallel.use_distributed_optimizer"} <= set(unsupported)


def test_launch_args_cli(capsys):
    assert main(["launch-args", "tiny-cpu"]) == 0
    line = capsys.readouterr().out.strip()
    assert shlex.split(line) == load_config(CONFIGS / "tiny-cpu.yaml").megatron_flags()
    assert "--moe-token-dispatcher-type microep" in line and "--microep-redundant-slots 1" in line
    assert main(["launch-args", "deepseek-v3", "--lines", "--set", "training.train_iters=10000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "--moe-layer-freq '([0]*3+[1]*58)'" in lines and "--train-iters 10000" in lines
    assert main(["launch-args", "tiny-cpu", "--set", "model.hidden_sise=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("microep launch-args: error: ") and "did you mean 'hidden_size'" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["launch-args", "tiny-cpu", "--set", "moe.moe_token_dispatcher_type=alltoall"]) == 0
    captured = capsys.readouterr()
    assert "--microep" not in captured.out and "section 'microep' not printed" in captured.err


def test_mtp_num_layers_maps_to_the_megatron_flag(capsys):
    # MTP layers run MicroEP/FSEP experts (glue/spec.py, microep_mtp_block_spec); the entry script
    # refuses --mtp-num-layers before core_r0.19 (tests/launch/test_megatron_lm_mtp.py).
    config = load_config(CONFIGS / "deepseek-v3.yaml", ["model.mtp_num_layers=1"])
    flags = config.megatron_flags()
    assert flags[flags.index("--mtp-num-layers") + 1] == "1"
    assert _parsed_back(config) == _flag_sections(config)
    assert "--mtp-num-layers" not in load_config(CONFIGS / "deepseek-v3.yaml").megatron_flags()
    # The embedded CPU run builds no MTP block: the key is Megatron-LM only there.
    tiny = load_config(CONFIGS / "tiny-cpu.yaml", ["model.mtp_num_layers=2"])
    assert embedded_unsupported(tiny) == ["model.mtp_num_layers"]
    assert main(["launch-args", "tiny-cpu", "--lines", "--set", "model.mtp_num_layers=2"]) == 0
    assert "--mtp-num-layers 2" in capsys.readouterr().out.splitlines()
    for bad, message in [("0", "model.mtp_num_layers: must be >= 1, got 0"), ("one", "expected an integer")]:
        assert main(["launch-args", "tiny-cpu", "--set", f"model.mtp_num_layers={bad}"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
