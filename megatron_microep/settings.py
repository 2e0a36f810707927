"""MicroEP's settings, each declared once: name, type, default, range, help and simulator counterpart.

``MicroEPConfig`` is the one declaration. Each field's metadata (``setting(...)``) is read by
everything that presents or checks a setting, so none of them repeats a name, default or range:

- ``MicroEPConfig.validate`` (types, ranges, choices, then the rules that relate settings);
- the Megatron-LM flags ``--microep-<field with dashes>`` (``glue/args.py``);
- the ``microep`` section of the YAML launch configs (``glue/config_schema.py``);
- the flag table in docs/dispatcher.md (``settings_table``; a test keeps the file equal to it);
- the simulator's ``microep`` policy parameters a run's settings replay as (``simulator_params``).

This module is pure Python (no torch, no Megatron), so every room may import it. Choices that a
runtime registry owns (expert backends, FSEP memory policies) are named by that registry's import
path and read when first needed.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DISPATCHER_TYPE = "microep"


class MicroEPConfigError(ValueError):
    """An invalid MicroEP setting or an unsupported combination with Megatron's settings."""


@dataclass(frozen=True)
class Setting:
    """How one ``MicroEPConfig`` field is presented and checked (the field's ``metadata["setting"]``)."""

    help: str
    minimum: float | None = None  # inclusive lower bound
    off: float | None = None  # a value outside the range that switches the feature off
    above: float | None = None  # exclusive lower bound
    choices: tuple[str, ...] = ()
    registry: str | None = None  # "module:NAME" of a dict whose keys are further choices
    metavar: str | None = None
    # The simulator's ``microep`` parameter this setting replays as (None: the simulator has none).
    simulator: str | None = None
    # Shown instead of the default in the docs table ("auto": None is resolved per model, see the help).
    default_label: str | None = None

    def all_choices(self) -> tuple[str, ...]:
        if self.registry is None:
            return self.choices
        module, name = self.registry.split(":")
        return self.choices + tuple(getattr(importlib.import_module(module), name))


def setting(default: Any, help: str, **kwargs: Any) -> Any:
    """A ``MicroEPConfig`` field: its default and its ``Setting``."""
    return field(default=default, metadata={"setting": Setting(help, **kwargs)})


