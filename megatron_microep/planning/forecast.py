"""Forecast samples: what the next micro-batches' expert loads may look like, for the planner to score on.

A placement is used for the micro-batches after the history it was planned on. Scoring plans on the raw
history window has two faults on drifting routing: the window's loads trail the current ones (a
16-micro-batch window is centred about 8 micro-batches in the past), and a plan that balances the
window's few realisations of per-micro-batch noise need not balance the next one. Forecast samples fix
both (the planner scores them together with the window): their level is the mean of the most recent micro-batches, and their noise is each expert's
relative deviation from its local mean in some history micro-batch, drawn independently per expert, so
the planner sees combinations of fluctuations the window never had.

Bursts. A 16-micro-batch window rarely shows an expert's rare spikes, and a placement that balances
every sample perfectly gives the planner nothing to choose between: the tail of max/mean then comes
from single experts that spike to 2-3 times their level in a micro-batch the window did not foresee.
With ``burst`` > 1 every expert also appears in one of the samples (the experts are dealt over the
samples) at its level times the largest error the level rule made in the window (a micro-batch's load
over the mean of the ``recent`` before it, any expert), capped at ``burst``, so the planner must leave
every expert a way out of its GPUs; routing the level rule predicts well gets no replicas for spikes it
never has.
The effect on the simulator's workloads is measured in docs/benchmarks.md ("Planner input").
"""

from __future__ import annotations

import numpy as np

# Half-width of the centred window whose mean is a micro-batch's local level (noise = load / level).
LOCAL_HALF_WIDTH = 2


def check_settings(samples: int, recent: int, burst: float, names=("samples", "recent", "burst")) -> None:
    """Raise ValueError naming the first bad forecast setting; ``names`` are how the caller spells them
    (policy parameters, command-line flags). ``samples`` 0 means the history alone."""
    if samples < 0:
        raise ValueError(f"{names[0]} must be >= 0, got {samples}")
    if recent < 1:
        raise ValueError(f"{names[1]} must be >= 1, got {recent}")
    if burst != 0 and not burst >= 1:
        raise ValueError(f"{names[2]} must be 0 (off) or >= 1, got {burst}")


def forecast_samples(history: np.ndarray, recent: int, count: int, seed: int = 0, burst: float = 0.0) -> np.ndarray:
    """``count`` samples of the next micro-batch's expert loads.

    history int [S, E] (S >= 1, oldest first, non-negative) -> int64 [count, E].
    Sample k, expert e: ``level[e] * noise[s_ke, e]`` rounded, where ``level`` is the mean of the last
    ``min(recent, S)`` rows, ``noise[s, e] = (history[s, e] + 1) / (local[s, e] + 1)`` with ``local`` the
    mean over rows ``s - 2 .. s + 2`` (clipped to the history), and ``s_ke`` uniform over the S rows,
    independent per (k, e). With ``burst`` > 1, expert e's noise in sample ``k_e`` is at least
    ``min(burst, error)``, ``error`` the largest ``(history[s, e] + 1) / (before[s, e] + 1)`` over
    s >= 1 and all e, ``before`` the mean of rows ``max(0, s - recent) .. s - 1`` (1 when S = 1), where ``k_e = position of e in a seeded permutation mod count`` (every
    expert bursts once when count <= E). Deterministic for a given ``seed``, so every rank computes the same samples.
    """
    loads = np.asarray(history)
    if loads.ndim != 2 or loads.shape[0] < 1 or loads.shape[1] < 1:
        raise ValueError(f"history must be a non-empty [samples, experts] matrix, got shape {list(loads.shape)}")
    if loads.dtype.kind not in "iu" or loads.min() < 0:
        raise ValueError("history must hold non-negative integer token counts")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    check_settings(count, recent, burst, ("count", "recent", "burst"))
    loads = loads.astype(np.float64)
    num_samples, num_experts = loads.shape
    level = loads[-recent:].mean(axis=0)
    csum = np.vstack([np.zeros((1, num_experts)), np.cumsum(loads, axis=0)])
    lo = np.maximum(np.arange(num_samples) - LOCAL_HALF_WIDTH, 0)
    hi = np.minimum(np.arange(num_samples) + LOCAL_HALF_WIDTH + 1, num_samples)
    local = (csum[hi] - csum[lo]) / (hi - lo)[:, None]
    noise = (loads + 1.0) / (local + 1.0)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, num_samples, size=(count, num_experts))
    drawn = noise[rows, np.arange(num_experts)]
    if burst > 1:
        bursting = rng.permutation(num_experts)
        sample_of = np.arange(num_experts) % count
        drawn[sample_of, bursting] = np.maximum(
            drawn[sample_of, bursting], min(burst, _forecast_error(loads, csum, recent))
        )
    return np.rint(level * drawn).astype(np.int64)


def _forecast_error(loads, csum, recent):
    """Largest (load + 1) / (level + 1) in the window, level = mean of the up to ``recent`` rows before."""
    if len(loads) < 2:
        return 1.0
    rows = np.arange(1, len(loads))
    start = np.maximum(rows - recent, 0)
    before = (csum[rows] - csum[start]) / (rows - start)[:, None]
    return float(((loads[1:] + 1.0) / (before + 1.0)).max())


def planner_input(history: np.ndarray, samples: int, recent: int, burst: float = 0.0) -> np.ndarray:
    """What the placement planners score plans on: ``history`` int [S, E] followed by ``samples``
    forecast samples (none when ``samples`` is 0) -> int64 [S + samples, E]."""
    history = np.asarray(history)
    if samples == 0:
        return history
    return np.concatenate([history.astype(np.int64), forecast_samples(history, recent, samples, burst=burst)])
