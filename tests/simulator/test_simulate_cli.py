"""``microep simulate`` end to end on every input kind, and its one-line errors."""

from __future__ import annotations

import csv
import json

import matplotlib.image
import numpy as np
import pytest

from megatron_microep.cli import main
from megatron_microep.planning.policies import POLICIES
from megatron_microep.simulator.report import SUMMARY_COLUMNS
from megatron_microep.simulator.traces import open_trace

GEN = "gen:lognormal_drift:gpus=8,experts=16,layers=2,micro_batches=8,tokens=512,topk=2"
QUICK = ["--policy-param", "microep.time_limit_s=0.1", "--no-progress"]


def summary(folder):
    with open(folder / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and tuple(rows[0]) == SUMMARY_COLUMNS
    return {r["policy"]: r for r in rows}


def test_generated_trace_full_report(tmp_path, capsys):
    out = tmp_path / "rep"
    assert (
        main(
            [
                "simulate",
                GEN,
                "--report",
                str(out),
                "--gpus-per-node",
                "4",
                *QUICK,
                "--save-trace",
                str(tmp_path / "saved.mept"),
            ]
        )
        == 0
    )
    rows = summary(out)
    assert set(rows) == set(POLICIES)
    assert float(rows["ideal"]["share_of_ideal"]) == pytest.approx(1.0)
    assert float(rows["static"]["max_over_mean_mean"]) > float(rows["microep"]["max_over_mean_mean"])
    report = (out / "report.md").read_text()
    assert "| microep |" in report and "share of ideal" in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "heatmap_layer0.png",
        "heatmap_layer1.png",
        "max_over_mean_over_time.png",
        "step_time.png",
        "traffic.png",
    ]
    for name in pngs:
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert f"]({name})" in report
    assert "records (8 GPUs x 16 experts)" in capsys.readouterr().out
    # The saved native trace replays to the same figures (the policies are deterministic, timings aside).
    again = tmp_path / "rep2"
    assert (
        main(
            [
                "simulate",
                str(tmp_path / "saved.mept"),
                "--report",
                str(again),
                "--gpus-per-node",
                "4",
                "--no-plots",
                *QUICK,
            ]
        )
        == 0
    )
    for name in ("static", "eplb", "laer", "ultraep", "balancemoe"):
        for col in ("max_over_mean_mean", "max_over_mean_p99", "remote_tokens"):
            assert summary(again)[name][col] == rows[name][col]


def test_jsonl_trace_and_policy_subset(tmp_path):
    _, it = open_trace(GEN)
    with open(tmp_path / "t.jsonl", "w") as f:
        for r in it:
            f.write(
                json.dumps(
                    {"step": r.step, "micro_batch": r.micro_batch, "layer": r.layer, "tokens": r.tokens.tolist()}
                )
                + "\n"
            )
    out = tmp_path / "rep"
    assert (
        main(
            [
                "simulate",
                str(tmp_path / "t.jsonl"),
                "--policies",
                "static,ultraep",
                "--report",
                str(out),
                "--redundant-slots",
                "1",
                "--no-plots",
                "--no-progress",
            ]
        )
        == 0
    )
    assert set(summary(out)) == {"static", "ultraep", "ideal"}


def test_megatron_inputs(tmp_path):
    rng = np.random.default_rng(0)
    rt = tmp_path / "routing"
    rt.mkdir()
    tpe = tmp_path / "ckpt" / "tokens_per_expert"
    tpe.mkdir(parents=True)
    for rank in range(4):
        with open(rt / f"router_trace_rank{rank}.jsonl", "w") as f:
            for step in range(3):
                for _ in range(2):  # two micro-batches per step
                    for layer in (1, 2):
                        ids = np.stack(
                            [rng.choice(8, 2, replace=False, p=np.r_[0.5, [0.5 / 7] * 7]) for _ in range(64)]
                        )
                        f.write(
                            json.dumps(
                                {
                                    "step": step,
                                    "stage": "pre_dispatch",
                                    "block": "decoder",
                                    "layer": layer,
                                    "rank": rank,
                                    "num_tokens": 64,
                                    "topk": 2,
                                    "top_indices": ids.tolist(),
                                }
                            )
                            + "\n"
                        )
        with open(tpe / f"rank{rank}.jsonl", "w") as f:
            for it in (1, 2, 3):
                for layer in (1, 2):
                    f.write(
                        json.dumps(
                            {
                                "iter": it,
                                "block": "decoder",
                                "layer": layer,
                                "tpe": rng.integers(0, 300, size=(2, 2)).tolist(),
                            }
                        )
                        + "\n"
                    )
    out = tmp_path / "rep_rt"
    assert main(["simulate", str(rt), "--num-experts", "8", "--report", str(out), "--no-plots", *QUICK]) == 0
    assert float(summary(out)["static"]["max_over_mean_mean"]) > 1.2
    out = tmp_path / "rep_tpe"
    assert main(["simulate", str(tmp_path / "ckpt"), "--report", str(out), "--no-plots", *QUICK]) == 0
    assert "Per-source counts are not in this trace" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["gen:nope"], "unknown workload 'nope'"),
        ([GEN, "--policies", "static,magic"], "unknown policy 'magic'"),
        ([GEN, "--policy-param", "llep.lamda=2"], "unknown parameter 'lamda'"),
        ([GEN, "--policy-param", "static"], "expected POLICY.KEY=VALUE"),
        ([GEN, "--cost", "inter_node_gbps=fast"], "inter_node_gbps must be a float"),
        ([GEN, "--cost", "warp=9"], "expected KEY=VALUE with KEY one of"),
        ([GEN, "--gpus-per-node", "3"], "gpus_per_node=3 must be >= 1 and divide num_gpus=8"),
        ([GEN, "--redundant-slots", "-1"], "--redundant-slots must be >= 0"),
        ([GEN, "--warmup-steps", "9"], "no records left to measure"),
        (["/no/such/trace.jsonl"], "no such file or directory"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, args, message):
    assert main(["simulate", *args, "--report", str(tmp_path / "r"), "--no-plots", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("microep simulate: error:") and message in err and "\n" not in err


def test_malformed_jsonl_names_record_and_field(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"step": 0, "micro_batch": 0, "layer": 0, "tokens": [[1, 2], [3, 4]]}\n'
        '{"step": 0, "micro_batch": 1, "layer": 0, "tokens": [[1, 2], [3, "x"]]}\n'
    )
    assert main(["simulate", str(path), "--report", str(tmp_path / "r"), "--no-plots", "--no-progress"]) == 2
    assert "t.jsonl: line 2: field 'tokens[1][1]' must be an integer, got 'x'" in capsys.readouterr().err
