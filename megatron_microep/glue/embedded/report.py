"""The balance report of an embedded run (``report/report.md``): what the run measured first, then the
simulator's replay of its recorded routing.

1. **Measured** (``metrics.jsonl``): per MoE layer the busiest EP rank's load over the mean before
   scheduling (stock EP: every token on its expert's home rank, counted from the routers' outputs)
   and after (the MicroEP schedule the layers ran), the tokens replicas carried and the scheduling
   time per micro-batch.
2. **Replay at this run's shapes** (``report/replay/``): the recorded routing through every balancing
   policy, with a cost model of this run's own experts (hidden size, expert FFN width, gating, fp32)
   on H100-class GPUs, and the ``microep`` policy set up as the run's MicroEP layers were
   (``settings.simulator_params``).
3. **Projection** (``report/projection/``): the same routing and settings at production scale,
   labelled as a projection: every recorded count multiplied so that a rank routes as many
   (token, expert) pairs per micro-batch as the ``deepseek-v3`` preset does, on DeepSeek-V3-sized
   experts in bf16 (the simulator's default cost model).

The report says what the modeled figures can and cannot mean at this scale: balance figures do not
depend on the cost model; modeled times of a tiny model on H100s are dominated by fixed costs, and
the planner's measured wall time is charged against modeled steps far shorter than the CPU steps it
really ran behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_microep.glue.config import DISPATCHER_TYPE
from megatron_microep.glue.config_schema import LaunchConfig
from megatron_microep.glue.embedded import TrainError
from megatron_microep.settings import simulator_params

REPLAY_DIR, PROJECTION_DIR = "replay", "projection"
PRODUCTION_PRESET = "deepseek-v3"  # the projection's token volume per rank and micro-batch


@dataclass(frozen=True)
class LayerFigures:
    """One MoE layer's measured balance (means over logged intervals)."""

    layer: int
    before: float  # max/mean before scheduling, whole run
    before_with_replicas: float | None  # the same over the intervals in which replicas were placed
    after_with_replicas: float | None  # max/mean of the MicroEP schedule over those intervals
    last_before: float
    last_after: float | None
    replica_tokens: float | None  # per micro-batch, intervals with replicas
    scheduling_ms: float | None  # per micro-batch, whole run


@dataclass(frozen=True)
class Measured:
    steps: int
    dispatcher: str
    first_replica_step: int | None  # first logged step whose interval had replicas placed
    layers: list[LayerFigures]
    loss_first: float
    loss_last: float
    valid_loss: float | None
    tokens_per_s: float
    s_per_step: float

    def mean(self, name: str) -> float | None:
        values = [getattr(f, name) for f in self.layers if getattr(f, name) is not None]
        return float(np.mean(values)) if values else None


@dataclass(frozen=True)
class Projection:
    output: object  # simulator.SimulationOutput
    scale: int  # every recorded count multiplied by this
    pairs_per_rank: int  # routed (token, expert) pairs per rank and micro-batch of the preset


@dataclass(frozen=True)
class BalanceReport:
    path: Path
    measured: Measured
    replay: object  # simulator.SimulationOutput at this run's shapes
    projection: Projection | None


def report_policies(config: LaunchConfig) -> list[str]:
    from megatron_microep.planning.policies import POLICIES

    names = config.value("embedded", "report_policies")
    if names == ["all"]:
        return list(POLICIES)
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise TrainError(
            f"{config.source}: embedded.report_policies: unknown policy {unknown[0]!r} "
            f"(known: all, {', '.join(POLICIES)})"
        )
    return names


def replayed_microep_params(config: LaunchConfig) -> dict[str, dict]:
    """The simulator's ``microep`` policy set up as the run's MicroEP layers were (re-plan interval,
    history window, planner and its limits), so the report's microep row replays what trained."""
    settings = config.microep_settings()
    if settings is None or settings.replan_interval == 0:
        return {}  # never re-planned in the run: the simulator's defaults show what re-planning would do
    return {"microep": simulator_params(settings, micro_batches_per_step(config))}


def micro_batches_per_step(config: LaunchConfig) -> int:
    """Micro-batches per optimizer step and data-parallel rank (every rank is a data-parallel rank here)."""
    return config.get("training", "global_batch_size") // (
        config.get("training", "micro_batch_size") * config.value("embedded", "processes")
    )


