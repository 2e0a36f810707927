"""MicroEP's command-line flags for Megatron-LM's argument parser.

Use ``add_microep_args`` as (or inside) the ``extra_args_provider`` of ``pretrain`` (up to 0.17) or
``megatron.training.arguments.parse_and_validate_args`` (0.18 on). It also admits ``microep`` as a
value of ``--moe-token-dispatcher-type``. After parsing, ``validate_microep_args(args)`` checks the
flags against the rest of the job's configuration and returns the settings; layers built later
read the same flags from Megatron's global args.
"""

from __future__ import annotations

import argparse

from megatron_microep.glue.config import (
    DISPATCHER_TYPE,
    EXPERT_BACKENDS,
    EXPERT_SHARDINGS,
    FSEP_MEMORY_POLICIES,
    PLANNERS,
    MicroEPConfig,
    attach_microep_config,
    check_megatron_compatibility,
)

DISPATCHER_FLAG = "--moe-token-dispatcher-type"
_DEFAULTS = MicroEPConfig()


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
    group.add_argument(
        "--microep-redundant-slots",
        type=int,
        default=_DEFAULTS.redundant_slots,
        help="replica slots per EP rank, besides its home experts (R < experts per rank)",
    )
    group.add_argument(
        "--microep-replan-interval",
        type=int,
        default=_DEFAULTS.replan_interval,
        help="re-plan the replica placement every N optimizer steps from the recorded "
        "routing history (0: never; the placement stays stock until then)",
    )
    group.add_argument(
        "--microep-planner",
        choices=PLANNERS,
        default=_DEFAULTS.planner,
        help="placement planner: OR-Tools (exact objective, time-limited) or the EPLB-style greedy",
    )
    group.add_argument(
        "--microep-history-window",
        type=int,
        default=_DEFAULTS.history_window,
        help="optimizer steps of routing history the planner sees",
    )
    group.add_argument(
        "--microep-planner-time-limit-s",
        type=float,
        default=_DEFAULTS.planner_time_limit_s,
        help="wall-clock limit of one planning run (it runs in a background thread)",
    )
    group.add_argument(
        "--microep-replan-lag",
        type=int,
        default=_DEFAULTS.replan_lag,
        help="a plan started at step s takes effect at step s + lag on every rank "
        "(the planner rank waits for the plan if it is late)",
    )
    group.add_argument(
        "--microep-move-penalty",
        type=float,
        default=_DEFAULTS.move_penalty,
        help="planner: tokens of expected max load one moved replica is worth",
    )
    group.add_argument(
        "--microep-forecast-samples",
        type=int,
        default=_DEFAULTS.forecast_samples,
        help="planner: score plans on the history plus this many forecast samples (latest level, "
        "the window's per-expert noise drawn independently; 0: the history alone)",
    )
    group.add_argument(
        "--microep-forecast-recent",
        type=int,
        default=_DEFAULTS.forecast_recent,
        help="planner: the forecast's level is the mean of this many latest micro-batches",
    )
    group.add_argument(
        "--microep-forecast-burst",
        type=float,
        default=_DEFAULTS.forecast_burst,
        help="planner: each expert appears once in the forecast at its level times the largest "
        "error of the forecast level in the window, at most this multiple, so the placement leaves "
        "every expert room for a spike (0: off)",
    )
    group.add_argument(
        "--microep-gpus-per-node",
        type=int,
        default=_DEFAULTS.gpus_per_node,
        help="planner: keep replicas inside their home expert's node of this many EP ranks",
    )
    group.add_argument(
        "--microep-expert-backend",
        choices=EXPERT_BACKENDS,
        default=_DEFAULTS.expert_backend,
        help="expert GEMMs: torch grouped_mm, a per-expert loop, or auto (grouped_mm where it runs)",
    )
    group.add_argument(
        "--microep-trace-dir",
        type=str,
        default=_DEFAULTS.trace_dir,
        help="record per-micro-batch routing counts of every MicroEP layer in the simulator's "
        "native trace format (one routing_rank<R>.mept per writing rank)",
    )
    group.add_argument(
        "--microep-expert-sharding",
        choices=EXPERT_SHARDINGS,
        default=_DEFAULTS.expert_sharding,
        help="none: Megatron's expert storage (replicas are copies of home experts); fsep: every EP "
        "rank stores 1/EP of every expert and gathers the experts of its layout each micro-batch, "
        "re-laid out as often as every step (docs/fsep.md)",
    )
    group.add_argument(
        "--microep-fsep-memory-policy",
        choices=FSEP_MEMORY_POLICIES,
        default=_DEFAULTS.fsep_memory_policy,
        help="fsep: keep the gathered experts until the layer's backward, or free them after the "
        "forward and gather again (recomputing the expert forward) in the backward",
    )
    return parser


def validate_microep_args(args) -> MicroEPConfig | None:
    """Settings from parsed ``args`` when the job uses MicroEP (else None); raises MicroEPConfigError."""
    if getattr(args, "moe_token_dispatcher_type", None) != DISPATCHER_TYPE:
        return None
    settings = MicroEPConfig.from_args(args)
    check_megatron_compatibility(settings, args)
    return settings


def microep_config_from_args(args, config):
    """Attach the job's MicroEP settings to a TransformerConfig (see ``attach_microep_config``)."""
    settings = validate_microep_args(args)
    return config if settings is None else attach_microep_config(config, settings)
