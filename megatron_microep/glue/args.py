"""MicroEP's command-line flags for Megatron-LM's argument parser.

Use ``add_microep_args`` as (or inside) the ``extra_args_provider`` of ``pretrain`` (up to 0.17) or
``megatron.training.arguments.parse_and_validate_args`` (0.18 on). It also admits ``microep`` as a
value of ``--moe-token-dispatcher-type``. The flags are derived from ``megatron_microep.settings``
(name, type, default, choices, help). After parsing, ``validate_microep_args(args)`` checks the
flags against the rest of the job's configuration and returns the settings; layers built later
read the same flags from Megatron's global args.
"""

from __future__ import annotations

import argparse

from megatron_microep.glue.config import (
    DISPATCHER_TYPE,
    MicroEPConfig,
    attach_microep_config,
    check_megatron_compatibility,
)
from megatron_microep.settings import flag_of, settings, value_type

DISPATCHER_FLAG = "--moe-token-dispatcher-type"


def _admit_dispatcher_type(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if DISPATCHER_FLAG in action.option_strings and action.choices is not None:
            if DISPATCHER_TYPE not in action.choices:
                action.choices = list(action.choices) + [DISPATCHER_TYPE]
            return


def add_microep_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the ``--microep-*`` flags (and the ``microep`` dispatcher type); returns ``parser``."""
    _admit_dispatcher_type(parser)
    group = parser.add_argument_group(
        title="microep",
        description="MicroEP: per-micro-batch balancing over replicated experts "
        f"(active with {DISPATCHER_FLAG} {DISPATCHER_TYPE})",
    )
    for f, spec in settings():
        choices = spec.all_choices()
        group.add_argument(
            flag_of(f.name),
            type=value_type(f),
            default=f.default,
            choices=choices or None,
            metavar=None if choices else spec.metavar,
            help=spec.help,
        )
    return parser


def validate_microep_args(args) -> MicroEPConfig | None:
    """Settings from parsed ``args`` when the job uses MicroEP, model-dependent defaults resolved (else
    None); raises MicroEPConfigError."""
    if getattr(args, "moe_token_dispatcher_type", None) != DISPATCHER_TYPE:
        return None
    return check_megatron_compatibility(MicroEPConfig.from_args(args), args)


def microep_config_from_args(args, config):
    """Attach the job's MicroEP settings to a TransformerConfig (see ``attach_microep_config``)."""
    settings = validate_microep_args(args)
    return config if settings is None else attach_microep_config(config, settings)