def run_shape_cost_model(config: LaunchConfig):
    """The simulator's cost model with this run's experts: hidden size, expert FFN width, gating, fp32
    weights, activations and gradients, Adam moments as the only extra optimizer state."""
    from megatron_microep.glue.embedded.model import quiet_megatron_warnings, transformer_config
    from megatron_microep.simulator.cost import CostModel

    quiet_megatron_warnings()
    tconfig = transformer_config(config)
    return CostModel(
        hidden_size=tconfig.hidden_size,
        ffn_hidden_size=tconfig.moe_ffn_hidden_size,
        gated=bool(tconfig.gated_linear_unit),
        activation_bytes=4.0,
        param_bytes=4.0,
        grad_bytes=4.0,
        optimizer_bytes_per_param=8.0,
    )


def measured_figures(output_dir: Path, config: LaunchConfig) -> Measured:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    valid = [r["valid_loss"] for r in rows if "valid_loss" in r]
    layer_ids = sorted(int(k) for k in train[0]["layers"])
    with_replicas = [r for r in train if any(f.get("replicas", 0) > 0 for f in r["layers"].values())]

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    layers = []
    for lid in layer_ids:
        key = str(lid)
        layers.append(
            LayerFigures(
                layer=lid,
                before=mean(r["layers"][key]["before"] for r in train),
                before_with_replicas=mean(r["layers"][key]["before"] for r in with_replicas),
                after_with_replicas=mean(r["layers"][key].get("after") for r in with_replicas),
                last_before=train[-1]["layers"][key]["before"],
                last_after=train[-1]["layers"][key].get("after"),
                replica_tokens=mean(r["layers"][key].get("replica_tokens") for r in with_replicas),
                scheduling_ms=mean(r["layers"][key].get("scheduling_ms") for r in train),
            )
        )
    return Measured(
        steps=train[-1]["step"],
        dispatcher=config.dispatcher,
        first_replica_step=with_replicas[0]["step"] if with_replicas else None,
        layers=layers,
        loss_first=train[0]["loss"],
        loss_last=train[-1]["loss"],
        valid_loss=valid[-1] if valid else None,
        tokens_per_s=float(np.mean([r["tokens_per_s"] for r in train])),
        s_per_step=float(np.mean([r["s_per_step"] for r in train])),
    )


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def headline(m: Measured) -> str:
    """One paragraph (Markdown bold aside) that leads the report: what the run's balancing did."""
    if m.dispatcher != DISPATCHER_TYPE:
        return (
            f"This run used stock Megatron EP (`{m.dispatcher}` dispatcher): every token ran on its expert's home "
            f"rank, and the busiest EP rank carried {m.mean('before'):.2f}x the mean load (mean over MoE layers "
            "and logged intervals). Nothing was scheduled; the replay below shows what each policy would have done."
        )
    if m.first_replica_step is None:
        return (
            f"MicroEP ran without replicas in every logged interval (no placement with replicas was adopted in "
            f"{m.steps} steps), so its schedule could not move tokens off their home ranks: max/mean "
            f"{m.mean('before'):.2f} before scheduling."
        )
    before, after = m.mean("before_with_replicas"), m.mean("after_with_replicas")
    verdict = (
        "MicroEP's scheduling lowered the busiest EP rank's load in the live run."
        if after < before
        else "MicroEP's scheduling did not lower the busiest EP rank's load in this run."
    )
    return (
        f"**{verdict}** In the logged intervals with replicas placed (the first ends at step "
        f"{m.first_replica_step}), the busiest EP rank carried {after:.2f}x the mean load after scheduling, against "
        f"{before:.2f}x under stock EP on the same routing (mean over MoE layers and logged intervals); replicas "
        f"carried {sum(f.replica_tokens or 0.0 for f in m.layers):,.0f} routed (token, expert) pairs per "
        f"micro-batch over all layers, and scheduling took {m.mean('scheduling_ms'):.2f} ms per layer and "
        "micro-batch on this CPU."
    )


