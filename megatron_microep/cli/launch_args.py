"""``microep launch-args CONFIG``: print the Megatron-LM flags a YAML launch config stands for."""

from __future__ import annotations

import shlex
import sys

from megatron_microep.cli import UsageError
from megatron_microep.glue.config_schema import ConfigError, load_config, preset_path

NAME = "launch-args"
HELP = "Validate a configs/*.yaml launch config and print its Megatron-LM command-line flags."


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a YAML file, or a preset name from configs/ (tiny-cpu, mixtral-8x7b, ...)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one value (YAML syntax; 'KEY=' removes it), e.g. training.train_iters=50",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--lines", action="store_true", help="one flag (with its values) per line, shell-quoted")
    output.add_argument(
        "--null",
        action="store_true",
        help="every argument NUL-terminated, unquoted, for scripts: "
        "mapfile -d '' ARGS < <(microep launch-args --null CONFIG)",
    )


def _grouped(flags: list[str]) -> list[list[str]]:
    groups: list[list[str]] = []
    for item in flags:
        if item.startswith("--") or not groups:
            groups.append([item])
        else:
            groups[-1].append(item)
    return groups


def run(args) -> int:
    try:
        config = load_config(preset_path(args.config), args.set)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    flags = config.megatron_flags()
    if config.microep_settings() is None and config.sections.get("microep"):
        print(
            f"launch-args: section 'microep' not printed: moe.moe_token_dispatcher_type is {config.dispatcher}",
            file=sys.stderr,
        )
    if args.null:
        sys.stdout.write("".join(f"{item}\0" for item in flags))
    elif args.lines:
        print("\n".join(shlex.join(group) for group in _grouped(flags)))
    else:
        print(shlex.join(flags))
    return 0
