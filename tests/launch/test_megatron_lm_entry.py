"""scripts/pretrain_gpt_microep.py: command-line handling always; against real Megatron-LM checkouts
(the snapshots in ../shared/megatron-lm: core_v0.16.1, core_r0.19.0, main; or MEGATRON_LM_PATH, see
conftest.py): every preset validated by the checkout's own parser; the tiny config's model built by
the checkout's model provider on 4 CPU ranks; and Megatron-LM's own pretrain() on 4 CPU ranks, stopped
after 6 iterations and resumed to 8, against an uninterrupted 8-iteration run."""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHECKOUTS, megatron_lm_env, missing

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "pretrain_gpt_microep.py"
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


def test_cpu_ranks_only_without_a_gpu_or_for_the_model_check(entry):
    assert entry.runs_on_cpu(None, cuda_visible=False)
    assert not entry.runs_on_cpu(None, cuda_visible=True)  # training on GPUs: no harness, no added flags
    assert entry.runs_on_cpu("model", cuda_visible=True)
    assert not entry.runs_on_cpu("args", cuda_visible=False)  # validates as on the presets' GPUs


def test_cpu_argv_adds_gloo_and_turns_fusions_off(entry):
    argv = ["--transformer-impl", "local", "--no-rope-fusion"]
    out = entry.cpu_argv(argv)
    assert out[: len(argv)] == argv
    assert out[len(argv) : len(argv) + 2] == ["--distributed-backend", "gloo"]
    assert out.count("--no-rope-fusion") == 1 and "--no-gradient-accumulation-fusion" in out
    assert entry.cpu_argv([*argv, "--distributed-backend=gloo"]).count("gloo") == 0
    for bad in (
        [],  # Megatron-LM's default is transformer_engine
        ["--transformer-impl", "transformer_engine"],
        [*argv, "--moe-grouped-gemm"],
        [*argv, "--distributed-backend", "nccl"],
    ):
        with pytest.raises(SystemExit) as err:
            entry.cpu_argv(bad)
        assert err.value.code == 2


def test_without_a_checkout_the_error_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEGATRON_LM_PATH")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    # Whether a checkout is importable without those variables (an editable install, as in the
    # Docker image) is asked of Python, not read from the script's exit code under test.
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('pretrain_gpt') is not None)"
    if subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, timeout=60).returncode:
        pytest.skip("a Megatron-LM checkout is importable here; covered by the checkout tests")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--num-layers", "2", "--transformer-impl", "local"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "put a Megatron-LM checkout (core_r0.16 to main, megatron-core 0.20) on PYTHONPATH" in result.stderr


# The presets name real tokenizers and data; the checks use Megatron-LM's own stand-ins.
MOCK_DATA = (
    "data.tokenizer_type=NullTokenizer",
    "data.vocab_size=32000",
    "data.tokenizer_model=",
    "data.mock_data=true",
)


def _flags(name: str, *overrides: str) -> list:
    """``microep launch-args`` of a preset, with ``--set`` overrides."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    out = subprocess.run(
        [sys.executable, "-m", "megatron_microep", "launch-args", "--null", name, *sets],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return out.split("\0")[:-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args: str) -> list:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "4",
        "--master-port",
        str(_free_port()),
        *args,
    ]


def _run(cmd, env, timeout=600):
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.mark.parametrize("name", sorted(PRESET_WORLD))
@pytest.mark.parametrize("checkout", CHECKOUTS)
def test_presets_validate_with_the_checkout(megatron_lm, checkout, name):
    env = megatron_lm_env(
        megatron_lm(checkout), WORLD_SIZE=str(PRESET_WORLD[name]), RANK="0", CUDA_DEVICE_MAX_CONNECTIONS="1"
    )
    result = _run([sys.executable, str(SCRIPT), "--microep-check", "args", *_flags(name, *MOCK_DATA)], env, timeout=300)
    assert "arguments parsed and validated" in result.stdout


@pytest.mark.parametrize("checkout", CHECKOUTS)
def test_tiny_model_builds_and_steps_on_cpu_ranks(megatron_lm, checkout):
    env = megatron_lm_env(megatron_lm(checkout))
    result = _run(_torchrun(str(SCRIPT), "--microep-check", "model", *_flags("tiny-cpu", *MOCK_DATA)), env)
    assert "check: model OK on 4 CPU ranks" in result.stdout
    assert result.stdout.count("with 4 MicroEP / 4 MoE layers") == 4


@pytest.mark.parametrize("checkout", [c for c in CHECKOUTS if c == "main"])  # the flag is new in 0.20
def test_single_grouped_expert_weights_are_rejected_before_training(megatron_lm, checkout):
    env = megatron_lm_env(megatron_lm(checkout), WORLD_SIZE="4", RANK="0")
    grouped = ["--moe-grouped-gemm", "--moe-use-grouped-tensor", "--moe-single-grouped-weight"]
    cmd = [sys.executable, str(SCRIPT), "--microep-check", "args", *_flags("tiny-cpu", *MOCK_DATA), *grouped]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "error: --moe-single-grouped-weight cannot be used with --moe-token-dispatcher-type microep" in (
        result.stderr
    )


# --- Megatron-LM's pretrain() on CPU ranks, stopped and resumed -----------------------------------

STOP, ITERS = 6, 8
# The command of docs/launch.md: the tiny preset as it is, plus the run's own length and outputs.
RUN_FLAGS = ("--save-interval", "4", "--eval-interval", "4", "--eval-iters", "1", "--log-interval", "1")


def _scalars(tensorboard_dir: Path) -> dict:
    """tag -> {step: value} from the TensorBoard event files Megatron-LM wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: {event.step: event.value for event in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]
    }


