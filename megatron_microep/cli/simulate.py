"""``microep simulate``: replay a routing trace through every balancing policy and write a report."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from megatron_microep.cli import UsageError
from megatron_microep.planning.policies import POLICIES, PolicyError
from megatron_microep.simulator import simulate
from megatron_microep.simulator.cost import CostModel, CostModelError, GemmTable, cost_model_fields
from megatron_microep.simulator.traces import TraceError

NAME = "simulate"
HELP = "Replay a routing trace through balancing policies; write summary.csv, report.md and plots."


def add_arguments(parser) -> None:
    parser.add_argument(
        "trace",
        help="a .mept or .jsonl trace, a Megatron --moe-routing-trace-path or "
        "--save-tokens-per-expert-interval folder, or gen:WORKLOAD[:key=value,...]",
    )
    parser.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help=f"comma-separated, from {', '.join(POLICIES)} (default: all; ideal is always added)",
    )
    parser.add_argument("--redundant-slots", type=int, default=2, help="extra expert copies per GPU (default 2)")
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs per NVLink domain (default: 8 when it divides the GPU count, else one node)",
    )
    parser.add_argument("--report", required=True, help="output folder")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=1,
        help="steps per layer left out of the metrics while no history exists (default 1)",
    )
    parser.add_argument("--num-experts", type=int, default=None, help="experts (needed for Megatron routing traces)")
    parser.add_argument(
        "--megatron-ranks",
        default=None,
        help="comma-separated rank files forming the EP group, in EP order (default: all found)",
    )
    parser.add_argument(
        "--policy-param",
        action="append",
        default=[],
        metavar="POLICY.KEY=VALUE",
        help="a policy parameter, e.g. microep.time_limit_s=0.5 (repeatable)",
    )
    parser.add_argument(
        "--cost",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a cost-model parameter (repeatable): {', '.join(cost_model_fields())}",
    )
    parser.add_argument("--gemm-table", default=None, help="CSV 'tokens,efficiency' replacing the default H100 table")
    parser.add_argument("--save-trace", default=None, help="also write the replayed records (.mept or .jsonl)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _policies(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--policies is empty")
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise UsageError(f"--policies: unknown policy {unknown[0]!r} (known: {', '.join(POLICIES)})")
    return names


def _policy_params(items: list[str], names: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        policy, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise UsageError(f"--policy-param {item!r}: expected POLICY.KEY=VALUE")
        if policy not in POLICIES:
            raise UsageError(f"--policy-param {item!r}: unknown policy {policy!r}")
        if policy not in names and policy != "ideal":
            raise UsageError(f"--policy-param {item!r}: policy {policy!r} is not in --policies")
        out.setdefault(policy, {})[field] = value
    return out


def _cost_model(items: list[str], table: str | None) -> CostModel:
    fields = {f.name: f for f in dataclasses.fields(CostModel)}
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key == "gemm_table":
            raise UsageError(f"--cost {item!r}: expected KEY=VALUE with KEY one of {', '.join(cost_model_fields())}")
        default = fields[key].default
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                values[key] = value.lower() in ("true", "1")
            else:
                values[key] = type(default)(value)
        except ValueError:
            raise UsageError(f"--cost {item!r}: {key} must be a {type(default).__name__}") from None
    try:
        if table is not None:
            values["gemm_table"] = GemmTable.load(table)
        return CostModel(**values)
    except CostModelError as err:
        raise UsageError(str(err)) from None


def _ranks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        ranks = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--megatron-ranks {text!r}: expected comma-separated integers") from None
    if not ranks or len(set(ranks)) != len(ranks) or min(ranks) < 0:
        raise UsageError(f"--megatron-ranks {text!r}: expected distinct non-negative ranks")
    return ranks


def _progress_bar(disabled: bool):
    def make(total):
        from tqdm import tqdm

        bar = tqdm(total=total, unit="rec", desc="simulate", disable=disabled, file=sys.stderr, mininterval=0.5)
        return bar.update

    return make


def run(args) -> int:
    names = _policies(args.policies)
    if args.redundant_slots < 0:
        raise UsageError(f"--redundant-slots must be >= 0, got {args.redundant_slots}")
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        raise UsageError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
    if args.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.num_experts is not None and args.num_experts < 1:
        raise UsageError(f"--num-experts must be >= 1, got {args.num_experts}")
    cost = _cost_model(args.cost, args.gemm_table)
    try:
        out = simulate(
            args.trace,
            names,
            args.redundant_slots,
            args.gpus_per_node,
            Path(args.report),
            cost,
            policy_params=_policy_params(args.policy_param, names),
            warmup_steps=args.warmup_steps,
            num_experts=args.num_experts,
            ranks=_ranks(args.megatron_ranks),
            save_trace=Path(args.save_trace) if args.save_trace else None,
            plots=not args.no_plots,
            progress=_progress_bar(args.no_progress),
        )
    except (TraceError, PolicyError, CostModelError) as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(f"{err.filename or args.trace}: {err.strerror}") from None
    for row in out.rows:
        print(
            f"{row.policy:>10}  max/mean {row.max_over_mean_mean:.3f} (p99 {row.max_over_mean_p99:.3f})  "
            f"step {1e3 * row.modeled_step_time:8.2f} ms  share of ideal {row.share_of_ideal:6.1%}"
        )
    print(
        f"{out.records} records ({out.info.num_gpus} GPUs x {out.info.num_experts} experts) in {out.seconds:.1f} s; "
        f"report in {args.report}/report.md"
    )
    return 0
