"""The streaming replay engine: one pass over a trace, every policy side by side.

Layers are independent (each has its own history and, per policy, its own placement), so records
may come in any order that is chronological within each layer: (step, micro-batch) must increase
for a layer. At the first record of a new step for a layer, the previous step is closed (replica
refresh and gradient return charged, the history's step sum completed) and every re-planning policy
whose interval has come re-plans that layer from the history so far. A policy's ``assign`` sees only
the current micro-batch; ``place`` sees only the past.

Memory is bounded by the history windows (a few [G, E] arrays per layer), the per-record scalar
series (a few floats per record and policy) and the downsampled heatmaps (``HEATMAP_ROWS`` rows of
[G] per layer and policy).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from megatron_microep.planning.placement import Placement
from megatron_microep.planning.policies import HistoryWindow, Layout, Policy, PolicyError, traffic
from megatron_microep.simulator.cost import CostModel, home_moves, record_cost, replica_sync
from megatron_microep.simulator.traces import TraceError, TraceRecord

HEATMAP_ROWS = 96


class Downsampler:
    """Keeps at most ``2 * rows`` rows of a stream of [G] vectors: when full, adjacent rows are averaged
    and later rows are binned twice as wide, so memory stays bounded and rows stay evenly spaced."""

    def __init__(self, rows: int = HEATMAP_ROWS):
        self.rows = rows
        self.width = 1  # records per kept row
        self.kept: list[np.ndarray] = []
        self._pending: np.ndarray | None = None
        self._count = 0

    def add(self, row: np.ndarray) -> None:
        row = np.asarray(row, dtype=np.float64)
        self._pending = row.copy() if self._pending is None else self._pending + row
        self._count += 1
        if self._count == self.width:
            self.kept.append((self._pending / self._count).astype(np.float32))
            self._pending, self._count = None, 0
            if len(self.kept) >= 2 * self.rows:
                self.kept = [(a + b) / 2 for a, b in zip(self.kept[0::2], self.kept[1::2])]
                self.width *= 2

    def array(self) -> np.ndarray:
        rows = list(self.kept)
        if self._pending is not None:
            rows.append((self._pending / self._count).astype(np.float32))
        return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


@dataclass
class PolicyResult:
    """Everything the report needs about one policy over the whole trace."""

    name: str
    replan_interval: int = 1
    ratios: list[float] = field(default_factory=list)  # max/mean GPU load per measured record
    series: dict[int, list[tuple[int, int, float]]] = field(default_factory=dict)  # layer -> (step, mb, ratio)
    heatmaps: dict[int, Downsampler] = field(default_factory=dict)  # layer -> GPU load / mean
    remote_tokens: int = 0
    inter_node_tokens: int = 0
    total_tokens: int = 0
    weight_bytes: float = 0.0
    replica_bytes: dict[int, float] = field(default_factory=dict)  # every step: replica refresh + gradient return
    step_seconds: dict[int, float] = field(default_factory=dict)  # every step, warm-up included
    measured_steps: set[int] = field(default_factory=set)
    planner_seconds: dict[int, float] = field(default_factory=dict)  # step planned for -> slowest layer's seconds
    planner_total_seconds: float = 0.0
    decision_seconds: float = 0.0
    decisions: int = 0
    replans: int = 0
    parts: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("compute", "a2a", "weight_moves", "fsep", "decision", "replica_sync", "home_moves", "planner"), 0.0
        )
    )

    def exposed_planner(self, step: int) -> float:
        """Planner time not hidden by the steps it ran during: a plan used from step k runs during the
        ``replan_interval`` steps before k; layers are planned in parallel (one layer per rank's CPU),
        so a step waits for its slowest layer's plan."""
        window = sum(self.step_seconds.get(step - 1 - i, 0.0) for i in range(max(self.replan_interval, 1)))
        return max(0.0, self.planner_seconds.get(step, 0.0) - window)

    def step_times(self) -> dict[int, float]:
        """Modeled seconds of every measured step, exposed planner time included."""
        return {s: self.step_seconds[s] + self.exposed_planner(s) for s in sorted(self.measured_steps)}


@dataclass
class _PolicyLayerState:
    placement: Placement
    steps_since_plan: int = 0
    pairs: list[np.ndarray] = field(default_factory=list)  # expert * G + gpu of replicas used this step
    held: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))  # step copies (expert, gpu)
    first_fwd: float | None = None
    last_bwd: float = 0.0


