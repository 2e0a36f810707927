"""FSEP inside Megatron: ``FSEPExperts`` (shard storage) and ``FSEPMoELayer`` (a MicroEP layer over it).

``FSEPMoELayer`` is a ``MicroEPMoELayer`` (router, dispatcher, scheduler, telemetry, step clock
unchanged) whose experts are fully sharded (``runtime.fsep``): after Megatron builds and initialises
the stock experts, one all-to-all turns them into shards and the stock module is dropped. The
layout (C = experts per rank + ``--microep-redundant-slots`` slots per rank, any expert anywhere)
is re-planned from routing history by the FSEP planner (``planning.fsep_layout``) in a planner
process, as often as every step, and adopted at a step boundary on every rank; the scheduler
balances every micro-batch over it. Changing it moves nothing but the next gathers.

Parameters, gradients, optimizer. ``experts.shards`` [E, S] is one ordinary expert parameter
(``allreduce = False``): Megatron's DDP gives it an fp32 main gradient in the expert buffers,
reduces it over expert-data-parallel ranks and clips it with the other expert parameters, and any
optimizer over the model's parameters (Megatron's, with fp32 main params for bf16/fp16 models, or a
torch optimizer on ``main_grad``) steps on shards only. The gradient return adds the summed copies'
gradients to ``main_grad`` in fp32 directly when DDP provides one.

Checkpoints. ``sharded_state_dict`` writes every shard piece as a block of the stock expert
tensors (``{prefix}experts.linear_fc1.weight`` [E, F1, H], ...), the layout of Megatron's
``SequentialMLP`` and ``TEGroupedMLP``: a checkpoint saved with FSEP loads into stock EP, into FSEP
with another EP size, and back. Optimizer state built with Megatron's
``optim_state_to_sharding_state`` follows the same factory. The layer also saves its layout state
(``{prefix}fsep_layout_state``, one object per layer: the layout, the planner's routing history, a
plan awaiting adoption), so that a resumed run uses the layout and history of the run that saved it.
A checkpoint loaded at another EP size or slot count keeps the history and starts from the initial
layout, re-planned at its first step (logged); a checkpoint without layout state (stock EP) starts
from the initial layout (logged); a malformed or foreign layout state is an ``FSEPLayoutStateError``.
The object is in the state dict only when the layer has a state or the checkpoint's content
metadata flags one (``LAYOUT_STATE_MARKER``; see ``FSEPMoELayer.sharded_state_dict``), so that a
stock checkpoint loads under Megatron-LM's default strictness; docs/fsep.md has the details.

Prefetch. Layers built from one TransformerConfig form a chain by layer number; during the forward
a layer starts the next layer's gather before running its own experts, and under the ``regather``
policy its backward starts the previous layer's gather. A prefetched gather is used only by the
very next FSEP expert pass of this process (otherwise it is waited for and dropped), so a
prefetch never outlives an optimizer step.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

from megatron_microep.glue import compat
from megatron_microep.glue.config import MicroEPConfig, MicroEPConfigError
from megatron_microep.glue.layer import MicroEPMoELayer, planner_settings
from megatron_microep.planning.placement import Placement, PlacementError
from megatron_microep.planning.plan import HistoryPlanner, PlanTarget
from megatron_microep.runtime.experts import choose_backend, run_experts
from megatron_microep.runtime.fsep import (
    GatheredMemory,
    PendingGather,
    ShardExchange,
    ShardSpec,
    TrafficCounter,
    fsep_layout,
    initial_fsep_placement,
    run_sharded_experts,
    shards_from_experts,
)
from megatron_microep.runtime.layout import PhysicalLayout
from megatron_microep.runtime.replan import PlacementController

logger = logging.getLogger(__name__)

_STOCK_EXTRA_STATE = "stock_linear_extra_state"
LAYOUT_STATE_KEY = "fsep_layout_state"
LAYOUT_STATE_FORMAT = 1
# Content-metadata flag of a checkpoint that holds FSEP layout states.
LAYOUT_STATE_MARKER = "microep_fsep_layout_state"
TENSOR_NAMES = ("linear_fc1.weight", "linear_fc2.weight", "linear_fc1.bias", "linear_fc2.bias")
# Bytes of gathered experts alive in this process over all FSEP layers (a measurement).
GATHERED_MEMORY = GatheredMemory()


def shard_spec_for(tensors: list[torch.Tensor], gated: bool, num_ranks: int) -> ShardSpec:
    """The cut of one expert given as ``compat.expert_tensors`` lists it (fc1, fc2, biases)."""
    names = TENSOR_NAMES[: len(tensors)]
    parts = [2 if gated and name.startswith("linear_fc1") else 1 for name in names]
    return ShardSpec([t.shape for t in tensors], parts, num_ranks, names)


class FSEPExperts(MegatronModule):
    """One layer's experts as this EP rank's shards: ``shards`` [E, S], 1/G of every expert."""

    def __init__(self, config, spec: ShardSpec, shards: torch.Tensor, ep_rank: int, expt_dp_rank: int):
        super().__init__(config=config)
        self.spec = spec
        self.ep_rank = ep_rank
        self.expt_dp_rank = expt_dp_rank
        self.shards = torch.nn.Parameter(shards)
        # An expert parameter: DDP's expert buffers, reduction over expert-DP only, expert optimizer.
        self.shards.allreduce = False

    @property
    def num_experts(self) -> int:
        return self.shards.shape[0]

    def expert_tensors(self, shards: torch.Tensor) -> dict[tuple, torch.Tensor]:
        """{(expert, tensor index, half): view [b, *rest]} of a buffer laid out like ``shards``."""
        return {(e, i, p): view for e in range(shards.shape[0]) for i, p, view in self.spec.pieces(shards[e])}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        if (metadata or {}).get("singleton_local_shards", False):
            raise NotImplementedError("FSEP experts do not support singleton_local_shards checkpoints")
        spec, G, r = self.spec, self.spec.num_ranks, self.ep_rank
        num_experts, prepend = self.num_experts, len(sharded_offsets) + 1
        replica_id = (0, 0, self.expt_dp_rank)

        def build(key, data, replica, flattened_range):
            if flattened_range is not None:
                raise NotImplementedError("FSEP experts cannot be saved with a flattened range")
            out = {}
            for (e, i, p), view in self.expert_tensors(data).items():
                rows_axis = prepend  # the tensor's first dimension, after the prepended axes
                out[f"{e}.{spec.names[i]}.{p}"] = ShardedTensor.from_rank_offsets(
                    f"{key}.{spec.names[i]}",
                    view,
                    *sharded_offsets,
                    (len(sharded_offsets), e, num_experts),
                    (rows_axis, p * G + r, spec.parts[i] * G),
                    replica_id=replica,
                    prepend_axis_num=prepend,
                )
            return out

        def merge(loaded):
            out = torch.empty(self.shards.shape, dtype=next(iter(loaded.values())).dtype)
            for (e, i, p), view in self.expert_tensors(out).items():
                view.copy_(loaded[f"{e}.{spec.names[i]}.{p}"])
            return out

        out = {f"{prefix}shards": ShardedTensorFactory(f"{prefix}experts", self.shards, build, merge, replica_id)}
        # Stock local experts also write their linears' (empty) extra state; write the same objects
        # for this rank's Megatron home experts so that either checkpoint loads strictly into the other.
        per_rank = num_experts // G
        for e in range(r * per_rank, (r + 1) * per_rank):
            for linear in ("linear_fc1", "linear_fc2"):
                out[f"{prefix}{_STOCK_EXTRA_STATE}.{e}.{linear}"] = make_sharded_object_for_checkpoint(
                    None,
                    f"{prefix}experts.{linear}._extra_state",
                    (*sharded_offsets, (len(sharded_offsets), e, num_experts)),
                    replica_id,
                )
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(f"{prefix}{_STOCK_EXTRA_STATE}.")]:
            del state_dict[key]  # the stock linears' extra state is empty; nothing to restore
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# Layers of one model (one TransformerConfig, by identity): the prefetch chain, ordered by layer number.
_CHAINS: dict[int, list[weakref.ref]] = {}


def _join_chain(config, layer) -> None:
    if id(config) not in _CHAINS:
        _CHAINS[id(config)] = []
        weakref.finalize(config, _CHAINS.pop, id(config), None)
    _CHAINS[id(config)].append(weakref.ref(layer))


class _PassClock:
    """Counts FSEP expert passes in this process, forward and backward separately: a prefetch is
    valid only for the pass right after the one that started it."""

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0


_PASSES = _PassClock()


@dataclass
class _Prefetched:
    pending: PendingGather
    exchange: ShardExchange
    pass_index: int


class FSEPMoELayer(MicroEPMoELayer):
    """A MicroEP layer whose experts are FSEP shards (see the module doc).

    Built by ``MicroEPMoELayer`` when the settings say ``--microep-expert-sharding fsep``; the
    arguments are ``MicroEPMoELayer``'s.
    """

    def __init__(
        self,
        config,
        submodules=None,
        layer_number=None,
        pg_collection=None,
        microep: MicroEPConfig | None = None,
        **kwargs,
    ):
        super().__init__(
            config,
            submodules=submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
            microep=microep,
            **kwargs,
        )
        if self.microep_settings.expert_sharding != "fsep":
            raise MicroEPConfigError("FSEPMoELayer needs --microep-expert-sharding fsep")
        groups = self.microep_groups
        home = compat.expert_tensors(self.experts)
        self.fsep_spec = shard_spec_for(home[0], bool(config.gated_linear_unit), groups.ep_size)
        shards = shards_from_experts(home, self.fsep_spec, groups.ep_rank, groups.ep)
        self.experts = FSEPExperts(config, self.fsep_spec, shards, groups.ep_rank, self._expt_dp_rank)

        settings = self.microep_settings
        self.slots_per_rank = self.num_local_experts + settings.redundant_slots
        num_experts = self.num_local_experts * groups.ep_size
        layout = fsep_layout(
            initial_fsep_placement(num_experts, groups.ep_size, self.slots_per_rank), self.slots_per_rank
        )
        planner = HistoryPlanner(PlanTarget("fsep", groups.ep_size, self.slots_per_rank), planner_settings(settings))
        self.placement_controller = FSEPPlacementController(
            layout,
            planner,
            settings.replan_interval,
            settings.history_window,
            settings.replan_lag,
            group=self.placement_controller.group,
            device=shards.device,
            name=f" layer {layer_number}",
            layer_number=layer_number,
        )
        self.fsep_traffic = TrafficCounter()
        self.prefetch_hits = 0  # gathers that had been started by a neighbouring layer
        self._shard_exchange: ShardExchange | None = None
        self._prefetched: dict[str, _Prefetched] = {}
        _join_chain(config, self)

    # --- layout ---------------------------------------------------------------------------------
    def set_placement(self, placement: Placement) -> None:
        """Use the FSEP layout ``placement`` (any expert on any rank, at most C copies per rank) from the
        next forward on; call with the same placement on every rank."""
        self.placement_controller.set_layout(fsep_layout(placement, self.slots_per_rank))

    def layout_state(self) -> dict:
        """This layer's layout, routing history and pending plan (``FSEPPlacementController.state``)."""
        return self.placement_controller.state()

    def load_layout_state(self, state) -> None:
        """Continue from a saved ``layout_state`` (call with the same state on every rank). Raises
        FSEPLayoutStateError for a malformed state or one of another model; a state saved at another
        EP size or slot count gives its history to the planner, which re-plans at the first step."""
        where = f"FSEP layer {self.layer_number}"
        applied = self.placement_controller.restore(state, where)
        if self.microep_groups.ep_rank != 0 or self._expt_dp_rank != 0:
            return
        steps = len(state["history"])
        if applied:
            logger.info("%s: layout and %d steps of routing history restored from the checkpoint", where, steps)
        else:
            then = f"re-planned at the first step from the {steps} restored steps of routing history"
            if self.placement_controller.replan_interval == 0:
                then = "kept: re-planning is off (--microep-replan-interval 0)"
            logger.warning(
                "%s: the checkpoint's layout is for EP=%d with %d slots per rank, this run has EP=%d with %d; "
                "starting from the initial layout, %s",
                where,
                state["num_ranks"],
                state["slots_per_rank"],
                self.microep_groups.ep_size,
                self.slots_per_rank,
                then,
            )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        # A requested key that the checkpoint lacks fails Megatron-LM's default load
        # (assume_ok_unexpected), and a module cannot tell a save from a load. So the layout object is
        # in the dict only when this layer has a state (it has trained, or restored one), or when the
        # checkpoint's content metadata, which Megatron-LM passes back on load, says it holds one.
        # Saving records that in the same dict, which Megatron-LM writes as the content metadata.
        if not (self.placement_controller.has_state() or (metadata or {}).get(LAYOUT_STATE_MARKER)):
            return out
        if metadata is not None:
            metadata[LAYOUT_STATE_MARKER] = True
        # Equal on every rank of the layer's expert domain; the planner rank's copy (which knows a
        # pending plan's outcome) is the one written.
        controller = self.placement_controller
        replica_id = (
            0,
            (dist.get_rank(controller.group) - controller.planner_rank) % dist.get_world_size(controller.group),
            self._expt_dp_rank,
        )
        key = f"{prefix}{LAYOUT_STATE_KEY}"
        out[key] = make_sharded_object_for_checkpoint(self.layout_state(), key, sharded_offsets, replica_id)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = f"{prefix}{LAYOUT_STATE_KEY}"
        if key in state_dict:
            self.load_layout_state(state_dict.pop(key))
        elif self.microep_groups.ep_rank == 0 and self._expt_dp_rank == 0:
            logger.warning(
                "FSEP layer %s: the state dict has no FSEP layout state (stock EP, replica mode, a "
                "checkpoint saved before any step, or a plain state_dict); keeping the current layout "
                "and routing history",
                self.layer_number,
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def exchange_for(self, layout: PhysicalLayout) -> ShardExchange:
        if self._shard_exchange is None or self._shard_exchange.layout is not layout:
            self._shard_exchange = ShardExchange(
                layout,
                self.microep_groups.ep_rank,
                self.microep_groups.ep,
                self.fsep_spec,
                self.fsep_traffic,
                GATHERED_MEMORY,
            )
        return self._shard_exchange

    # --- prefetch -------------------------------------------------------------------------------
    def _neighbour(self, offset: int) -> FSEPMoELayer | None:
        chain = [ref() for ref in _CHAINS.get(id(self.config), [])]
        chain = sorted((m for m in chain if m is not None and m.layer_number is not None), key=lambda m: m.layer_number)
        if self not in chain:
            return None
        index = chain.index(self) + offset
        return chain[index] if 0 <= index < len(chain) else None

    def _take(self, direction: str, pass_index: int, exchange: ShardExchange) -> PendingGather | None:
        """This layer's prefetched gather if it was started for this very pass and layout."""
        found = self._prefetched.pop(direction, None)
        if found is None:
            return None
        if found.pass_index == pass_index and found.exchange is exchange:
            self.prefetch_hits += 1
            return found.pending
        found.pending.wait()  # a collective every rank started; let it finish, drop its result
        return None

    def _prefetch_into(self, target: FSEPMoELayer | None, direction: str, pass_index: int) -> None:
        if target is None or self._step is None:
            return
        if direction == "forward" and target._step != self._step:
            target._on_new_step(self._step)  # adopt its layout for this step now, as its forward would
        exchange = target.exchange_for(target.layout)
        stale = target._prefetched.pop(direction, None)
        if stale is not None:
            stale.pending.wait()
        target._prefetched[direction] = _Prefetched(exchange.start_gather(target.experts.shards), exchange, pass_index)

    # --- experts --------------------------------------------------------------------------------
    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        tokens, per_slot, probs = self.token_dispatcher.dispatch_postprocess(hidden_states, probs)
        layout = self.token_dispatcher.routing.layout
        compat.sync_expert_params(self.experts)
        exchange = self.exchange_for(layout)
        counts = per_slot.tolist()
        rows = counts[: exchange.num_local]
        if any(counts[exchange.num_local :]):
            raise RuntimeError(f"empty FSEP slots were sent tokens: {counts}")
        if self._backend is None:
            fc1, fc2 = self.fsep_spec.shapes[0], self.fsep_spec.shapes[1]
            self._backend = choose_backend(
                self.microep_settings.expert_backend,
                self.experts.shards.device,
                self.experts.shards.dtype,
                [fc1[1], fc1[0], fc2[1]],
            )
        _PASSES.forward += 1
        pass_index = _PASSES.forward
        pending = self._take("forward", pass_index, exchange) or exchange.start_gather(self.experts.shards)
        self._prefetch_into(self._neighbour(+1), "forward", pass_index + 1)
        backend, math = self._backend, self._math

        def run(x, p, tensors):
            weights = [compat.expert_weights([t[j] for t in tensors]) for j in range(exchange.num_local)]
            return run_experts(backend, x, rows, p, weights, math)

        def regather() -> PendingGather:
            _PASSES.backward += 1
            index = _PASSES.backward
            own = self._take("backward", index, exchange) or exchange.start_gather(self.experts.shards)
            self._prefetch_into(self._neighbour(-1), "backward", index + 1)
            return own

        output = run_sharded_experts(
            self.microep_settings.fsep_memory_policy,
            tokens,
            probs,
            self.experts.shards,
            exchange,
            run,
            pending,
            regather,
        )
        return self.token_dispatcher.combine_preprocess(output), None


class FSEPLayoutStateError(ValueError):
    """A checkpoint's FSEP layout state that is malformed or belongs to another model (named in the message)."""


_LAYOUT_STATE_FIELDS = {
    "format",
    "num_experts",
    "num_ranks",
    "slots_per_rank",
    "placement",
    "history",
    "current_rows",
    "step",
    "pending",
}


def _checked_loads(rows, num_experts: int, what: str) -> np.ndarray:
    loads = np.asarray(rows)
    if (
        loads.ndim != 2
        or loads.shape[1] != num_experts
        or not np.issubdtype(loads.dtype, np.integer)
        or (loads < 0).any()
    ):
        raise FSEPLayoutStateError(
            f"{what}: expected non-negative integer expert loads [micro-batches, "
            f"{num_experts}], got {loads.dtype} {list(loads.shape)}"
        )
    return loads.astype(np.int64)


def _checked_placement(lists, num_ranks: int, slots: int, what: str) -> Placement:
    try:
        placement = Placement.from_lists(lists, num_ranks)
        fsep_layout(placement, slots)
    except (PlacementError, TypeError, ValueError) as err:
        raise FSEPLayoutStateError(f"{what}: not an FSEP layout for {num_ranks} ranks x {slots} slots: {err}") from None
    return placement


def check_layout_state(state, num_experts: int, where: str) -> dict:
    """Validate a saved FSEP layout state (``FSEPPlacementController.state``) for a layer with
    ``num_experts`` experts; returns it with loads as int64 arrays and placements as ``Placement``.
    Raises FSEPLayoutStateError naming ``where`` and the problem."""
    if not isinstance(state, dict) or set(state) != _LAYOUT_STATE_FIELDS:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise FSEPLayoutStateError(
            f"{where}: malformed FSEP layout state: expected fields {sorted(_LAYOUT_STATE_FIELDS)}, got {got}"
        )
    if state["format"] != LAYOUT_STATE_FORMAT:
        raise FSEPLayoutStateError(
            f"{where}: FSEP layout state format {state['format']!r}, this version reads {LAYOUT_STATE_FORMAT}"
        )
    if state["num_experts"] != num_experts:
        raise FSEPLayoutStateError(
            f"{where}: the checkpoint's layout state is for {state['num_experts']!r} experts, "
            f"this layer has {num_experts}"
        )
    G, C = state["num_ranks"], state["slots_per_rank"]
    if not all(isinstance(v, int) and v >= 1 for v in (G, C)):
        raise FSEPLayoutStateError(f"{where}: malformed FSEP layout state: num_ranks={G!r}, slots_per_rank={C!r}")
    out = dict(state)
    out["placement"] = _checked_placement(state["placement"], G, C, f"{where}: saved layout")
    if not isinstance(state["history"], (list, tuple)):
        raise FSEPLayoutStateError(f"{where}: saved routing history must be a list of steps")
    out["history"] = [
        _checked_loads(block, num_experts, f"{where}: saved routing history, step {i}")
        for i, block in enumerate(state["history"])
    ]
    out["current_rows"] = _checked_loads(state["current_rows"], num_experts, f"{where}: saved current-step loads")
    if state["step"] is not None and not isinstance(state["step"], int):
        raise FSEPLayoutStateError(f"{where}: saved step must be an integer or None, got {state['step']!r}")
    pending = state["pending"]
    if pending is not None:
        if (
            not isinstance(pending, dict)
            or set(pending) != {"adopt_step", "placement"}
            or not isinstance(pending["adopt_step"], int)
        ):
            raise FSEPLayoutStateError(f"{where}: malformed pending plan {pending!r}")
        plan = pending["placement"]
        out["pending"] = {
            "adopt_step": pending["adopt_step"],
            "placement": None if plan is None else _checked_placement(plan, G, C, f"{where}: saved pending plan"),
        }
    return out


class FSEPPlacementController(PlacementController):
    """The placement controller with FSEP layout rules (adopted placements need no home copy), and a
    checkpointable state: layout, routing history, current step and a plan awaiting adoption."""

    def build_layout(self, placement: Placement) -> PhysicalLayout:
        return fsep_layout(placement, self.layout.local_slots)

    def state(self) -> dict:
        """``PlacementController.state`` with the format and the layout's shape, which a load checks."""
        return {
            "format": LAYOUT_STATE_FORMAT,
            "num_experts": self.layout.placement.num_experts,
            "num_ranks": self.layout.num_ranks,
            "slots_per_rank": self.layout.local_slots,
            **super().state(),
        }

    def restore(self, state, where: str) -> bool:
        """Validate a saved ``state`` and continue from it (same call on every rank). Returns False
        when its layout is for another EP size or slot count: the history is kept and the first
        step re-plans (the current layout stays until then). Raises FSEPLayoutStateError (see
        ``check_layout_state``)."""
        state = check_layout_state(state, self.layout.placement.num_experts, where)
        applies = (state["num_ranks"], state["slots_per_rank"]) == (self.layout.num_ranks, self.layout.local_slots)
        self.load_state(state, self.build_layout(state["placement"]) if applies else None)
        return applies


def fsep_layers(model) -> list[FSEPMoELayer]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, FSEPMoELayer)]


def full_experts(layer: FSEPMoELayer) -> list[torch.Tensor]:
    """Every expert's full tensors [E, *shape_i] of an FSEP layer (all-gather over EP; inspection/tests)."""
    from megatron_microep.runtime.fsep import experts_from_shards

    return experts_from_shards(layer.experts.shards, layer.fsep_spec, layer.microep_groups.ep)
