"""Every bad ``microep`` invocation ends in exactly one line on stderr and exit code 2."""

from __future__ import annotations

import json

import pytest

from megatron_microep.cli import main

INSTANCE = {"num_gpus": 2, "tokens": [[1, 2], [3, 4]], "replicas": [[0], [1]]}


@pytest.fixture
def files(tmp_path):
    (tmp_path / "instance.json").write_text(json.dumps(INSTANCE))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "bad.yaml").write_text("model: [\n")
    (tmp_path / "history.json").write_text(json.dumps({"num_gpus": 2, "loads": [[3, 1]]}))
    return tmp_path


CASES = {
    "repeat not an int": (["schedule", "{d}/instance.json", "-o", "{d}/o.json", "--repeat", "abc"], "--repeat"),
    "plan without slots": (["plan", "{d}/history.json", "-o", "{d}/o.json"], "--redundant-slots"),
    "no command": ([], "command"),
    "unknown command": (["bogus"], "bogus"),
    "unknown flag": (["schedule", "{d}/instance.json", "-o", "{d}/o.json", "--frobnicate"], "--frobnicate"),
    "schedule missing file": (["schedule", "{d}/missing.json", "-o", "{d}/o.json"], "missing.json"),
    "schedule non-object": (["schedule", "{d}/list.json", "-o", "{d}/o.json"], "JSON object"),
    "schedule unwritable output": (["schedule", "{d}/instance.json", "-o", "{d}/no/such/dir/o.json"], "cannot write"),
    "empty policies": (["simulate", "gen:bursty", "--policies", "", "--report", "{d}/r"], "--policies"),
    "param for unselected policy": (
        ["simulate", "gen:bursty", "--policies", "static", "--policy-param", "microep.replan_interval=2"]
        + ["--report", "{d}/r"],
        "not in --policies",
    ),
    "bad megatron ranks": (
        ["simulate", "gen:bursty", "--policies", "static", "--megatron-ranks", "a,b", "--report", "{d}/r"],
        "--megatron-ranks",
    ),
    "megatron ranks for a generated trace": (
        ["simulate", "gen:bursty", "--policies", "static", "--megatron-ranks", "0", "--report", "{d}/r"],
        "--megatron-ranks",
    ),
    "negative warm-up": (
        ["simulate", "gen:bursty", "--policies", "static", "--warmup-steps", "-1", "--report", "{d}/r"],
        "--warmup-steps",
    ),
    "train missing config": (["train", "--config", "{d}/missing.yaml", "--output", "{d}/run"], "missing.yaml"),
    "train invalid config": (["train", "--config", "{d}/bad.yaml", "--output", "{d}/run"], "not valid YAML"),
    "launch-args missing config": (["launch-args", "{d}/missing.yaml"], "missing.yaml"),
    "launch-args invalid config": (["launch-args", "{d}/bad.yaml"], "not valid YAML"),
}


@pytest.mark.parametrize("argv, names", CASES.values(), ids=list(CASES))
def test_bad_input_is_one_line_and_exit_2(files, capsys, argv, names):
    argv = [a.format(d=files) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("microep"), captured.err
    assert ": error: " in lines[0] and names in lines[0], lines[0]
    assert captured.out == ""
