"""``microep train``: the embedded CPU training run (a small MoE GPT, EP over gloo ranks) and its balance report."""

from __future__ import annotations

import time
from pathlib import Path

from megatron_microep.cli import UsageError
from megatron_microep.glue.config_schema import ConfigError, load_config, preset_path

NAME = "train"
HELP = (
    "Train a small MoE GPT with MicroEP on CPU ranks (gloo) on Python standard-library source; "
    "log loss, tokens/s and per-layer balance; write a balance report comparing the policies."
)
DEFAULT_CONFIG = "tiny-cpu"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"a YAML launch config or a preset name from configs/ (default {DEFAULT_CONFIG})",
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides training.train_iters)")
    parser.add_argument("--output", default=None, help="output directory (default runs/<config name>-<dispatcher>)")
    parser.add_argument(
        "--dispatcher",
        choices=("microep", "alltoall", "allgather"),
        default=None,
        help="override moe.moe_token_dispatcher_type (alltoall: stock Megatron EP, for comparison)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (YAML syntax), e.g. microep.redundant_slots=2",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    parser.add_argument("--no-report", action="store_true", help="skip the balance report at the end")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where the tokenized corpus is cached (default $MICROEP_CACHE_DIR or ~/.cache/megatron-microep)",
    )


def run(args) -> int:
    from megatron_microep.glue.embedded import TrainError
    from megatron_microep.glue.embedded.report import headline
    from megatron_microep.glue.embedded.run import run as run_training

    overrides = list(args.set)
    if args.steps is not None:
        if args.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {args.steps}")
        overrides.append(f"training.train_iters={args.steps}")
    if args.dispatcher is not None:
        overrides.append(f"moe.moe_token_dispatcher_type={args.dispatcher}")
    try:
        config = load_config(preset_path(args.config), overrides)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    output = Path(args.output or f"runs/{config.name}-{config.dispatcher}")
    started = time.perf_counter()
    try:
        result = run_training(config, output, resume=args.resume, cache_dir=args.cache_dir, report=not args.no_report)
    except TrainError as err:
        raise UsageError(str(err)) from None
    if result.get("rank", 0) != 0:
        return 0  # one rank of a torchrun launch: rank 0 reports
    minutes = (time.perf_counter() - started) / 60
    losses = result["losses"]
    if result["status"] != "completed":
        print(
            f"interrupted after step {result['step']} ({minutes:.1f} min); continue with: microep train "
            f"--config {args.config} --output {output} --resume"
        )
        return 130
    print(
        f"trained {len(losses)} steps in {minutes:.1f} min: loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
        f"log {output / 'train.log'}, checkpoints {output / 'checkpoints'}"
    )
    report = result["report"]
    if report is not None:
        print(headline(report.measured))
        print(
            "recorded routing replayed through the balancing policies (busiest EP rank / mean, per micro-batch and layer):"
        )
        for row in report.replay.rows:
            print(
                f"{row.policy:>12}  max/mean {row.max_over_mean_mean:.3f} (p99 {row.max_over_mean_p99:.3f})  "
                f"remote tokens {row.remote_share:6.1%}"
            )
        print(f"balance report (measured figures, modeled replay and what it can say): {report.path}")
    return 0
