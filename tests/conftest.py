"""Skips accounted for: with ``MICROEP_EXPECTED_SKIPS=<session>`` (scripts/test.sh sets it per pytest
session) the session fails on a skip that tests/expected_skips.yaml does not list for that session
with a matching reason, on a listed test that ran instead of skipping, and on a listed pattern that
matched no test. CI counts a skip as a pass otherwise, so a regression that turns a test into a skip
would go unseen."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

EXPECTED_SKIPS_FILE = Path(__file__).resolve().parent / "expected_skips.yaml"
SESSION_VARIABLE = "MICROEP_EXPECTED_SKIPS"


def load_expected_skips(session: str, path: Path = EXPECTED_SKIPS_FILE) -> dict[str, str]:
    """``{test id pattern: reason text}`` declared for ``session``; raises pytest.UsageError if the
    session is not declared (every CI session lists its skips, ``{}`` for none)."""
    declared = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if session not in declared:
        raise pytest.UsageError(
            f"{SESSION_VARIABLE}={session}: no such session in {path.name} (declared: {', '.join(declared)})"
        )
    return dict(declared[session] or {})


def matches(nodeid: str, pattern: str) -> bool:
    """``*`` matches any text (brackets are literal, as in parametrised test ids)."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), nodeid) is not None


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)


class SkipAccounting:
    """Collects every test's outcome and every skip (collection included), then checks them against
    the session's expected skips."""

    def __init__(self, session: str, expected: dict[str, str]):
        self.session, self.expected = session, expected
        self.skipped: dict[str, str] = {}  # test or module id -> skip reason
        self.outcomes: dict[str, str] = {}  # test id -> passed / failed / skipped
        self.problems: list[str] = []

    def pytest_collectreport(self, report):
        if report.skipped:
            self.skipped[report.nodeid] = _skip_reason(report)

    def pytest_runtest_logreport(self, report):
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skipped[report.nodeid] = _skip_reason(report)
            self.outcomes[report.nodeid] = "skipped"
        elif report.when == "call" or report.failed:
            self.outcomes.setdefault(report.nodeid, report.outcome)

    def check(self) -> list[str]:
        problems = []
        for nodeid, reason in sorted(self.skipped.items()):
            pattern = next((p for p in self.expected if matches(nodeid, p)), None)
            if pattern is None:
                problems.append(f"unexpected skip: {nodeid} ({reason})")
            elif self.expected[pattern] not in reason:
                problems.append(
                    f"{nodeid} skipped for another reason than expected: {reason!r} "
                    f"(expected one containing {self.expected[pattern]!r})"
                )
        for pattern in self.expected:
            matched = [i for i in set(self.skipped) | set(self.outcomes) if matches(i, pattern)]
            if not matched:
                problems.append(f"expected skip matched no test: {pattern}")
            for nodeid in sorted(i for i in matched if i not in self.skipped):
                problems.append(f"expected to skip but ran ({self.outcomes[nodeid]}): {nodeid}")
        return problems

    def pytest_sessionfinish(self, session):
        self.problems = self.check()
        if self.problems and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if self.problems:
            terminalreporter.section(f"skip accounting ({self.session}): FAILED", sep="=", red=True)
            for line in self.problems:
                terminalreporter.line(line)
            terminalreporter.line(f"the expected skips of each session are listed in tests/{EXPECTED_SKIPS_FILE.name}")
        else:
            terminalreporter.line(
                f"skip accounting ({self.session}): {len(self.skipped)} skips, all expected "
                f"(tests/{EXPECTED_SKIPS_FILE.name})"
            )


def pytest_configure(config):
    session = os.environ.get(SESSION_VARIABLE)
    if session:
        config.pluginmanager.register(SkipAccounting(session, load_expected_skips(session)), "microep-skip-accounting")