def _measured_table(m: Measured) -> list[str]:
    lines = [
        "| MoE layer | max/mean before, whole run | before, with replicas | after, with replicas "
        "| last interval before -> after | replica tokens / micro-batch | scheduling ms / micro-batch |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for f in m.layers:
        last = f"{f.last_before:.2f}" + (f" -> {f.last_after:.2f}" if f.last_after is not None else "")
        lines.append(
            f"| {f.layer} | {f.before:.2f} | {_f(f.before_with_replicas)} | {_f(f.after_with_replicas)} | {last} "
            f"| {_f(f.replica_tokens, 0)} | {_f(f.scheduling_ms)} |"
        )
    return lines


def _replay_table(rows) -> list[str]:
    lines = [
        "| policy | max/mean mean | max/mean p99 | remote tokens | modeled MoE time per step, planning excluded "
        "(ms) | planner wall time per re-plan (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        without_planner = r.modeled_step_time - r.parts_per_step.get("planner", 0.0)
        lines.append(
            f"| {r.policy} | {r.max_over_mean_mean:.3f} | {r.max_over_mean_p99:.3f} | {r.remote_share:.1%} "
            f"| {1e3 * without_planner:.3f} | {r.planner_s_per_replan:.2f} |"
        )
    return lines


def _cost_line(cost) -> str:
    dtype = "fp32" if cost.param_bytes == 4 else "bf16"
    glu = "SwiGLU" if cost.gated else "non-gated"
    return (
        f"experts of hidden size {cost.hidden_size} and FFN width {cost.ffn_hidden_size} ({glu}, {dtype}), "
        f"{cost.peak_tflops:g} TFLOP/s peak, {cost.intra_node_gbps:g} GB/s within a node"
    )


def write_markdown(path: Path, config: LaunchConfig, m: Measured, replay, projection) -> None:
    replayed = replayed_microep_params(config)
    replay_ms = {r.policy: r.modeled_step_time - r.parts_per_step.get("planner", 0.0) for r in replay.rows}
    # Four all-to-alls per layer and micro-batch (dispatch and combine, forward and backward).
    latency_s = 4 * run_shape_cost_model(config).a2a_latency_s * len(m.layers) * micro_batches_per_step(config)
    lines = [
        f"# Balance report: `{config.name}`, {m.steps} steps",
        "",
        headline(m),
        "",
        "## What the run measured",
        "",
        f"{replay.info.num_gpus} EP ranks x {replay.info.num_experts} experts; max/mean is the busiest EP "
        "rank's routed (token, expert) pairs over the mean, per micro-batch and layer. *Before* counts every "
        "token on its expert's home rank (stock EP), from the routers' outputs; *after* is the MicroEP schedule "
        "the layer ran (its telemetry). Loss "
        f"{m.loss_first:.3f} -> {m.loss_last:.3f}"
        + (f", validation loss {m.valid_loss:.3f}" if m.valid_loss is not None else "")
        + f"; {m.tokens_per_s:,.0f} tokens/s, {m.s_per_step:.2f} s per step on this machine.",
        "",
        *_measured_table(m),
        "",
        "## Replay of the recorded routing at this run's shapes (modeled)",
        "",
        "Every policy replays the routing this run recorded (`routing/trace.mept`); the `microep` row is set up "
        + (
            f"as the run's MicroEP layers were ({', '.join(f'{k}={v}' for k, v in replayed['microep'].items())})"
            if replayed
            else "with the simulator's defaults (the run did not re-plan)"
        )
        + f". Cost model: {_cost_line(run_shape_cost_model(config))}.",
        "",
        *_replay_table(replay.rows),
        "",
        "**What this can say.** The balance columns (max/mean, remote tokens) depend only on the routing and "
        "each policy's decisions, not on the cost model: they compare the policies on exactly this run's "
        "routing. MicroEP's max/mean here is the replayed schedule; the measured table above is what the live "
        "layers did.",
        "",
        "**What it cannot say.** Modeled times put this run's experts on H100-class GPUs, where a whole step's "
        f"MoE work is modeled at about {1e3 * replay_ms.get('ideal', 0.0):.2f} ms for the force-balanced ideal, "
        f"of which {1e3 * latency_s:.2f} ms is the all-to-alls' fixed launch latency, and each policy's "
        "per-micro-batch decision is charged at the wall time this implementation took on this CPU: at such "
        "sizes the differences between policies' modeled times are not a speed verdict for real models. Planning "
        "runs off "
        "the training thread; the simulator charges its measured wall time (last column, on this CPU) against "
        "the modeled steps between a re-plan and its adoption, which at this scale are far too short to hide "
        f"it, while in this run each step took {m.s_per_step:.2f} s and training waits only for a plan that is "
        "late at its adoption step (MicroEP logs a warning then). The full replay report, whose step times and "
        f"share of ideal include that charge, is [{REPLAY_DIR}/report.md]({REPLAY_DIR}/report.md).",
        "",
    ]
    if projection is not None:
        lines += [
            "## Projection: the same routing at production scale (modeled)",
            "",
            "A projection, not a measurement: this run's routing with every count multiplied by "
            f"{projection.scale}, so that a rank routes {projection.pairs_per_rank:,} (token, expert) pairs per "
            f"micro-batch as the `{PRODUCTION_PRESET}` preset does (sequence x micro-batch x top-k), replayed with "
            f"this run's MicroEP settings and the simulator's production cost model ({_cost_line(projection_cost())}"
            "). The routing's shares are this tiny model's, not a production model's; decision times are still "
            "this CPU's.",
            "",
            *_replay_table(projection.output.rows),
            "",
            f"Full report: [{PROJECTION_DIR}/report.md]({PROJECTION_DIR}/report.md).",
            "",
        ]
    path.write_text("\n".join(lines), encoding="utf-8")


def projection_cost():
    from megatron_microep.simulator.cost import CostModel

    return CostModel()


def routed_pairs_per_rank(config: LaunchConfig) -> int:
    """(token, expert) pairs one rank routes per micro-batch: sequence x micro-batch x top-k."""
    return (
        config.get("model", "seq_length")
        * config.get("training", "micro_batch_size")
        * config.get("moe", "moe_router_topk", 2)
    )


def scaled_trace(source: Path, target: Path, scale: int) -> None:
    """``source`` with every count multiplied by ``scale`` (the same routing shares at another volume)."""
    from megatron_microep.simulator.traces import NativeTraceWriter, open_trace

    info, records = open_trace(str(source))
    meta = {"source": f"{source} x {scale}"}
    with NativeTraceWriter(target, info.num_gpus, info.num_experts, meta=meta) as writer:
        for r in records:
            writer.write(r.step, r.micro_batch, r.layer, scale * np.asarray(r.tokens, dtype=np.int64))


def write_balance_report(output_dir: Path, config: LaunchConfig, projection: bool = True) -> BalanceReport:
    """Write ``report/report.md`` (and the replays under it) for a finished run; see the module docstring."""
    from megatron_microep.simulator import simulate

    report_dir = output_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    measured = measured_figures(output_dir, config)
    settings = config.microep_settings()

    def replay(trace: Path, cost, directory: str, plots: bool):
        return simulate(
            str(trace),
            report_policies(config),
            config.microep_section().redundant_slots,
            settings.gpus_per_node if settings is not None else None,
            report_dir / directory,
            cost,
            policy_params=replayed_microep_params(config),
            warmup_steps=1,
            plots=plots,
            progress=None,
        )

    trace = output_dir / "routing" / "trace.mept"
    at_run_shapes = replay(trace, run_shape_cost_model(config), REPLAY_DIR, plots=True)
    projected = None
    if projection:
        from megatron_microep.glue.config_schema import load_config, preset_path

        pairs = routed_pairs_per_rank(load_config(preset_path(PRODUCTION_PRESET)))
        scale = max(1, round(pairs / routed_pairs_per_rank(config)))
        (report_dir / PROJECTION_DIR).mkdir(parents=True, exist_ok=True)
        scaled = report_dir / PROJECTION_DIR / "trace.mept"
        scaled_trace(trace, scaled, scale)
        projected = Projection(replay(scaled, projection_cost(), PROJECTION_DIR, plots=False), scale, pairs)
    path = report_dir / "report.md"
    write_markdown(path, config, measured, at_run_shapes, projected)
    return BalanceReport(path, measured, at_run_shapes, projected)