@pytest.fixture(scope="module", params=CHECKOUTS)
def pretrain_runs(request, megatron_lm, tmp_path_factory):
    """Three launches of the entry script's pretrain() on 4 CPU ranks: ``--train-iters 6`` saving to
    DIR, the same with ``--train-iters 8`` resuming from DIR, and an uninterrupted 8-iteration run."""
    try:
        import tensorboard  # noqa: F401 - read back below; Megatron-LM writes through torch.utils.tensorboard
    except ImportError:
        missing("tensorboard is not installed (pip install -e .[megatron-lm])")
    env = megatron_lm_env(megatron_lm(request.param))
    root = tmp_path_factory.mktemp(f"pretrain-{request.param}")
    flags = [str(SCRIPT), *_flags("tiny-cpu"), *RUN_FLAGS]
    out = {}
    save = ("--save", str(root / "ckpt"), "--load", str(root / "ckpt"))
    for name, iters, extra in (
        ("first", STOP, save),
        # Megatron-LM keeps the checkpoint's scheduler only with this flag when --train-iters changes.
        ("resumed", ITERS, (*save, "--use-checkpoint-opt_param-scheduler")),
        ("uninterrupted", ITERS, ()),
    ):
        tensorboard = root / f"tb-{name}"
        cmd = _torchrun(*flags, "--train-iters", str(iters), "--tensorboard-dir", str(tensorboard), *extra)
        result = _run(cmd, env)
        out[name] = {"stdout": result.stdout, "log": result.stdout + result.stderr, "scalars": _scalars(tensorboard)}
    out["save"] = root / "ckpt"
    return out


def test_pretrain_says_first_that_it_runs_on_cpu(pretrain_runs):
    for run in (pretrain_runs[k] for k in ("first", "resumed", "uninterrupted")):
        first = next(line for line in run["stdout"].splitlines() if line.strip())
        assert first.startswith("pretrain_gpt_microep.py: no GPU visible: Megatron-LM's pretrain() on CPU ranks (gloo)")
        assert "CPU harness:" in run["stdout"]


def test_pretrain_trains_evaluates_and_saves(pretrain_runs):
    first = pretrain_runs["first"]
    losses = first["scalars"]["lm loss"]
    assert sorted(losses) == list(range(1, STOP + 1))
    assert losses[STOP] < losses[1]  # it learns
    assert sorted(first["scalars"]["lm loss validation"]) == [4, STOP]  # eval interval, and at the end
    for line in (
        "iteration        6/       6",
        "validation loss at iteration 4",
        "saving checkpoint at iteration       4",
    ):
        assert line in first["stdout"]
    save = pretrain_runs["save"]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)  # after "resumed"
    assert {p.name for p in save.glob("iter_*")} == {"iter_0000004", "iter_0000006", "iter_0000008"}
    assert any((save / "iter_0000006").glob("*.distcp"))  # torch_dist: Megatron's distributed checkpoint


def test_pretrain_resumes_with_the_uninterrupted_loss_curve(pretrain_runs):
    first, resumed, whole = (pretrain_runs[k]["scalars"] for k in ("first", "resumed", "uninterrupted"))
    assert "at iteration 6" in pretrain_runs["resumed"]["stdout"]  # "successfully loaded checkpoint ..."
    assert sorted(resumed["lm loss"]) == [7, 8]
    stitched = {**first["lm loss"], **resumed["lm loss"]}
    assert stitched == whole["lm loss"], (stitched, whole["lm loss"])
    assert resumed["lm loss validation"][ITERS] == whole["lm loss validation"][ITERS]
    assert {**first["learning-rate"], **resumed["learning-rate"]} == whole["learning-rate"]


def test_pretrain_logs_microep_balance_to_the_log_and_tensorboard(pretrain_runs):
    whole = pretrain_runs["uninterrupted"]
    for layer in range(1, 5):
        assert f"MicroEP layer {layer} step 2: max/mean before" in whole["log"]
        before = whole["scalars"][f"microep/layer{layer}/imbalance_before"]
        after = whole["scalars"][f"microep/layer{layer}/imbalance_after"]
        # Written when a step begins (--log-interval 1), for the steps before it; the layer counts steps
        # as Megatron-LM's args.curr_iteration does (from 0), so the last written is ITERS - 1.
        assert sorted(before) == list(range(1, ITERS))
        assert all(1.0 <= after[s] <= before[s] for s in before)
