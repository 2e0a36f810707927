"""``microep plan``: replica placement from a load history (see docs/formats.md, "microep plan")."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from megatron_microep.cli import UsageError
from megatron_microep.planning.planner import plan_placement

NAME = "plan"
HELP = "Plan expert replicas from a load history: OR-Tools + local search on the exact scheduler's max load."

_INT64_MAX = np.iinfo(np.int64).max


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("history", type=Path, help='HISTORY.json: {"num_gpus": G, "loads": [[tokens per expert], ...]}')
    parser.add_argument("--redundant-slots", type=int, required=True, metavar="R", help="extra expert copies per GPU")
    parser.add_argument("--gpus-per-node", type=int, default=None, metavar="N",
                        help="keep each expert's copies inside its home node of N GPUs")
    parser.add_argument("--time-limit", type=float, default=10.0, metavar="S", help="seconds (default 10)")
    parser.add_argument("--move-penalty", type=float, default=0.0, metavar="TOKENS",
                        help="expected max load (tokens) one copy absent from \"current\" is worth (default 0)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="PLACEMENT.json")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_history(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read ({err})") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object with keys \"num_gpus\" and \"loads\"")
    for key in ("num_gpus", "loads"):
        if key not in data:
            raise UsageError(f"{path}: missing key \"{key}\"")
    unknown = sorted(set(data) - {"num_gpus", "loads", "current"})
    if unknown:
        raise UsageError(f"{path}: unknown key \"{unknown[0]}\" (allowed: num_gpus, loads, current)")
    num_gpus = data["num_gpus"]
    if not _is_int(num_gpus) or num_gpus < 1:
        raise UsageError(f"{path}: \"num_gpus\" must be a positive integer, got {num_gpus!r}")
    loads = data["loads"]
    if not isinstance(loads, list) or not loads:
        raise UsageError(f"{path}: \"loads\" must be a non-empty list of samples")
    for s, row in enumerate(loads):
        if not isinstance(row, list) or not row:
            raise UsageError(f"{path}: loads[{s}] must be a non-empty list of tokens per expert")
        if len(row) != len(loads[0]):
            raise UsageError(f"{path}: ragged loads: sample {s} has {len(row)} experts, sample 0 has {len(loads[0])}")
        for e, value in enumerate(row):
            if not _is_int(value):
                raise UsageError(f"{path}: loads[{s}][{e}] must be an integer token count, got {value!r}")
            if not 0 <= value <= _INT64_MAX:
                raise UsageError(f"{path}: loads[{s}][{e}] = {value} is negative or too large")
    current = data.get("current")
    if current is not None:
        if not isinstance(current, list) or not all(
                isinstance(r, list) and r and all(_is_int(g) for g in r) for r in current):
            raise UsageError(f"{path}: \"current\" must be a list of non-empty GPU id lists, one per expert")
    return num_gpus, np.array(loads, dtype=np.int64), current


def run(args: argparse.Namespace) -> int:
    num_gpus, loads, current = _read_history(args.history)
    if args.time_limit <= 0:
        raise UsageError(f"--time-limit must be > 0, got {args.time_limit}")
    try:
        result = plan_placement(loads, num_gpus, args.redundant_slots, gpus_per_node=args.gpus_per_node,
                                time_limit_s=args.time_limit, current=current, move_penalty=args.move_penalty)
    except ValueError as err:  # the planner names the problem (PlacementError is one)
        raise UsageError(str(err)) from None
    out = {
        "num_gpus": num_gpus,
        "redundant_slots": args.redundant_slots,
        "gpus_per_node": args.gpus_per_node,
        "replicas": result.replicas,
        "objective": result.objective,
        "expected_max": result.expected_max,
        "expected_mean": result.expected_mean,
        "max_over_mean": result.max_over_mean,
        "bound": result.bound,
        "gap": result.gap,
        "status": result.status,
        "source": result.source,
        "solver_status": result.solver_status,
        "solver_bound": result.solver_bound,
        "model_complete": bool(result.model_complete),
        "moved_slots": result.moved_slots,
        "solve_seconds": result.solve_seconds,
        "per_sample_max": result.per_sample_max.tolist(),
    }
    try:
        # One key per line, values compact: a 256-expert placement stays readable.
        text = "{\n" + ",\n".join(f" {json.dumps(key)}: {json.dumps(value)}" for key, value in out.items()) + "\n}\n"
        args.output.write_text(text, encoding="utf-8")
    except OSError as err:
        raise UsageError(f"{args.output}: cannot write ({err.strerror})") from None
    print(f"{args.output}: expected max/mean {result.max_over_mean:.4f}, gap {result.gap:.2%} to the proven bound, "
          f"{result.status.lower()}, {result.solve_seconds:.2f} s")
    return 0
