"""Validation of JSON inputs for the CLI: each failure is a UsageError naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from megatron_microep.cli import UsageError
from megatron_microep.validation import count_matrix


def load_json_object(path: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path}: expected a JSON object at the top level")
    return value


def require(obj: dict, key: str, where: str) -> Any:
    if key not in obj:
        raise UsageError(f"{where}: missing field '{key}'")
    return obj[key]


def only_fields(obj: dict, allowed: tuple[str, ...], where: str) -> None:
    """Reject unknown fields: a misspelt optional field must not be silently ignored."""
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise UsageError(f"{where}: unknown field '{unknown[0]}' (allowed: {', '.join(allowed)})")


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return value


def nonnegative_int_matrix(value: Any, name: str, where: str, rows: int | None = None) -> np.ndarray:
    """A JSON list of equal-length lists of non-negative integers -> int64 [rows, cols]."""
    try:
        return count_matrix(value, name, rows)
    except ValueError as err:
        raise UsageError(f"{where}: {err}") from None


def write_json(path: str, payload: dict) -> None:
    try:
        Path(path).write_text(json.dumps(payload) + "\n", encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror}") from None
