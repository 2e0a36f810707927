"""``microep schedule``: one exact min-max token assignment for a recorded micro-batch."""

from __future__ import annotations

import statistics
import time

from megatron_microep.cli import UsageError
from megatron_microep.cli.inputs import (
    load_json_object,
    nonnegative_int_matrix,
    only_fields,
    positive_int,
    require,
    write_json,
)
from megatron_microep.planning.placement import Placement, PlacementError
from megatron_microep.planning.scheduler import schedule

NAME = "schedule"
HELP = "Assign one micro-batch's tokens to expert replicas with the minimum possible max GPU load."


def add_arguments(parser) -> None:
    parser.add_argument("instance", help='JSON: {"num_gpus": G, "tokens": [[int]*E]*G, "replicas": [[gpu,...]]*E}')
    parser.add_argument("-o", "--output", required=True, help="where to write the schedule JSON")
    parser.add_argument(
        "--repeat", type=int, default=1, help="solve N times in-process and report the median solve time (default 1)"
    )


def read_instance(path: str) -> tuple:
    instance = load_json_object(path)
    only_fields(instance, ("num_gpus", "tokens", "replicas"), path)
    num_gpus = positive_int(require(instance, "num_gpus", path), f"{path}: num_gpus")
    tokens = nonnegative_int_matrix(require(instance, "tokens", path), "tokens", path, rows=num_gpus)
    replicas = require(instance, "replicas", path)
    if not isinstance(replicas, list) or len(replicas) != tokens.shape[1]:
        raise UsageError(f"{path}: replicas must list the GPUs of each of the {tokens.shape[1]} experts")
    for e, copies in enumerate(replicas):
        if not isinstance(copies, list) or any(isinstance(g, bool) or not isinstance(g, int) for g in copies):
            raise UsageError(f"{path}: replicas[{e}] must be a list of GPU ids")
    try:
        placement = Placement.from_lists(replicas, num_gpus)
    except PlacementError as err:
        raise UsageError(f"{path}: replicas: {err}") from None
    return tokens, placement


def run(args) -> int:
    if args.repeat < 1:
        raise UsageError(f"--repeat must be >= 1, got {args.repeat}")
    tokens, placement = read_instance(args.instance)
    schedule(tokens, placement)  # load the compiled solver before timing
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = schedule(tokens, placement)
        times.append(time.perf_counter() - start)
    write_json(
        args.output,
        {
            "max_load": result.max_load,
            "gpu_load": result.gpu_load.tolist(),
            "lower_bound": result.lower_bound,
            "remote_tokens": result.remote_tokens,
            "assignment": result.assignment(tokens, placement),
            "solve_seconds": statistics.median(times),
        },
    )
    return 0
