"""One layer's routing history, as the runtime and the simulator both keep it.

``LoadHistory`` holds per-step blocks of per-micro-batch expert loads, int64 [micro-batches, E]
each, oldest first, plus the rows of the step in progress. The runtime's placement controller
(``runtime.replan``) records one row per training micro-batch; the simulator's replay
(``planning.policies.base.HistoryWindow``) one per trace record. The planner reads the completed
steps as one matrix (``window``), which ``planning.plan.plan_from_history`` turns into a placement.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class LoadHistory:
    """The last ``steps`` completed steps of one layer's expert loads, each an int64 [rows, E] block.

    ``micro_batches``, when given, also drops the oldest blocks that the last ``micro_batches`` rows
    do not reach (so a window counted in micro-batches keeps whole steps, no more than it needs).
    At least one bound must be given. Memory: O(kept rows * E).
    """

    def __init__(self, num_experts: int, steps: int | None = None, micro_batches: int | None = None):
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if steps is None and micro_batches is None:
            raise ValueError("a load history needs a bound: steps, micro_batches or both")
        for name, bound in (("steps", steps), ("micro_batches", micro_batches)):
            if bound is not None and bound < 1:
                raise ValueError(f"{name} must be >= 1, got {bound}")
        self.num_experts = num_experts
        self.micro_batches = micro_batches
        self._blocks: deque[np.ndarray] = deque(maxlen=steps)
        self._rows: list[np.ndarray] = []

    def record(self, load) -> None:
        """Expert loads int [E] of one micro-batch of the step in progress."""
        row = np.asarray(load, dtype=np.int64)
        if row.shape != (self.num_experts,):
            raise ValueError(f"a load row must have shape [{self.num_experts}], got {list(row.shape)}")
        self._rows.append(row)

    def end_step(self) -> None:
        """Close the step in progress (nothing happens when it recorded no row)."""
        if not self._rows:
            return
        self._blocks.append(np.stack(self._rows))
        self._rows = []
        self._trim()

    def _trim(self) -> None:
        if self.micro_batches is not None:
            while len(self._blocks) > 1 and sum(map(len, self._blocks)) - len(self._blocks[0]) >= self.micro_batches:
                self._blocks.popleft()

    def __len__(self) -> int:
        """Completed steps kept."""
        return len(self._blocks)

    def blocks(self) -> list[np.ndarray]:
        """The completed steps' int64 [rows, E] blocks, oldest first (copies)."""
        return [block.copy() for block in self._blocks]

    def current(self) -> np.ndarray:
        """int64 [n, E]: the rows of the step in progress."""
        return np.stack(self._rows) if self._rows else np.zeros((0, self.num_experts), dtype=np.int64)

    def window(self, micro_batches: int | None = None) -> np.ndarray:
        """int64 [S, E]: the completed steps' rows, oldest first; the last ``micro_batches`` only when given."""
        if not self._blocks:
            return np.zeros((0, self.num_experts), dtype=np.int64)
        rows = np.concatenate(self._blocks)
        return rows if micro_batches is None else rows[len(rows) - min(micro_batches, len(rows)) :]

    def restore(self, blocks, current) -> None:
        """Replace the contents by completed ``blocks`` int [rows, E] (oldest first; the newest that
        fit are kept) and the ``current`` step's rows int [n, E]."""
        blocks = [self._matrix(block) for block in blocks]
        current = self._matrix(current)
        self._blocks.clear()
        self._blocks.extend(blocks)
        self._trim()
        self._rows = list(current)

    def _matrix(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 2 or rows.shape[1] != self.num_experts:
            raise ValueError(f"load rows must have shape [n, {self.num_experts}], got {list(rows.shape)}")
        return rows.copy()
