"""MicroEP inside Megatron: ``MicroEPMoELayer`` (a ``MoELayer``) and ``MicroEPTokenDispatcher``.

The layer keeps Megatron's router, stock experts module (the parameters, their DDP buffers and
checkpoint layout are untouched) and shared experts. It replaces the token dispatcher and the
routed-expert computation: tokens go to physical slots (home experts + replicas) chosen per
micro-batch by the exact scheduler, and one grouped GEMM runs every local slot, replicas using
weights fetched from their home ranks (``runtime.replicas``).

Steps. At the first forward of an optimizer step every layer of the model adopts a re-planned
placement and starts refreshing its replica weights (asynchronously, waited for at first use);
the step's backward passes accumulate replica gradients in fp32 and return them home once, into
the home experts' ``main_grad`` before DDP reduces it (``glue/replica_sync.py``). Evaluation
forwards, which may follow an optimizer step under the same step number, fetch the weights anew.
The step number comes from Megatron-LM's training loop (``args.curr_iteration``) when it runs,
otherwise from ``set_training_step`` (call it on every rank before each step); with neither,
replica weights are fetched in every forward and their gradients returned in every backward,
history is not recorded and re-planning is off (logged once).

Burst copies (``--microep-burst-slots``): after the count read, every rank decides the same copies
for the micro-batch (``planning.burst.plan_burst``); new ones are pushed from their home ranks, held
until the step ends and reused, and return their gradients with the replicas' (docs/dispatcher.md).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_microep.glue import compat, replica_sync
from megatron_microep.glue.config import (
    DISPATCHER_TYPE,
    MicroEPConfig,
    MicroEPConfigError,
    _megatron_training_args,
    resolve_microep_config,
)
from megatron_microep.planning.burst import plan_burst
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.plan import HistoryPlanner, PlannerSettings, PlanTarget
from megatron_microep.runtime.collectives import dedicated_group
from megatron_microep.runtime.dispatch import (
    Groups,
    MicroBatchRouting,
    exchange,
    exchange_back,
    permute,
    regroup,
    route,
    ungroup,
    unpermute,
)
from megatron_microep.runtime.experts import RowGroups, choose_backend, run_experts, storage_order
from megatron_microep.runtime.layout import PhysicalLayout
from megatron_microep.runtime.replan import PlacementController
from megatron_microep.runtime.replicas import (
    EVERY_BACKWARD,
    GradientReturn,
    ReplicaExchange,
    Replicas,
    replicate_with_burst,
)
from megatron_microep.runtime.telemetry import TelemetryLog, micro_batch_stats, summarize

logger = logging.getLogger(__name__)


class _StepClock:
    """The optimizer step the next forwards belong to; equal on every rank."""

    def __init__(self) -> None:
        self.manual: int | None = None
        self.warned = False

    def current(self) -> int | None:
        if self.manual is not None:
            return self.manual
        args = _megatron_training_args()
        step = getattr(args, "curr_iteration", None) if args is not None else None
        if step is None and not self.warned:
            self.warned = True
            logger.warning(
                "MicroEP: no training step known (not in Megatron-LM's loop and set_training_step was not "
                "called): replica weights are fetched in every forward, re-planning is off"
            )
        return step


STEP_CLOCK = _StepClock()


def set_training_step(step: int) -> None:
    """Declare that the following forwards belong to optimizer step ``step`` (call on every rank)."""
    STEP_CLOCK.manual = int(step)


def planner_settings(settings: MicroEPConfig) -> PlannerSettings:
    """The shared planner's settings from a layer's MicroEP settings (the runtime plans with CP-SAT)."""
    return PlannerSettings(
        method=settings.planner,
        time_limit_s=settings.planner_time_limit_s,
        move_penalty=settings.move_penalty,
        gpus_per_node=settings.gpus_per_node,
        forecast_samples=settings.forecast_samples,
        forecast_recent=settings.forecast_recent,
        forecast_burst=settings.forecast_burst,
        use_solver=True,
    )


class _TraceSink:
    """Routing records of this process's MicroEP layers in the simulator's native trace format."""

    def __init__(self, directory: str, num_gpus: int, num_experts: int) -> None:
        from megatron_microep.simulator.traces import NativeTraceWriter

        os.makedirs(directory, exist_ok=True)
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.writer = NativeTraceWriter(
            os.path.join(directory, f"routing_rank{rank}.mept"),
            num_gpus,
            num_experts,
            meta={"source": "megatron_microep", "global_rank": rank},
        )
        self.micro_batch: dict[tuple, int] = {}

    def write(self, step: int, layer: int, tokens: np.ndarray) -> None:
        key = (step, layer)
        index = self.micro_batch.get(key, 0)
        self.micro_batch = {k: v for k, v in self.micro_batch.items() if k[0] == step}
        self.micro_batch[key] = index + 1
        self.writer.write(step, index, layer, tokens)


_TRACE_SINKS: dict[str, _TraceSink] = {}


def close_traces() -> None:
    """Flush and close the routing traces of ``--microep-trace-dir`` (also run at interpreter exit)."""
    while _TRACE_SINKS:
        _, sink = _TRACE_SINKS.popitem()
        sink.writer.close()


class MicroEPTokenDispatcher(MoETokenDispatcher):
    """Megatron's six-method dispatcher contract over ``runtime.dispatch``.

    ``dispatch_postprocess`` returns tokens grouped by local physical slot and the rows per slot
    (home experts, then replica slots); only ``MicroEPMoELayer`` consumes them.
    """

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection, layer: MicroEPMoELayer):
        super().__init__(config=config, pg_collection=pg_collection)
        self.num_local_experts = num_local_experts
        self.local_expert_indices = local_expert_indices
        self.layer = layer
        self.groups = layer.microep_groups
        self.routing: MicroBatchRouting | None = None

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape = hidden_states.shape
        self.probs_dtype = probs.dtype
        hidden = hidden_states.view(-1, self.hidden_shape[-1])
        self.routing = self.layer._route(routing_map)
        return permute(hidden, probs, self.routing)

    def token_dispatch(self, hidden_states, probs):
        return exchange(hidden_states, probs, self.routing, self.groups)

    def dispatch_postprocess(self, hidden_states, probs):
        tokens, group_rows, probs = regroup(hidden_states, probs, self.routing, self.groups)
        # Rows per local slot in the routing's group order (host values: nothing waits for the device).
        return tokens, torch.tensor(group_rows, dtype=torch.int64), probs

    def combine_preprocess(self, hidden_states):
        return ungroup(hidden_states, self.routing, self.groups, self.probs_dtype)

    def token_combine(self, hidden_states):
        return exchange_back(hidden_states, self.routing, self.groups)

    def combine_postprocess(self, hidden_states):
        out = unpermute(hidden_states, self.routing)
        self.routing = None
        return out.view(self.hidden_shape)

    def set_shared_experts(self, shared_experts):
        raise MicroEPConfigError("--moe-shared-expert-overlap cannot be used with --moe-token-dispatcher-type microep")


# Layer subclasses for --microep-expert-sharding values other than "none" ("module:class", imported on use).
EXPERT_SHARDING_LAYERS = {"fsep": "megatron_microep.glue.fsep:FSEPMoELayer"}


class MicroEPMoELayer(MoELayer):
    """A ``MoELayer`` whose tokens are balanced over replicated experts every micro-batch.

    ``microep``: settings for this layer (else ``config.microep`` or the job's ``--microep-*`` flags).
    Other arguments are ``MoELayer``'s, passed through unchanged. Built with
    ``--microep-expert-sharding`` other than ``none``, it is the subclass ``EXPERT_SHARDING_LAYERS``
    names (so every spec path selects it).
    """

    def __new__(cls, *args, **kwargs):
        config = kwargs.get("config", args[0] if args else None)
        if cls is MicroEPMoELayer and config is not None:
            sharding = resolve_microep_config(config, kwargs.get("microep")).expert_sharding
            if sharding in EXPERT_SHARDING_LAYERS:
                module, name = EXPERT_SHARDING_LAYERS[sharding].split(":")
                cls = getattr(importlib.import_module(module), name)
        return super().__new__(cls)

    def __init__(
        self,
        config,
        submodules=None,
        layer_number=None,
        pg_collection=None,
        microep: MicroEPConfig | None = None,
        **kwargs,
    ):
        settings = resolve_microep_config(config, microep)
        if config.moe_token_dispatcher_type != DISPATCHER_TYPE:
            raise MicroEPConfigError(
                f"MicroEP layers need --moe-token-dispatcher-type {DISPATCHER_TYPE}, "
                f"got {config.moe_token_dispatcher_type!r}"
            )
        if pg_collection is None:
            pg_collection = compat.default_pg_collection()
        with compat.stock_dispatcher_during_init(config):
            super().__init__(
                config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection, **kwargs
            )
        self.microep_settings = settings
        home = compat.expert_tensors(self.experts)  # rejects expert classes MicroEP cannot read
        self.microep_groups = Groups(
            ep=pg_collection.ep,
            etp=pg_collection.expt_tp,
            tp_ep=pg_collection.tp_ep,
            ep_rank=dist.get_rank(pg_collection.ep),
            ep_size=dist.get_world_size(pg_collection.ep),
            etp_rank=dist.get_rank(pg_collection.expt_tp),
            etp_size=dist.get_world_size(pg_collection.expt_tp),
        )
        self._expt_dp_rank = dist.get_rank(pg_collection.expt_dp) if pg_collection.expt_dp is not None else 0
        layout = PhysicalLayout.stock(self.microep_groups.ep_size, self.num_local_experts, settings.redundant_slots)
        target = PlanTarget("replicas", self.microep_groups.ep_size, settings.redundant_slots)
        self.placement_controller = PlacementController(
            layout,
            HistoryPlanner(target, planner_settings(settings)),
            settings.replan_interval,
            settings.history_window,
            settings.replan_lag,
            group=pg_collection.tp_ep,
            device=home[0][0].device,
            name=f" layer {layer_number}",
            layer_number=layer_number,
        )
        self.token_dispatcher = MicroEPTokenDispatcher(
            self.num_local_experts,
            self.local_expert_indices,
            config=self.config,
            pg_collection=pg_collection,
            layer=self,
        )
        self.telemetry = TelemetryLog()
        self._math = compat.expert_math(self.config)
        self._backend: str | None = None
        self._exchange: ReplicaExchange | None = None
        self._exchange_version = -1
        self._step: int | None = None
        self._replicas = Replicas()
        self._replica_key: tuple | None = None  # (step, exchange) the replica weights were refreshed for
        self._refresh_in_forward = False
        self._gradient_return = EVERY_BACKWARD
        self.replica_buckets: dict[torch.Tensor, object] = {}  # home parameter -> its guarded DDP bucket group
        self._burst_node_size = burst_node_size(settings.gpus_per_node, pg_collection.ep)
        self._burst_step: int | None = None  # the step whose burst copies self._replicas holds
        self._burst_plan = None  # the current micro-batch's, from _plan_burst to _push_burst
        if settings.expert_sharding == "none":
            replica_sync.join(self)

    def set_layer_number(self, layer_number: int) -> None:
        # Megatron numbers a layer after constructing it; the planner's log lines name it.
        super().set_layer_number(layer_number)
        self.placement_controller.set_layer_number(self.model_layer_id)

    @property
    def model_layer_id(self) -> int | None:
        """This layer's place in the model for telemetry tags, traces, planner spreading and FSEP's
        prefetch chain: Megatron's layer number, MTP layers after the decoder's (from core_r0.19 an
        MTP layer restarts at 1; Megatron's router renumbers it the same way for its loss tracker)."""
        if self.layer_number is None:
            return None
        return self.layer_number + (self.config.num_layers if getattr(self, "is_mtp_layer", False) else 0)

    # --- placement ------------------------------------------------------------------------------
    @property
    def layout(self) -> PhysicalLayout:
        return self.placement_controller.layout

    def set_placement(self, placement: Placement) -> None:
        """Use ``placement`` from the next forward on; call with the same placement on every rank."""
        layout = PhysicalLayout.build(placement, self.num_local_experts, self.microep_settings.redundant_slots)
        self.placement_controller.set_layout(layout)

    # --- per micro-batch ------------------------------------------------------------------------
    def _route(self, routing_map: torch.Tensor) -> MicroBatchRouting:
        step = STEP_CLOCK.current()
        # Placement broadcasts use the compute device (Megatron may build on CPU and move the model).
        self.placement_controller.device = routing_map.device
        self._on_forward(step)
        layout = self.layout
        bursting = self._bursts_on(step)
        routing = route(
            routing_map,
            layout,
            self.microep_groups,
            self.config.moe_router_topk,
            group_order=self._group_order(layout),
            plan=self._plan_burst if bursting else None,
        )
        if bursting:
            self._push_burst()
        if self.training and torch.is_grad_enabled():
            # Counted once per micro-batch also under activation recompute, whose first pass runs
            # without grad; evaluation forwards are not training history.
            tokens = routing.counts.sum(axis=0)
            self.placement_controller.record(tokens.sum(axis=0))
            layer = self.model_layer_id if self.layer_number is not None else -1
            self.telemetry.add(
                micro_batch_stats(
                    -1 if step is None else step,
                    layer,
                    tokens,
                    routing.schedule,
                    routing.layout,
                    routing.phase_seconds,
                )
            )
            if self.microep_settings.trace_dir and step is not None and dist.get_rank(self.microep_groups.tp_ep) == 0:
                self._trace_sink(tokens.shape).write(step, layer, tokens)
        return routing

    # --- burst copies ---------------------------------------------------------------------------
    def _bursts_on(self, step: int | None) -> bool:
        """Burst copies need a training step to live in (their weights are current only within it)."""
        slots = self.microep_settings.burst_slots
        if not slots or not self.training or self.microep_settings.expert_sharding != "none":
            return False
        if step is None:
            if not getattr(self, "_warned_burst", False):
                self._warned_burst = True
                logger.warning("MicroEP: burst slots are off without a known training step (set_training_step)")
            return False
        if self._burst_step != step:
            # The previous step's copies returned their gradients before its optimizer step (checked).
            self._replicas.end_burst_step(slots)
            self._burst_step = step
        return True

    def _plan_burst(self, tokens: np.ndarray):
        """The micro-batch's layout (persistent + burst copies) and schedule, from the gathered counts
        ``tokens`` int64 [G, E]: the same on every rank, so nothing is broadcast."""
        settings = self.microep_settings
        layout = self.layout
        plan = plan_burst(
            tokens,
            layout.placement,
            self._replicas.burst_copies,
            settings.burst_slots,
            self._burst_node_size,
            settings.burst_tolerance,
        )
        self._burst_plan = plan
        if not len(plan.copies):
            return layout, plan.schedule, self._group_order(layout)
        extended = layout.with_burst(plan.placement, plan.copies, plan.burst_slot(), settings.burst_slots)
        return extended, plan.schedule, self._group_order(extended)

    def _push_burst(self) -> None:
        """Hold the plan's burst copies; push the new ones' weights (asynchronously, waited for at the experts)."""
        plan, self._burst_plan = self._burst_plan, None
        if not len(plan.copies):
            return
        if self._replicas.group is None:
            self._replicas.group = dedicated_group(self.microep_groups.ep, "replicas")
        g = self.microep_groups
        compat.sync_expert_params(self.experts)
        self._replicas.push_burst(
            plan.copies,
            plan.burst_slot(),
            plan.num_held,
            compat.expert_tensors(self.experts),
            (g.ep_size, self.num_local_experts, self.microep_settings.burst_slots, g.ep_rank),
        )

    def _trace_sink(self, shape) -> _TraceSink:
        directory = self.microep_settings.trace_dir
        if directory not in _TRACE_SINKS:
            if not _TRACE_SINKS:
                atexit.register(close_traces)
            _TRACE_SINKS[directory] = _TraceSink(directory, shape[0], shape[1])
        return _TRACE_SINKS[directory]

    def _on_forward(self, step: int | None) -> None:
        if step is not None and step != self._step:
            if self.microep_settings.expert_sharding == "none":
                replica_sync.start_step(self, step)  # every replica layer of the model, this one included
            else:
                self._on_new_step(step)
        if self._refresh_in_forward and self.training:
            self._refresh_in_forward = False
            compat.sync_expert_params(self.experts)  # e.g. DDP's overlapped parameter all-gather completes here
            self._refresh_replicas(self.layout, self._step)

    def _on_new_step(self, step: int) -> None:
        previous, self._step = self._step, step
        self.placement_controller.on_step(step)
        args = _megatron_training_args()
        interval = getattr(args, "log_interval", None) if args is not None else None
        if previous is not None and interval and step % interval == 0:
            self.log_telemetry(step)

    def log_telemetry(self, step: int) -> dict[str, float]:
        """Summarise (and clear) the stats since the last call; write them to Megatron's writers."""
        summary = summarize(self.telemetry.drain())
        if not summary:
            return summary
        # Megatron-LM gives its writers to the last rank only; the EP group's ranks see the same counts.
        tag = f"microep/layer{self.model_layer_id}"
        writers = _metrics_writers()
        if "tensorboard" in writers:
            for key, value in summary.items():
                writers["tensorboard"].add_scalar(f"{tag}/{key}", value, step)
        if "wandb" in writers:
            writers["wandb"].log({f"{tag}/{key}": value for key, value in summary.items()}, step)
        if dist.get_rank(self.microep_groups.tp_ep) != 0 or self._expt_dp_rank != 0:
            return summary
        logger.info(
            "MicroEP layer %s step %d: max/mean before %.3f after %.3f, remote tokens %.0f -> %.0f, "
            "%d replicas carrying %.0f tokens, scheduling %.2f ms per micro-batch",
            self.model_layer_id,
            step,
            summary["imbalance_before"],
            summary["imbalance_after"],
            summary["remote_before"],
            summary["remote_after"],
            summary["replicas"],
            summary["replica_tokens"],
            summary["scheduling_ms"],
        )
        return summary

    # --- experts --------------------------------------------------------------------------------
    def _group_order(self, layout: PhysicalLayout) -> np.ndarray | None:
        """Local slots in the order their rows are grouped for the experts: home experts in the
        order their weights lie in memory (Megatron's DDP buffer holds them in reverse), so that one
        strided view covers them (``runtime.experts``); then filled replica slots, then empty ones."""
        if not compat.reads_stock_experts(self.experts):
            return None  # a subclass with its own experts (FSEP) keeps the local slot order
        n = self.num_local_experts
        home = storage_order([tensors[0] for tensors in compat.expert_tensors(self.experts)])
        replica_slots = layout.local_slot[self.microep_groups.ep_rank, n:]
        filled = [n + r for r in np.flatnonzero(replica_slots >= 0).tolist()]
        empty = [n + r for r in np.flatnonzero(replica_slots < 0).tolist()]
        return np.array(home + filled + empty, dtype=np.int64)

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        tokens, _, probs = self.token_dispatcher.dispatch_postprocess(hidden_states, probs)
        routing = self.token_dispatcher.routing
        layout = routing.layout  # this micro-batch's: the persistent placement plus any burst copies
        n = self.num_local_experts
        compat.sync_expert_params(self.experts)
        home = compat.expert_tensors(self.experts)
        # Home experts whose copies run elsewhere also get gradient through the replica return.
        copies = layout.placement.replica_counts()[
            self.microep_groups.ep_rank * n : (self.microep_groups.ep_rank + 1) * n
        ]
        by_slot = [compat.expert_weights(t, feeds_replicas=bool(c > 1)) for t, c in zip(home, copies)]
        by_slot += [None] * (layout.redundant_slots + layout.burst_slots)
        persistent = self.layout
        if persistent.has_replicas or layout.burst_slots:
            exchange = None
            key = (self._step, None) if self.training and self._step is not None else None
            if persistent.has_replicas:
                exchange = self._replica_exchange(persistent, home)
                # Reused only within a training step: Megatron-LM evaluates after the optimizer step under the
                # same step number, when the home weights have changed (eval mode is equal on every rank).
                key = (self._step, exchange) if key is not None else None
                if key is None or key != self._replica_key:
                    self._refresh_replicas(persistent, self._step if key is not None else None)
            policy = self._gradient_return if key is not None else EVERY_BACKWARD
            mine = []  # this rank's burst slots in use (a layout without burst slots: an evaluation forward)
            if layout.burst_slots:
                holder = self._replicas.burst_copies[:, 1]
                mine = [int(s) for s, g in zip(self._replicas.burst_slot, holder) if g == self.microep_groups.ep_rank]
            tokens, replicas, bursts = replicate_with_burst(tokens, self._replicas, exchange, home, policy, mine)
            for slot, tensors in enumerate(replicas):
                if tensors is not None:
                    by_slot[n + slot] = compat.expert_weights(tensors)
            for slot, tensors in zip(mine, bursts):
                by_slot[n + layout.redundant_slots + slot] = compat.expert_weights(tensors)
        rows = routing.group_rows
        weights = [by_slot[slot] for slot in routing.tables.group_order]
        used = sum(w is not None for w in weights)  # empty replica slots come last in the group order
        if any(rows[used:]):
            raise RuntimeError(f"empty replica slots were sent tokens: rows per group {rows}")
        if self._backend is None:
            fc1, fc2 = home[0][0], home[0][1]
            self._backend = choose_backend(
                self.microep_settings.expert_backend, fc1.device, fc1.dtype, [fc1.shape[1], fc1.shape[0], fc2.shape[1]]
            )
        groups = RowGroups(rows[:used], routing.maps.group_offsets.narrow(0, 0, used))
        output = run_experts(self._backend, tokens, groups, probs, weights[:used], self._math)
        return self.token_dispatcher.combine_preprocess(output), None

    def _replica_exchange(self, layout: PhysicalLayout, home) -> ReplicaExchange:
        version = self.placement_controller.version
        if self._exchange is None or self._exchange_version != version:
            self._exchange = ReplicaExchange(layout, self.microep_groups.ep_rank, [t.shape for t in home[0]])
            self._exchange_version = version
        return self._exchange

    # --- replicas through the step (glue/replica_sync.py calls these) ----------------------------
    def begin_replica_step(self, step: int, gradient_return: GradientReturn) -> None:
        """Start ``step`` (same call on every rank): adopt a planned placement, start the replica refresh."""
        if self._replicas.gradients_pending:
            raise RuntimeError(
                f"MicroEP layer {self.layer_number}: the replica gradients of step {self._step} never reached "
                "DDP's gradient reduction (its last backward ran inside no_sync and no DDP bucket or "
                "finalize_model_grads call delivered them)"
            )
        self._on_new_step(step)
        self._gradient_return = gradient_return
        self._replica_key = None
        if not self.layout.has_replicas:
            self._replicas.release()
        elif replica_sync.params_current(self.experts):
            self._refresh_replicas(self.layout, step)
        else:
            self._refresh_in_forward = True

    def _refresh_replicas(self, layout: PhysicalLayout, step: int | None) -> None:
        home = compat.expert_tensors(self.experts)
        exchange = self._replica_exchange(layout, home)
        if self._replicas.group is None:
            self._replicas.group = dedicated_group(self.microep_groups.ep, "replicas")
        self._replicas.refresh(exchange, home)
        self._replica_key = None if step is None else (step, exchange)

    def replica_home_params(self) -> list[torch.Tensor]:
        return [t for expert in compat.expert_tensors(self.experts) for t in expert if t.requires_grad]

    def add_to_main_grad(self, expert: int, tensor: int, grad: torch.Tensor) -> None:
        """One returned replica gradient (fp32) into local expert ``expert``'s ``main_grad``."""
        compat.expert_tensors(self.experts)[expert][tensor].main_grad.add_(grad)

    def deliver_replica_gradients(self) -> None:
        """This step's replica gradients into the home experts' ``main_grad`` now (every rank at once)."""
        if not self._replicas.gradients_pending:
            return
        if any(getattr(b, "grad_reduce_handle", None) is not None for b in self.replica_buckets.values()):
            raise RuntimeError(
                f"MicroEP layer {self.layer_number}: DDP started reducing the home experts' gradients before "
                "their replica gradients arrived (a loop that bypasses config.no_sync_func with overlapped "
                "gradient reduction): set config.no_sync_func to the DDP's no_sync"
            )
        self._replicas.deliver(self.add_to_main_grad)


def _metrics_writers() -> dict[str, object]:
    """Megatron-LM's TensorBoard and W&B writers, where the running job created them."""
    global_vars = sys.modules.get("megatron.training.global_vars")
    if global_vars is None:
        return {}
    writers = {}
    if getattr(global_vars, "_GLOBAL_TENSORBOARD_WRITER", None) is not None:
        writers["tensorboard"] = global_vars._GLOBAL_TENSORBOARD_WRITER
    if getattr(global_vars, "_GLOBAL_WANDB_WRITER", None) is not None:
        writers["wandb"] = global_vars._GLOBAL_WANDB_WRITER
    return writers


def burst_node_size(gpus_per_node: int | None, ep_group) -> int | None:
    """EP ranks per node for burst copies: ``--microep-gpus-per-node`` when set, else the launcher's
    node (``LOCAL_WORLD_SIZE``) where the EP group's ranks fill whole nodes in order; None: anywhere."""
    ep_size = dist.get_world_size(ep_group)
    if gpus_per_node:
        return gpus_per_node if ep_size % gpus_per_node == 0 else None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if local <= 0:
        return None
    nodes = [r // local for r in dist.get_process_group_ranks(ep_group)]
    size = nodes.count(nodes[0])
    blocks = [nodes[i : i + size] for i in range(0, ep_size, size)]
    if ep_size % size or any(len(set(b)) != 1 for b in blocks) or len({b[0] for b in blocks}) != len(blocks):
        return None
    return size


def microep_layers(model) -> list[MicroEPMoELayer]:
    """Every MicroEP layer in ``model`` (a module or a list of model chunks)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, MicroEPMoELayer)]