@dataclass(frozen=True)
class MicroEPConfig:
    """Per-layer MicroEP settings; each field is the flag ``--microep-<field with dashes>``."""

    redundant_slots: int | None = setting(
        None,
        "replica slots per EP rank besides its home experts; R < experts per EP rank; R > 0 needs EP > 1 "
        "(auto: min(2, experts per EP rank - 1) with EP > 1, else 0; 0 under FSEP, whose layout moves "
        "experts itself; 0: stock Megatron EP)",
        minimum=0,
        metavar="R",
        default_label="auto",
    )
    replan_interval: int | None = setting(
        None,
        "re-plan the replica placement every N optimizer steps from the recorded routing history "
        "(0: never, the placement stays stock; needs R >= 1 unless experts are FSEP-sharded; auto: 1 "
        "when there is something to place, else 0: replicas are refreshed every step anyway, so a "
        "new placement moves no more bytes)",
        minimum=0,
        metavar="N",
        simulator="replan_interval",
        default_label="auto",
    )
    planner: str = setting(
        "ortools",
        "placement planner: OR-Tools (exact objective, time-limited) or the EPLB-style greedy",
        choices=("ortools", "greedy"),
        simulator="planner",
    )
    history_window: int = setting(
        50,
        "optimizer steps of routing history the planner sees",
        minimum=1,
        metavar="S",
        simulator="history_micro_batches",
    )
    planner_time_limit_s: float = setting(
        0.5,
        "wall-clock limit of one planning run, at most (planning runs in a planner process, and the limit is "
        "fitted to the step time, docs/dispatcher.md); the default lets a plan started in one step be adopted "
        "in the next of any production step time",
        above=0,
        metavar="T",
        simulator="time_limit_s",
    )
    replan_lag: int = setting(
        1,
        "a plan started at step s takes effect at step s + L on every rank (a late plan is waited for)",
        minimum=1,
        metavar="L",
    )
    move_penalty: float = setting(
        0.0,
        "planner: tokens of expected max load one moved replica is worth",
        minimum=0,
        metavar="P",
        simulator="move_penalty",
    )
    forecast_samples: int = setting(
        32,
        "planner: score plans on the history plus N forecast samples (planning/forecast.py; 0: the history alone)",
        minimum=0,
        metavar="N",
        simulator="forecast_samples",
    )
    forecast_recent: int = setting(
        4,
        "planner: the forecast's level is the mean of the N latest micro-batches",
        minimum=1,
        metavar="N",
        simulator="forecast_recent",
    )
    forecast_burst: float = setting(
        3.0,
        "planner: every expert appears once in the forecast at its level times the largest error of the "
        "forecast level in the window (load over the mean of the N micro-batches before it), at most B, so the "
        "placement leaves each expert room for a spike (0: off)",
        minimum=1,
        off=0,
        metavar="B",
        simulator="forecast_burst",
    )
    gpus_per_node: int | None = setting(
        None,
        "planner: keep replicas inside their home expert's node of K EP ranks (none: anywhere, the default: "
        "confining them to nodes cost 7-17 points of modeled share of ideal on the drifting workloads of "
        "docs/benchmarks.md, replica upkeep included)",
        minimum=1,
        metavar="K",
        simulator="node_confined",
    )
    burst_slots: int = setting(
        0,
        "burst slots per EP rank and layer: temporary expert copies chosen every micro-batch from its own "
        "counts by the scheduler's certificate (planning/burst.py), weights pushed from the home rank when a "
        "step first needs them, reused by its later micro-batches, gradients returned once per step with the "
        "replicas'; inside the expert's home node (--microep-gpus-per-node EP ranks when set, else the "
        "launcher's node); memory: D "
        "experts' weights plus their fp32 gradients per layer at most (0: off, the default, so enabling it is "
        "a deliberate memory choice; the simulator's burst tables use 2, docs/benchmarks.md); with "
        "--microep-expert-sharding fsep: copies on any rank, gathered from every rank's shards for their "
        "micro-batch only (one extra all-to-all when any is chosen), gradients returned as shards with the "
        "layout's (docs/fsep.md)",
        minimum=0,
        metavar="D",
        simulator="burst_slots",
    )
    burst_tolerance: float = setting(
        1.02,
        "add burst copies only while the micro-batch's max EP-rank load is above this times the mean (>= 1; "
        "at 1.02 the decision time of every benchmarked micro-batch met its 100 us budget at EP 64, "
        "at 1.00 not, docs/benchmarks.md)",
        minimum=1,
        metavar="X",
        simulator="burst_tolerance",
    )
    expert_backend: str = setting(
        "auto",
        "expert GEMMs: TransformerEngine grouped GEMM, torch grouped_mm, a per-expert loop, or auto "
        "(the first that runs, docs/dispatcher.md)",
        choices=("auto",),
        registry="megatron_microep.runtime.experts:EXPERT_BACKENDS",
    )
    trace_dir: str | None = setting(
        None,
        "record every training micro-batch's routing counts per layer ([G, E]) in the simulator's native "
        "trace format, DIR/routing_rank<R>.mept, one file per writing rank (rank 0 of each expert domain)",
        metavar="DIR",
    )
    expert_sharding: str = setting(
        "none",
        "none: Megatron's expert storage (replicas are copies of home experts); fsep: every EP rank stores 1/EP "
        "of every expert and gathers the experts of its layout each micro-batch (docs/fsep.md)",
        choices=("none", "fsep"),
    )
    fsep_memory_policy: str = setting(
        "keep",
        "fsep: keep the gathered experts until the layer's backward, or free them after the forward and "
        "gather again (recomputing the expert forward) in the backward",
        registry="megatron_microep.runtime.fsep:MEMORY_POLICIES",
    )

    def validate(self) -> MicroEPConfig:
        """Checks that need no Megatron settings; returns self. Errors name the flag."""
        for f, spec in settings():
            _check(flag_of(f.name), getattr(self, f.name), f, spec)
        # Under FSEP a re-plan also moves the experts' own copies, so it needs no replica slot.
        if self.replan_interval and self.redundant_slots == 0 and self.expert_sharding == "none":
            raise MicroEPConfigError(
                f"{flag_of('replan_interval')} > 0 needs {flag_of('redundant_slots')} >= 1 (nothing to place)"
            )
        return self

    def for_model(self, num_experts: int, ep_size: int) -> MicroEPConfig:
        """These settings with the model-dependent defaults (``auto``, held as None) resolved for
        ``num_experts`` experts over ``ep_size`` EP ranks (``gpus_per_node`` needs the ranks' places
        and is resolved where the layer's groups are known). Validated."""
        slots = self.redundant_slots
        if slots is None:
            per_rank = num_experts // ep_size
            slots = min(2, per_rank - 1) if ep_size > 1 and self.expert_sharding == "none" else 0
        interval = self.replan_interval
        if interval is None:
            interval = 1 if slots > 0 or (self.expert_sharding != "none" and ep_size > 1) else 0
        return dataclasses.replace(self, redundant_slots=slots, replan_interval=interval).validate()

    @classmethod
    def from_args(cls, args) -> MicroEPConfig:
        """From an argparse namespace carrying the ``microep_*`` attributes of ``add_microep_args``."""
        missing = [f.name for f, _ in settings() if not hasattr(args, f"microep_{f.name}")]
        if missing:
            raise MicroEPConfigError(
                f"arguments lack {flag_of(missing[0])}: register the flags with "
                "megatron_microep.glue.args.add_microep_args (extra_args_provider)"
            )
        return cls(**{f.name: getattr(args, f"microep_{f.name}") for f, _ in settings()}).validate()


