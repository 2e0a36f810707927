"""Trace simulator: replay routing traces through every balancing policy and model the step time.

``simulate(...)`` is the one entry point (the ``microep simulate`` command calls it): open a trace,
build the policies, stream the records through the engine, write the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_microep.planning.policies import POLICIES, Layout, make_policy
from megatron_microep.simulator.cost import CostModel
from megatron_microep.simulator.engine import Simulation
from megatron_microep.simulator.report import Summary, write_report
from megatron_microep.simulator.traces import NativeTraceWriter, TraceInfo, TraceRecord, open_trace

REFERENCE_POLICY = "ideal"


@dataclass(frozen=True)
class SimulationOutput:
    info: TraceInfo
    layout: Layout
    rows: list[Summary]
    records: int
    measured_records: int
    seconds: float


def save_while_streaming(records: Iterator[TraceRecord], path: Path, info: TraceInfo) -> Iterator[TraceRecord]:
    """Yield ``records`` unchanged while appending them to ``path`` (``.jsonl``: JSON Lines; else native)."""
    if path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for r in records:
                f.write(
                    json.dumps(
                        {
                            "step": r.step,
                            "micro_batch": r.micro_batch,
                            "layer": r.layer,
                            "tokens": np.asarray(r.tokens).tolist(),
                        }
                    )
                    + "\n"
                )
                yield r
        return
    with NativeTraceWriter(path, info.num_gpus, info.num_experts, meta={"source": info.description}) as writer:
        for r in records:
            writer.write(r.step, r.micro_batch, r.layer, r.tokens)
            yield r


def resolve_policy_params(names: list[str], user: dict[str, dict], cost: CostModel) -> dict[str, dict]:
    """Per policy: the cost-model-derived parameters of cost-aware policies, overridden by the user's."""
    derived = cost.policy_cost_params()
    return {name: {**derived.get(name, {}), **user.get(name, {})} for name in names}


def simulate(
    trace: str,
    policies: list[str],
    redundant_slots: int,
    gpus_per_node: int | None,
    report_dir: Path,
    cost: CostModel,
    *,
    policy_params: dict[str, dict] | None = None,
    warmup_steps: int = 1,
    num_experts: int | None = None,
    ranks: list[int] | None = None,
    save_trace: Path | None = None,
    plots: bool = True,
    progress: Callable[[int | None], Callable[[int], None]] | None = None,
) -> SimulationOutput:
    """Replay ``trace`` through ``policies`` (``ideal`` is always added as the reference) and write the
    report into ``report_dir``. ``gpus_per_node=None`` picks 8 when it divides the GPU count, else one
    node. ``progress(total)`` returns a per-record callback (``total`` is None when unknown)."""
    started = time.perf_counter()
    info, records = open_trace(trace, num_experts=num_experts, ranks=ranks)
    if gpus_per_node is None:
        gpus_per_node = 8 if info.num_gpus % 8 == 0 else info.num_gpus
    layout = Layout(info.num_gpus, info.num_experts, redundant_slots, gpus_per_node)
    names = list(dict.fromkeys(list(policies) + [REFERENCE_POLICY]))
    params = resolve_policy_params(names, policy_params or {}, cost)
    built = [make_policy(name, layout, **params[name]) for name in names]
    if save_trace is not None:
        records = save_while_streaming(records, save_trace, info)
    total = None
    if info.kind == "generated":
        total = info.meta["layers"] * info.meta["micro_batches"]
    engine = Simulation(layout, built, cost, warmup_steps)
    results = engine.run(records, progress(total) if progress else None)
    shown = {p.name: {f: getattr(p.params, f) for f in p.params.__dataclass_fields__} for p in built}
    rows = write_report(
        report_dir,
        results,
        info,
        layout,
        cost,
        warmup_steps,
        engine.measured_records,
        engine.records,
        shown,
        plots=plots,
    )
    return SimulationOutput(info, layout, rows, engine.records, engine.measured_records, time.perf_counter() - started)


__all__ = ["POLICIES", "SimulationOutput", "simulate", "save_while_streaming", "resolve_policy_params"]
