"""The embedded training run end to end (``microep train`` as a user runs it, 4 gloo ranks, EP = 4).

Three runs of a 2-layer version of configs/tiny-cpu.yaml, re-planning every 2 steps so replicas
appear within 6 steps:
- ``reference``: 6 steps uninterrupted, with the balance report;
- ``interrupted``: the same, stopped with SIGTERM after step 4 or 5 (checkpoint at the stop step, replicas
  in use), then resumed;
- ``stock``: the same model with Megatron's alltoall dispatcher.
The runs train through Megatron's own stack (``get_forward_backward_func``, ``get_megatron_optimizer``).
The resumed loss curve must equal the uninterrupted one bitwise, the routing trace and metrics must
have no gap or duplicate, MicroEP must train like stock EP, the logged balance figures must be
consistent (two independent counts of the load before scheduling agree; scheduling never raises the
max load; replicas carried tokens), and the report must lead with what the run measured.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_microep.simulator.traces import open_trace

STEPS = 6
LOWERED = "MicroEP's scheduling lowered the busiest EP rank's load in the live run."
COMMON = [
    "--steps",
    str(STEPS),
    "--set",
    "model.num_layers=2",
    "--set",
    "training.log_interval=1",
    "--set",
    "training.save_interval=3",
    "--set",
    "training.eval_interval=6",
    "--set",
    "training.lr_warmup_iters=2",
    "--set",
    "microep.replan_interval=2",
    "--set",
    "microep.replan_lag=1",
    "--set",
    "microep.planner=greedy",
    "--set",
    "microep.history_window=4",
    "--set",
    "embedded.corpus_megabytes=1.0",
    "--set",
    "embedded.validation_fraction=0.15",
]


def _train(out: Path, cache: Path, *extra: str, wait: bool = True):
    cmd = [
        sys.executable,
        "-m",
        "megatron_microep",
        "train",
        "--output",
        str(out),
        "--cache-dir",
        str(cache),
        *COMMON,
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=600)
    return proc.returncode, output


def _metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _losses(out: Path):
    final = sorted((out / "checkpoints").glob("step_*"))[-1]
    return torch.load(final / "rank00000.pt", map_location="cpu", weights_only=False)["losses"]


def _trace_file(path: Path):
    info, records = open_trace(str(path))
    return info, [(r.step, r.micro_batch, r.layer, np.asarray(r.tokens)) for r in records]


def _trace(out: Path):
    return _trace_file(out / "routing" / "trace.mept")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    cache = root / "cache"
    out = {name: root / name for name in ("reference", "interrupted", "stock")}
    result = {"dirs": out}

    result["reference"] = _train(out["reference"], cache, "--set", "embedded.report_policies=[static,microep]")

    proc = _train(out["interrupted"], cache, "--no-report", wait=False)
    metrics = out["interrupted"] / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(r.get("step", 0) >= 4 for r in _metrics(out["interrupted"])):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.1)
    first_output, _ = proc.communicate(timeout=300)
    result["stopped"] = (proc.returncode, first_output)
    result["stop_checkpoints"] = sorted(p.name for p in (out["interrupted"] / "checkpoints").glob("step_*"))
    result["resumed"] = _train(out["interrupted"], cache, "--no-report", "--resume")

    result["stock"] = _train(out["stock"], cache, "--no-report", "--dispatcher", "alltoall")
    return result


def test_runs_complete(runs):
    for name in ("reference", "resumed", "stock"):
        code, output = runs[name]
        assert code == 0, f"{name} failed:\n{output[-3000:]}"
    code, output = runs["stopped"]
    assert code == 130, f"SIGTERM did not stop the run cleanly (exit {code}):\n{output[-3000:]}"
    assert "interrupted after step" in output


def test_resume_continues_the_loss_curve(runs):
    dirs = runs["dirs"]
    stopped_at = int(runs["stop_checkpoints"][-1].split("_")[1])
    assert 4 <= stopped_at < STEPS, f"the run was stopped at step {stopped_at}, not mid-run"
    reference, resumed = _losses(dirs["reference"]), _losses(dirs["interrupted"])
    assert len(resumed) == len(reference) == STEPS
    assert resumed == reference, f"resumed curve differs: {[a - b for a, b in zip(reference, resumed)]}"
    assert reference[-1] < reference[0]
    assert "resumed from" in runs["resumed"][1]
    steps = [r["step"] for r in _metrics(dirs["interrupted"]) if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), f"metrics have a gap or a duplicate: {steps}"


def test_checkpoint_holds_megatron_optimizer_and_controller_state(runs):
    directory = runs["dirs"]["interrupted"] / "checkpoints" / runs["stop_checkpoints"][-1]
    assert json.loads((directory / "manifest.json").read_text())["format"] == 2
    state = torch.load(directory / "rank00000.pt", map_location="cpu", weights_only=False)
    # get_megatron_optimizer: dense and expert parameters in two chained fp32 Adam optimizers.
    assert isinstance(state["optimizer"], list) and len(state["optimizer"]) == 2
    assert all(opt["state"] and "exp_avg" in next(iter(opt["state"].values())) for opt in state["optimizer"])
    controllers = state["placement_controllers"]
    assert sorted(controllers) == [1, 2]
    for controller in controllers.values():
        assert len(controller["placement"]) == 16 and all(copies for copies in controller["placement"])
        assert controller["step"] == state["step"] - 1  # the last step trained
        assert len(controller["history"]) == min(state["step"] - 1, 4)  # history_window steps, completed
        assert all(rows.shape == (2, 16) for rows in controller["history"])  # 2 micro-batches x 16 experts
        assert controller["current_rows"].shape == (2, 16)
    # Replicas were in use at the stop (planned at step 2, adopted at step 3, counting from 0).
    assert any(len(copies) > 1 for c in controllers.values() for copies in c["placement"])


def test_model_line_names_megatron_schedule_and_optimizer(runs):
    for name in ("reference", "stock"):
        assert (
            "Megatron schedule forward_backward_no_pipelining, optimizer FP32Optimizer + FP32Optimizer" in runs[name][1]
        )


def test_routing_trace_has_every_micro_batch_once(runs):
    dirs = runs["dirs"]
    info, reference = _trace(dirs["reference"])
    _, resumed = _trace(dirs["interrupted"])
    assert (info.num_gpus, info.num_experts) == (4, 16)
    expected = [(step, micro, layer) for step in range(STEPS) for micro in range(2) for layer in (1, 2)]
    assert [record[:3] for record in reference] == expected
    assert len(resumed) == len(reference)
    for a, b in zip(reference, resumed):
        assert a[:3] == b[:3] and np.array_equal(a[3], b[3])
    # Each record: 4 ranks x 4 sequences x 128 tokens, each routed to 2 experts.
    assert all(int(t.sum()) == 4 * 4 * 128 * 2 for *_, t in reference)


def test_balance_figures_are_logged_and_consistent(runs):
    rows = [r for r in _metrics(runs["dirs"]["reference"]) if "loss" in r]
    assert len(rows) == STEPS
    replica_rows = 0
    for row in rows:
        assert row["tokens_per_s"] > 0
        for layer, figures in row["layers"].items():
            assert figures["before"] == pytest.approx(figures["telemetry_before"], rel=1e-12), (row["step"], layer)
            assert figures["after"] <= figures["before"] + 1e-12
            if figures["replica_tokens"] > 0:
                replica_rows += 1
                assert figures["replicas"] > 0
    assert replica_rows > 0, "no step ran with replicas carrying tokens"
    assert any(f["after"] < f["before"] for r in rows for f in r["layers"].values())
    output = runs["reference"][1]
    assert "max/mean before->after L1" in output and "tok/s" in output and "validation loss" in output


def test_microep_trains_like_stock_ep(runs):
    micro, stock = _losses(runs["dirs"]["reference"]), _losses(runs["dirs"]["stock"])
    diffs = [abs(a - b) / b for a, b in zip(micro, stock)]
    assert max(diffs) <= 1e-4, f"relative loss differences {diffs}"
    assert "max/mean (stock EP) L1" in runs["stock"][1]
    assert not (runs["dirs"]["stock"] / "report").exists()


def test_balance_report_leads_with_what_the_run_measured(runs):
    out = runs["dirs"]["reference"]
    text = (out / "report" / "report.md").read_text()
    assert text.index(LOWERED) < text.index("## What the run measured")
    assert text.index("## What the run measured") < text.index("## Replay of the recorded routing")
    assert "What it cannot say" in text and "## Projection" in text and "A projection, not a measurement" in text
    # The measured table carries the metrics' own figures: layer 1's mean after scheduling over the
    # intervals with replicas, computed here from metrics.jsonl.
    rows = [r for r in _metrics(out) if "loss" in r and any(f.get("replicas", 0) > 0 for f in r["layers"].values())]
    after = np.mean([r["layers"]["1"]["after"] for r in rows])
    before = np.mean([r["layers"]["1"]["before"] for r in rows])
    assert "| 1 | " in text and f"| {before:.2f} | {after:.2f} |" in text
    # The replay models this run's experts (hidden 128, expert FFN 128, fp32), not DeepSeek-V3's;
    # the projection says it uses those.
    assert "hidden size 128 and FFN width 128 (SwiGLU, fp32)" in text
    assert "hidden size 7168 and FFN width 2048 (SwiGLU, bf16)" in text
    # The microep row replays the run's own settings.
    assert "replan_interval=2" in text and "history_micro_batches=8" in text and "planner=eplb" in text
    # The projection: the same routing at the deepseek-v3 preset's volume per rank and micro-batch
    # (4096 x 1 x top-8 = 32,768 routed pairs; this run 128 x 4 x top-2 = 1,024).
    assert "every count multiplied by 32, so that a rank routes 32,768 (token, expert) pairs" in text
    _, projected = _trace_file(out / "report" / "projection" / "trace.mept")
    _, recorded = _trace(out)
    assert [r[:3] for r in projected] == [r[:3] for r in recorded]
    assert all(np.array_equal(p[3], 32 * r[3]) for p, r in zip(projected, recorded))
    for directory in ("replay", "projection"):
        summary = (out / "report" / directory / "summary.csv").read_text().splitlines()
        assert [line.split(",")[0] for line in summary[1:]] == ["static", "microep", "ideal"]
    assert list((out / "report" / "replay").glob("*.png"))
    output = runs["reference"][1]
    assert LOWERED in output and "balance report (measured figures" in output


def test_report_headline_says_what_the_run_did():
    from megatron_microep.glue.embedded.report import LayerFigures, Measured, headline

    def measured(dispatcher, first_replica_step, before, after):
        layer = LayerFigures(1, 1.8, before, after, 1.7, after, 100.0 if after else None, 0.5)
        return Measured(10, dispatcher, first_replica_step, [layer], 8.0, 7.0, None, 1.0, 1.0)

    stock = headline(measured("alltoall", None, None, None))
    assert "stock Megatron EP (`alltoall` dispatcher)" in stock and "1.80x the mean load" in stock
    idle = headline(measured("microep", None, None, None))
    assert "without replicas" in idle and "lowered" not in idle
    lowered = headline(measured("microep", 4, 1.9, 1.1))
    assert lowered.startswith(f"**{LOWERED}**") and "1.10x the mean load after scheduling, against 1.90x" in lowered
    assert "did not lower" in headline(measured("microep", 4, 1.5, 1.5))


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``microep train ARGS`` for a command that must stop before training."""
    return subprocess.run(
        [sys.executable, "-m", "megatron_microep", "train", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_rejects_what_the_run_cannot_do(tmp_path):
    result = _cli("--config", "deepseek-v3", "--output", str(tmp_path / "x"))
    assert (
        result.returncode == 2 and "cannot honour" in result.stderr and "model.multi_latent_attention" in result.stderr
    )
    result = _cli("--output", str(tmp_path / "empty"), "--resume")
    assert result.returncode == 2 and "no complete checkpoint" in result.stderr
    result = _cli("--steps", "0")
    assert result.returncode == 2 and "--steps must be >= 1" in result.stderr
    result = _cli("--set", "embedded.report_policies=[static,nope]", "--output", str(tmp_path / "y"))
    assert result.returncode == 2 and "unknown policy 'nope'" in result.stderr


def test_resume_refuses_an_incompatible_config(runs):
    out = runs["dirs"]["interrupted"]
    cache = ["--cache-dir", str(out.parent / "cache")]
    result = _cli("--output", str(out), "--resume", *cache, *COMMON, "--set", "model.hidden_size=64")
    assert result.returncode == 2
    assert "checkpoint was written with model = " in result.stderr and "resume with the same config" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = _cli("--output", str(out), *cache, *COMMON)
    assert result.returncode == 2 and "already holds checkpoints: pass --resume" in result.stderr


def test_resume_refuses_a_checkpoint_of_the_old_format(runs, tmp_path):
    """Format 1 held torch's AdamW state, which Megatron's optimizer cannot load: one line, exit 2."""
    out = tmp_path / "old"
    shutil.copytree(runs["dirs"]["interrupted"], out)
    newest = sorted((out / "checkpoints").glob("step_*"))[-1] / "manifest.json"
    newest.write_text(json.dumps({**json.loads(newest.read_text()), "format": 1}))
    cache = ["--cache-dir", str(runs["dirs"]["interrupted"].parent / "cache")]
    result = _cli("--output", str(out), "--resume", *cache, *COMMON)
    assert result.returncode == 2, result.stderr
    assert "checkpoint format 1, this version reads format 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