def settings() -> list[tuple[dataclasses.Field, Setting]]:
    """Every ``MicroEPConfig`` field with its ``Setting``, in declaration order."""
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(MicroEPConfig)]


def flag_of(name: str) -> str:
    """``redundant_slots`` -> ``--microep-redundant-slots``."""
    return "--microep-" + name.replace("_", "-")


def value_type(f: dataclasses.Field) -> type:
    """The field's value type without ``| None`` (``from __future__`` annotations are strings)."""
    return {"int": int, "float": float, "str": str}[str(f.type).removesuffix(" | None")]


def is_optional(f: dataclasses.Field) -> bool:
    return str(f.type).endswith(" | None")


def _check(name: str, value: Any, f: dataclasses.Field, spec: Setting) -> None:
    kind = value_type(f)
    if value is None:
        if is_optional(f):
            return
        raise MicroEPConfigError(f"{name} must be set, got None")
    # bool is an int to Python, never a count; an int is a valid float.
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise MicroEPConfigError(f"{name} must be {kind.__name__}, got {value!r}")
    if spec.off is not None and value == spec.off:
        return
    if spec.minimum is not None and value < spec.minimum:
        off = "" if spec.off is None else f"{_number(spec.off)} (off) or "
        raise MicroEPConfigError(f"{name} must be {off}>= {_number(spec.minimum)}, got {value}")
    if spec.above is not None and value <= spec.above:
        raise MicroEPConfigError(f"{name} must be > {_number(spec.above)}, got {value}")
    choices = spec.all_choices()
    if choices and value not in choices:
        raise MicroEPConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _number(value: float) -> str:
    return f"{value:g}"


# --- the simulator's counterpart ----------------------------------------------------------------

# Settings whose simulator parameter takes a converted value: (setting value, micro-batches per step) -> value.
_TO_SIMULATOR: dict[str, Callable[[Any, int], Any]] = {
    "planner": lambda value, _: {"ortools": "ortools", "greedy": "eplb"}[value],
    "history_window": lambda steps, micro_batches_per_step: steps * micro_batches_per_step,
    # auto re-plans every step where there is something to place (the simulator's microep always has).
    "replan_interval": lambda value, _: 1 if value is None else value,
    # The node size itself is the replay's layout (``simulate(gpus_per_node=...)``); K confines replicas to nodes.
    "gpus_per_node": lambda value, _: value is not None,
}
# Settings whose simulator value depends on the micro-batches per step, so their default has no fixed counterpart.
_PER_MICRO_BATCH = {"history_window"}


def simulator_params(config: MicroEPConfig, micro_batches_per_step: int) -> dict[str, Any]:
    """The simulator ``microep`` parameters that replay ``config`` (``Setting.simulator`` names them)."""
    out = {}
    for f, spec in settings():
        if spec.simulator is not None:
            value = getattr(config, f.name)
            convert = _TO_SIMULATOR.get(f.name)
            out[spec.simulator] = convert(value, micro_batches_per_step) if convert else value
    return out


def simulator_defaults() -> dict[str, Any]:
    """The simulator ``microep`` parameters the settings' defaults replay as (all but those that
    depend on the micro-batches per step): the simulator's own defaults for them."""
    out = {}
    for f, spec in settings():
        if spec.simulator is not None and f.name not in _PER_MICRO_BATCH:
            convert = _TO_SIMULATOR.get(f.name)
            out[spec.simulator] = convert(f.default, 0) if convert else f.default
    return out


# --- the docs table -----------------------------------------------------------------------------


def settings_table() -> str:
    """The Markdown flag table of docs/dispatcher.md (between its ``settings-table`` markers)."""
    rows = [
        "| flag | default | meaning |",
        "|---|---|---|",
        f"| `--moe-token-dispatcher-type {DISPATCHER_TYPE}` | | select MicroEP |",
    ]
    for f, spec in settings():
        choices = spec.all_choices()
        arg = "{" + ",".join(choices) + "}" if choices else (spec.metavar or f.name.upper())
        default = spec.default_label or (
            "none" if f.default is None else _number(f.default) if isinstance(f.default, float) else f.default
        )
        rows.append(f"| `{flag_of(f.name)} {arg}` | {default} | {spec.help} |")
    return "\n".join(rows) + "\n"
