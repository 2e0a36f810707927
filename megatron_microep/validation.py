"""Validation of JSON-decoded count matrices, shared by the CLI inputs and the trace readers.

Errors are ValueError whose message names the field and the first bad entry; callers prefix where
the value came from (a file, a record) and re-raise as their own error type.
"""

from __future__ import annotations

import numpy as np


def count_matrix(value, name: str, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    """A JSON [[int]] of non-negative counts -> int64 [rows, cols]."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"field '{name}' must be a non-empty list of lists")
    if rows is not None and len(value) != rows:
        raise ValueError(f"field '{name}' has {len(value)} rows, expected {rows}")
    width = cols
    for i, row in enumerate(value):
        if not isinstance(row, list):
            raise ValueError(f"field '{name}[{i}]' must be a list")
        if width is None:
            width = len(row)
        if len(row) != width or width == 0:
            raise ValueError(f"field '{name}[{i}]' has {len(row)} entries, expected {width or 'at least 1'}")
    try:
        arr = np.array(value, dtype=np.int64)
        exact = all(type(x) is int for row in value for x in row)  # noqa: E721 (bool and float are not counts)
    except (TypeError, ValueError, OverflowError):
        exact = False
    if not exact:
        for i, row in enumerate(value):
            for j, x in enumerate(row):
                if type(x) is not int:  # noqa: E721
                    raise ValueError(f"field '{name}[{i}][{j}]' must be an integer, got {x!r}")
        raise ValueError(f"field '{name}' holds an integer out of range")
    if arr.min() < 0:
        i, j = np.argwhere(arr < 0)[0]
        raise ValueError(f"field '{name}[{i}][{j}]' must be non-negative, got {int(arr[i, j])}")
    return arr
