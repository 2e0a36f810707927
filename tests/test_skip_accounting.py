"""The skip accounting of tests/conftest.py, run as CI runs it: a pytest session in a subprocess with
``MICROEP_EXPECTED_SKIPS`` set, on a small test tree with this conftest and its own expected-skips file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).resolve().parent
TREE = {
    "test_a.py": (
        "import pytest\n"
        "def test_runs():\n    pass\n"
        "@pytest.mark.skipif(True, reason='needs a CUDA device')\n"
        "@pytest.mark.parametrize('n', [1, 2])\n"
        "def test_gpu(n):\n    pass\n"
        "def test_maybe():\n    import os\n"
        "    if os.environ.get('SKIP_MAYBE'):\n        pytest.skip('probe says no')\n"
    ),
    "test_b.py": "import pytest\npytest.importorskip('no_such_module_anywhere')\ndef test_x():\n    pass\n",
}
EXPECTED = {
    "test_a.py::test_gpu[*]": "needs a CUDA device",
    "test_b.py": "no_such_module_anywhere",
}


def _session(tmp_path: Path, expected: dict, session: str | None = "ci", **env) -> tuple[int, str]:
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "expected_skips.yaml").write_text(yaml.safe_dump({"ci": expected}))
    for name, text in TREE.items():
        (tmp_path / name).write_text(text)
    environment = {k: v for k, v in os.environ.items() if k not in ("MICROEP_EXPECTED_SKIPS", "SKIP_MAYBE")}
    environment.update(env)
    if session is not None:
        environment["MICROEP_EXPECTED_SKIPS"] = session
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


def test_expected_skips_pass(tmp_path):
    code, output = _session(tmp_path, EXPECTED)
    assert code == 0, output
    assert "3 skips, all expected" in output


@pytest.mark.parametrize(
    "expected, env, message",
    [
        (EXPECTED, {"SKIP_MAYBE": "1"}, "unexpected skip: test_a.py::test_maybe (Skipped: probe says no)"),
        (
            {**EXPECTED, "test_a.py::test_gpu[*]": "transformer_engine"},
            {},
            "test_a.py::test_gpu[1] skipped for another reason than expected",
        ),
        (
            {**EXPECTED, "test_a.py::test_runs": "anything"},
            {},
            "expected to skip but ran (passed): test_a.py::test_runs",
        ),
        ({**EXPECTED, "test_gone.py::*": "anything"}, {}, "expected skip matched no test: test_gone.py::*"),
    ],
    ids=["unlisted skip", "other reason", "listed test ran", "pattern matched nothing"],
)
def test_the_session_fails(tmp_path, expected, env, message):
    code, output = _session(tmp_path, expected, **env)
    assert code == 1, output
    assert message in output


def test_an_undeclared_session_is_a_usage_error(tmp_path):
    code, output = _session(tmp_path, EXPECTED, session="nightly")
    assert code == pytest.ExitCode.USAGE_ERROR, output
    assert "MICROEP_EXPECTED_SKIPS=nightly: no such session" in output


def test_without_the_variable_skips_are_not_checked(tmp_path):
    code, output = _session(tmp_path, {}, session=None, SKIP_MAYBE="1")
    assert code == 0, output


def test_every_session_of_scripts_test_sh_declares_its_skips():
    script = (TESTS.parent / "scripts" / "test.sh").read_text(encoding="utf-8")
    labels = re.findall(r'^\s*run_pytest\s+\S+\s+"([^"]+)"', script, flags=re.MULTILINE)
    declared = yaml.safe_load((TESTS / "expected_skips.yaml").read_text(encoding="utf-8"))
    assert labels, "scripts/test.sh runs no pytest session through run_pytest"
    missing = [label for label in labels if label not in declared]
    assert not missing, f"sessions without expected skips in tests/expected_skips.yaml: {missing}"