@dataclass
class _LayerState:
    history: HistoryWindow
    policies: list[_PolicyLayerState]
    step: int
    micro_batch: int
    first_step: int


class Simulation:
    """Replay records through ``policies`` under ``cost``; call ``run(records)`` once."""

    def __init__(self, layout: Layout, policies: list[Policy], cost: CostModel, warmup_steps: int = 1):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.layout = layout
        self.policies = policies
        self.cost = cost
        self.warmup_steps = warmup_steps
        self.results = [PolicyResult(p.name, p.replan_interval) for p in policies]
        self._layers: dict[int, _LayerState] = {}
        mbs = max(p.history_needs()[0] for p in policies)
        steps = max(p.history_needs()[1] for p in policies)
        self._window = (max(mbs, 1), max(steps, 1))
        self.records = 0
        self.measured_records = 0

    # --- public ------------------------------------------------------------------------------
    def run(self, records: Iterable[TraceRecord], progress: Callable[[int], None] | None = None) -> list[PolicyResult]:
        for record in records:
            self._feed(record)
            if progress is not None:
                progress(1)
        for layer in self._layers:
            self._close_step(layer)
        if self.measured_records == 0:
            raise TraceError(
                "no records left to measure after the warm-up steps "
                f"(trace has {self.records} records; lower --warmup-steps)"
            )
        return self.results

    # --- internals ---------------------------------------------------------------------------
    def _measured(self, state: _LayerState) -> bool:
        return state.step >= state.first_step + self.warmup_steps

    def _feed(self, record: TraceRecord) -> None:
        lay = self.layout
        tokens = record.tokens
        if tokens.shape != (lay.num_gpus, lay.num_experts):
            raise TraceError(
                f"record {self.records} (step {record.step}, layer {record.layer}): tokens shape "
                f"{list(tokens.shape)}, expected [{lay.num_gpus}, {lay.num_experts}]"
            )
        state = self._layers.get(record.layer)
        if state is None:
            state = _LayerState(
                HistoryWindow(lay.num_gpus, lay.num_experts, *self._window),
                [_PolicyLayerState(p.initial_placement()) for p in self.policies],
                record.step,
                record.micro_batch,
                record.step,
            )
            self._layers[record.layer] = state
        elif (record.step, record.micro_batch) <= (state.step, state.micro_batch):
            raise TraceError(
                f"record {self.records}: (step {record.step}, micro_batch {record.micro_batch}) of layer "
                f"{record.layer} does not come after (step {state.step}, micro_batch {state.micro_batch}); "
                "records must be chronological within each layer"
            )
        elif record.step != state.step:
            self._close_step(record.layer)
            state.step = record.step
            self._replan(record.layer, record.step)
        state.micro_batch = record.micro_batch
        self.records += 1
        measured = self._measured(state)
        if measured:
            self.measured_records += 1
        mean = tokens.sum() / lay.num_gpus
        for policy, result, ps in zip(self.policies, self.results, state.policies):
            self._assign(policy, result, ps, record, measured, mean)
        state.history.push(tokens)

    def _assign(
        self,
        policy: Policy,
        result: PolicyResult,
        ps: _PolicyLayerState,
        record: TraceRecord,
        measured: bool,
        mean: float,
    ) -> None:
        lay = self.layout
        # The thread's CPU time: what the decision costs on a host core of its own, without the
        # preemption by other processes that wall time on a shared machine would add.
        started = time.thread_time()
        a = policy.assign_in_step(record.tokens, ps.placement, ps.held)
        decision = time.thread_time() - started if policy.decides_per_micro_batch else 0.0
        load = a.gpu_load()
        if int(load.sum()) != int(record.tokens.sum()) or int(a.tokens.sum()) != int(record.tokens.sum()):
            raise PolicyError(
                f"{policy.name}: assignment of step {record.step}, layer {record.layer} does not conserve tokens"
            )
        # Step copies not held by the previous micro-batch of the step are pushed from their home now.
        step_codes = a.step_copies[:, 0] * lay.num_gpus + a.step_copies[:, 1]
        new = a.step_copies[~np.isin(step_codes, ps.held[:, 0] * lay.num_gpus + ps.held[:, 1])]
        pushes = np.stack([ps.placement.gpus[ps.placement.ptr[new[:, 0]]], new[:, 1]], axis=1)
        ps.held = a.step_copies
        if policy.keeps_assign_placement:
            ps.placement = a.placement
        if not (policy.temporary_copies or policy.fully_sharded or policy.weightless):
            counts = a.placement.replica_counts()
            is_replica = np.ones(a.placement.num_slots, dtype=bool)
            is_replica[a.placement.ptr[:-1]] = False
            expert = np.repeat(np.arange(lay.num_experts), counts)
            replicas = expert[is_replica] * lay.num_gpus + a.placement.gpus[is_replica]
            ps.pairs.append(replicas[~np.isin(replicas, step_codes)])
        flow = traffic(a, lay.node_size)
        rc = record_cost(
            self.cost,
            a,
            flow,
            lay.node_size,
            temporary_copies=policy.temporary_copies,
            fully_sharded=policy.fully_sharded,
            decision_s=decision,
            step_pushes=pushes,
        )
        if ps.first_fwd is None:
            ps.first_fwd = rc.compute_fwd_s
        ps.last_bwd = rc.compute_s - rc.compute_fwd_s
        result.step_seconds[record.step] = result.step_seconds.get(record.step, 0.0) + rc.total_s
        if not measured:
            return
        result.measured_steps.add(record.step)
        ratio = float(load.max()) / mean if mean > 0 else 1.0
        result.ratios.append(ratio)
        result.series.setdefault(record.layer, []).append((record.step, record.micro_batch, ratio))
        result.heatmaps.setdefault(record.layer, Downsampler()).add(load / mean if mean > 0 else load)
        result.remote_tokens += rc.remote_tokens
        result.inter_node_tokens += rc.inter_node_tokens
        result.total_tokens += int(record.tokens.sum())
        result.weight_bytes += rc.weight_bytes
        if policy.decides_per_micro_batch:
            result.decision_seconds += decision
            result.decisions += 1
        for part, value in (
            ("compute", rc.compute_s),
            ("a2a", rc.a2a_s),
            ("weight_moves", rc.weight_move_s),
            ("fsep", rc.fsep_exposed_s),
            ("decision", rc.decision_s),
        ):
            result.parts[part] += value

    def _close_step(self, layer: int) -> None:
        """Charge the finished step's replica refresh and gradient return; complete the history step."""
        lay = self.layout
        state = self._layers[layer]
        measured = self._measured(state)
        for _policy, result, ps in zip(self.policies, self.results, state.policies):
            if ps.pairs or len(ps.held):
                # Replicas are refreshed and return gradients; the step's burst copies only return gradients.
                replicas = np.unique(np.concatenate(ps.pairs)) if ps.pairs else np.zeros(0, dtype=np.int64)
                codes = np.concatenate([replicas, ps.held[:, 0] * lay.num_gpus + ps.held[:, 1]])
                refreshed = np.arange(len(codes)) < len(replicas)
                expert, gpu = np.divmod(codes, lay.num_gpus)
                home = ps.placement.gpus[ps.placement.ptr[:-1]]
                seconds, nbytes = replica_sync(
                    self.cost,
                    home[expert],
                    gpu,
                    lay.num_gpus,
                    lay.node_size,
                    ps.first_fwd or 0.0,
                    ps.last_bwd,
                    refreshed,
                )
                result.step_seconds[state.step] = result.step_seconds.get(state.step, 0.0) + seconds
                result.replica_bytes[state.step] = result.replica_bytes.get(state.step, 0.0) + nbytes
                if measured:
                    result.weight_bytes += nbytes
                    result.parts["replica_sync"] += seconds
            ps.pairs = []
            ps.held = np.zeros((0, 2), dtype=np.int64)
            ps.first_fwd = None
        state.history.end_step()

    def _replan(self, layer: int, step: int) -> None:
        lay = self.layout
        state = self._layers[layer]
        measured = self._measured(state)
        history = state.history.view()
        for policy, result, ps in zip(self.policies, self.results, state.policies):
            if not policy.replans:
                continue
            ps.steps_since_plan += 1
            if ps.steps_since_plan < policy.replan_interval or state.history.empty:
                continue
            ps.steps_since_plan = 0
            started = time.perf_counter()
            new = policy.place(history, ps.placement)
            seconds = time.perf_counter() - started
            result.replans += 1
            if not policy.fully_sharded:
                move_s, move_bytes = home_moves(self.cost, ps.placement, new, lay.node_size)
                result.step_seconds[step] = result.step_seconds.get(step, 0.0) + move_s
                if measured:
                    result.weight_bytes += move_bytes
                    result.parts["home_moves"] += move_s
            result.planner_seconds[step] = max(result.planner_seconds.get(step, 0.0), seconds)
            result.planner_total_seconds += seconds
            ps.placement = new
