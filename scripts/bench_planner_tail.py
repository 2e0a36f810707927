"""Where microep's p99 max/mean on lognormal_drift comes from: placement input versus the loads it meets.

lognormal_drift's expert log-weights are a slow AR(1) drift plus per-micro-batch noise
(``planning.workloads.lognormal_drift``). Here the drift path is fixed and 200 fresh micro-batches are
drawn at steps t..t+3 (what a plan made at step t meets); the planner (R=2, 0.5 s, the simulator's
setting) is given 16 micro-batches drawn from different log-weights:

  at t               the very log-weights it will meet (only the noise realisations differ)
  window t-16..t-1   the history the simulator gives it (drift included)
  at t-8             one lagged level (the middle of that window)
  window t-4..t-1    the latest four levels, four draws each
  window + forecast  the history window plus 32 forecast samples (planning.forecast), no bursts
  window + forecast + bursts   the same with every expert once at 3x its level (the default)

Figures are the exact scheduler's max GPU load / mean over the fresh micro-batches, 4 drift seeds.
Usage: python scripts/bench_planner_tail.py [--seeds N] [--time-limit S]
"""

from __future__ import annotations

import argparse
import platform

import numpy as np

from megatron_microep.planning import workloads
from megatron_microep.planning.forecast import planner_input
from megatron_microep.planning.planner import plan_placement
from megatron_microep.planning.scheduler import optimal_max_load

GPUS, EXPERTS, TOKENS, TOPK, SLOTS = 64, 256, 4096, 8, 2
SIGMA, CORRELATION, NOISE, SOURCE_SIGMA = 0.8, 0.995, 0.25, 0.3  # lognormal_drift's defaults
STEP = 40  # the step planned for, well past the AR(1) start


def draw(rng: np.random.Generator, log_weights: np.ndarray) -> np.ndarray:
    """float [M, E] log-weights -> int64 [M, E] expert loads, as lognormal_drift samples them."""
    weights = np.exp(log_weights + rng.normal(0.0, NOISE, log_weights.shape))
    return workloads.expert_loads(workloads._sample_sequence(rng, weights, GPUS, TOKENS, TOPK, SOURCE_SIGMA))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=0.5)
    args = parser.parse_args()
    ratios: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        drift = workloads._ar1(rng, STEP + 4, EXPERTS, SIGMA, CORRELATION)
        fresh = draw(rng, np.repeat(drift[STEP : STEP + 4], 50, axis=0))
        mean = fresh.sum(axis=1) / GPUS
        window = draw(rng, drift[STEP - 16 : STEP])
        inputs = {
            "at t": draw(rng, np.repeat(drift[STEP : STEP + 1], 16, axis=0)),
            "window t-16..t-1": window,
            "at t-8": draw(rng, np.repeat(drift[STEP - 8 : STEP - 7], 16, axis=0)),
            "window t-4..t-1": draw(rng, np.repeat(drift[STEP - 4 : STEP], 4, axis=0)),
            "window + forecast": planner_input(window, 32, 4),
            "window + forecast + bursts": planner_input(window, 32, 4, burst=3.0),
        }
        for name, history in inputs.items():
            placement = plan_placement(history, GPUS, SLOTS, time_limit_s=args.time_limit).placement
            ratios.setdefault(name, []).extend(optimal_max_load(row, placement) / m for row, m in zip(fresh, mean))
    print(
        f"# planner input vs the loads met: lognormal_drift, G={GPUS} E={EXPERTS} R={SLOTS} top-{TOPK}, "
        f"{args.seeds} seeds x 200 fresh micro-batches, time limit {args.time_limit:g} s; "
        f"{platform.machine()}, Python {platform.python_version()}"
    )
    print("| planner input (16 micro-batches) | mean | p95 | p99 | max |")
    print("|---|---:|---:|---:|---:|")
    for name, values in ratios.items():
        v = np.asarray(values)
        print(f"| {name} | {v.mean():.4f} | {np.percentile(v, 95):.4f} | {np.percentile(v, 99):.4f} | {v.max():.4f} |")


if __name__ == "__main__":
    main()
