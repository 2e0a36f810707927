"""`microep schedule`: the documented JSON contract and one-line errors with exit code 2."""

import json
import subprocess
import sys

import numpy as np
import pytest

from megatron_microep.cli import main
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.scheduler_reference import lp_min_max_load


def write(path, payload):
    path.write_text(json.dumps(payload))
    return str(path)


def test_contract_on_a_random_instance(tmp_path):
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 50, size=(4, 8))
    replicas = [[e // 2] for e in range(8)]
    replicas[0] += [1, 2]
    replicas[5] += [0]
    out = tmp_path / "out.json"
    instance = write(tmp_path / "in.json", {"num_gpus": 4, "tokens": tokens.tolist(), "replicas": replicas})
    assert main(["schedule", instance, "-o", str(out), "--repeat", "3"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"max_load", "gpu_load", "lower_bound", "remote_tokens", "assignment", "solve_seconds"}
    assert result["max_load"] == lp_min_max_load(tokens, Placement.from_lists(replicas, 4)).optimum
    assigned = np.zeros_like(tokens)
    for s, e, g, n in result["assignment"]:
        assert g in replicas[e]
        assigned[s, e] += n
    np.testing.assert_array_equal(assigned, tokens)
    assert result["solve_seconds"] > 0


@pytest.mark.parametrize(
    "payload,message",
    [
        ({"tokens": [[1]], "replicas": [[0]]}, "missing field 'num_gpus'"),
        ({"num_gpus": 0, "tokens": [[1]], "replicas": [[0]]}, "num_gpus must be a positive integer"),
        ({"num_gpus": 2, "tokens": [[1, 2], [3]], "replicas": [[0], [1]]}, "'tokens[1]' has 1 entries"),
        ({"num_gpus": 1, "tokens": [[1, -2]], "replicas": [[0], [0]]}, "'tokens[0][1]' must be non-negative"),
        ({"num_gpus": 3, "tokens": [[1], [1]], "replicas": [[0]]}, "'tokens' has 2 rows, expected 3"),
        ({"num_gpus": 2, "tokens": [[1, 1], [1, 1]], "replicas": [[0], [1, 1]]}, "two copies on one GPU"),
        ({"num_gpus": 2, "tokens": [[1, 1], [1, 1]], "replicas": [[0], [5]]}, "GPU id 5 outside"),
        (
            {"num_gpus": 2, "tokens": [[1, 1], [1, 1]], "replicas": [[0]]},
            "replicas must list the GPUs of each of the 2",
        ),
    ],
)
def test_bad_instances_exit_2_with_one_line(tmp_path, payload, message):
    instance = write(tmp_path / "bad.json", payload)
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_microep", "schedule", instance, "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_not_json_and_bad_repeat(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{nope")
    assert main(["schedule", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    good = write(tmp_path / "g.json", {"num_gpus": 1, "tokens": [[1]], "replicas": [[0]]})
    assert main(["schedule", good, "-o", str(tmp_path / "o"), "--repeat", "0"]) == 2


def test_unknown_field_is_rejected(tmp_path, capsys):
    instance = write(tmp_path / "i.json", {"num_gpus": 1, "tokens": [[1]], "replicas": [[0]], "replica": []})
    assert main(["schedule", instance, "-o", str(tmp_path / "o")]) == 2
    assert "unknown field 'replica'" in capsys.readouterr().err
