"""``microep plan``: replica placement from a load history (see docs/formats.md, "microep plan")."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_microep.cli import UsageError
from megatron_microep.cli.inputs import load_json_object, nonnegative_int_matrix, only_fields, positive_int, require
from megatron_microep.planning.planner import plan_placement

NAME = "plan"
HELP = "Plan expert replicas from a load history: OR-Tools + local search on the exact scheduler's max load."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("history", type=Path, help='HISTORY.json: {"num_gpus": G, "loads": [[tokens per expert], ...]}')
    parser.add_argument("--redundant-slots", type=int, required=True, metavar="R", help="extra expert copies per GPU")
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        metavar="N",
        help="keep each expert's copies inside its home node of N GPUs",
    )
    parser.add_argument("--time-limit", type=float, default=10.0, metavar="S", help="seconds (default 10)")
    parser.add_argument(
        "--move-penalty",
        type=float,
        default=0.0,
        metavar="TOKENS",
        help='expected max load (tokens) one copy absent from "current" is worth (default 0)',
    )
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="PLACEMENT.json")


def _read_history(path: Path):
    where = str(path)
    data = load_json_object(where)
    only_fields(data, ("num_gpus", "loads", "current"), where)
    num_gpus = positive_int(require(data, "num_gpus", where), f"{where}: num_gpus")
    loads = nonnegative_int_matrix(require(data, "loads", where), "loads", where)
    current = data.get("current")
    if current is not None:
        if not isinstance(current, list) or not all(
            isinstance(r, list) and r and all(isinstance(g, int) and not isinstance(g, bool) for g in r)
            for r in current
        ):
            raise UsageError(f'{where}: "current" must be a list of non-empty GPU id lists, one per expert')
    return num_gpus, loads, current


def run(args: argparse.Namespace) -> int:
    num_gpus, loads, current = _read_history(args.history)
    if args.time_limit <= 0:
        raise UsageError(f"--time-limit must be > 0, got {args.time_limit}")
    try:
        result = plan_placement(
            loads,
            num_gpus,
            args.redundant_slots,
            gpus_per_node=args.gpus_per_node,
            time_limit_s=args.time_limit,
            current=current,
            move_penalty=args.move_penalty,
        )
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
    print(
        f"{args.output}: expected max/mean {result.max_over_mean:.4f}, gap {result.gap:.2%} to the proven bound, "
        f"{result.status.lower()}, {result.solve_seconds:.2f} s"
    )
    return 0
