"""scripts/pretrain_gpt_microep.py: command-line handling always; against a real Megatron-LM checkout
when MEGATRON_LM_PATH names one (validation of every preset, and the tiny config's model built by the
checkout's own model provider on 4 CPU ranks, forward and backward)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "pretrain_gpt_microep.py"
CHECKOUT = os.environ.get("MEGATRON_LM_PATH")
PRESET_WORLD = {"tiny-cpu": 4, "mixtral-8x7b": 32, "deepseek-v3": 1024, "qwen3-30b-a3b": 16}


@pytest.fixture(scope="module")
def entry():
    spec = importlib.util.spec_from_file_location("pretrain_gpt_microep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spec_is_added_for_the_microep_dispatcher(entry):
    argv = ["--num-layers", "2", "--moe-token-dispatcher-type", "microep"]
    assert entry.with_microep_spec(argv) == [*argv, "--spec", "megatron_microep.glue.spec", "microep_layer_spec"]
    stock = ["--moe-token-dispatcher-type=alltoall"]
    assert entry.with_microep_spec(stock) == stock
    given = [*argv, "--spec", "megatron_microep.glue.spec", "microep_layer_spec"]
    assert entry.with_microep_spec(given) == given
    with pytest.raises(SystemExit) as err:
        entry.with_microep_spec([*argv, "--spec", "my.specs", "layer"])
    assert err.value.code == 2


def test_check_flag_is_removed_before_megatron_parses(entry):
    assert entry.pop_check_level(["--a", "1", "--microep-check", "model", "--b"]) == (["--a", "1", "--b"], "model")
    assert entry.pop_check_level(["--microep-check=args", "--b"]) == (["--b"], "args")
    assert entry.pop_check_level(["--b"]) == (["--b"], None)
    for bad in (["--microep-check", "all"], ["--microep-check"]):
        with pytest.raises(SystemExit):
            entry.pop_check_level(bad)


def test_megatron_own_parsers_see_a_stock_dispatcher(entry, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x", "--moe-token-dispatcher-type", "microep", "--microep-redundant-slots", "2"])
    with entry.stock_dispatcher_in_argv():
        assert sys.argv == ["x", "--moe-token-dispatcher-type", "alltoall", "--microep-redundant-slots", "2"]
    assert sys.argv[2] == "microep"
    assert entry.replace_option(["--moe-token-dispatcher-type=microep"], "--moe-token-dispatcher-type", "alltoall") == [
        "--moe-token-dispatcher-type=alltoall"
    ]


def test_without_a_checkout_the_error_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEGATRON_LM_PATH")}
    # Whether a checkout is importable without those variables (an editable install, as in the
    # Docker image) is asked of Python, not read from the script's exit code under test.
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('pretrain_gpt') is not None)"
    if subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, timeout=60).returncode:
        pytest.skip("a Megatron-LM checkout is importable here; covered by the checkout tests")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--num-layers", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert (
        "put a Megatron-LM checkout (core_r0.16 to core_r0.19) on PYTHONPATH or set MEGATRON_LM_PATH" in result.stderr
    )


def _flags(name: str) -> list:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_microep",
            "launch-args",
            "--null",
            name,
            "--set",
            "data.tokenizer_type=NullTokenizer",
            "--set",
            "data.vocab_size=32000",
            "--set",
            "data.tokenizer_model=",
            "--set",
            "data.mock_data=true",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return out.split("\0")[:-1]


needs_checkout = pytest.mark.skipif(
    not CHECKOUT, reason="set MEGATRON_LM_PATH to a Megatron-LM checkout (core_r0.16 to core_r0.19) to run"
)


@needs_checkout
@pytest.mark.parametrize("name", sorted(PRESET_WORLD))
def test_presets_validate_with_the_checkout(name):
    env = {**os.environ, "WORLD_SIZE": str(PRESET_WORLD[name]), "RANK": "0", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--microep-check", "args", *_flags(name)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "arguments parsed and validated" in result.stdout


@needs_checkout
def test_tiny_model_builds_and_steps_on_cpu_ranks():
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "4",
            "--master-port",
            "29583",
            str(SCRIPT),
            "--microep-check",
            "model",
            *_flags("tiny-cpu"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "check: model OK on 4 CPU ranks" in result.stdout
    assert result.stdout.count("with 4 MicroEP / 4 MoE layers") == 4
