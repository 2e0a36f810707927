"""The ``microep`` command: a registry of subcommands, each in its own module.

A subcommand module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
it parses and validates its inputs and calls into planning/runtime/glue, holding no logic of its own.
Bad input raises ``UsageError``, which ``main`` turns into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMAND_MODULES = ("train", "schedule", "plan", "simulate", "launch_args")


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with errors as one line (``microep <command>: error: ...``) and exit code 2, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _load_subcommands():
    return [importlib.import_module(f"{__name__}.{name}") for name in SUBCOMMAND_MODULES]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="microep", description="MicroEP for Megatron MoE: train, schedule, plan, simulate, launch-args."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _load_subcommands():
        sub_parser = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UsageError as err:
        print(f"microep {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
