"""FSEP inside Megatron: ``FSEPExperts`` (shard storage) and ``FSEPMoELayer`` (a MicroEP layer over it).

``FSEPMoELayer`` is a ``MicroEPMoELayer`` (router, dispatcher, scheduler, telemetry, step clock
unchanged) whose experts are fully sharded (``runtime.fsep``): Megatron builds and initialises the
stock experts, one all-to-all turns them into shards (see Construction) and the stock module is
dropped. The layout (C = experts per rank + ``--microep-redundant-slots`` slots per rank, any expert
anywhere) is re-planned from routing history by the FSEP planner (``planning.fsep_layout``) in a
planner process, as often as every step, and adopted at a step boundary on every rank; the scheduler
balances every micro-batch over it. Changing it moves nothing but the next gathers.

Parameters, gradients, optimizer. ``experts.shards`` [E, S] is one ordinary expert parameter
(``allreduce = False``): Megatron's DDP gives it an fp32 main gradient in the expert buffers,
reduces it over expert-data-parallel ranks and clips it with the other expert parameters, and any
optimizer over the model's parameters (Megatron's, with fp32 main params for bf16/fp16 models, or a
torch optimizer on ``main_grad``) steps on shards only. The gradient return adds the copies'
gradients to ``main_grad`` in fp32 directly when DDP provides one, in the backward of a node the
layer puts on its tokens before their dispatch (``dispatch``), so the return overlaps the
dispatch's backward all-to-all. Gathers and returns use their own process group over the EP ranks.

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

Construction. Megatron builds and initialises the stock experts as usual; the layer keeps their
tensors (moved and cast with the module) and cuts them into shards with one all-to-all on the
first of: a move or cast of the module onto a device its EP ranks communicate on
(``model.cuda()``, which Megatron-LM's ``get_model`` calls before wrapping), the first forward, or
a (sharded) state-dict call. Construction itself runs no collective, so a model may be built on the CPU and moved, or
built on the meta device (nothing to cut: Megatron-LM loads a checkpoint into such a model). A
16-bit model wrapped by DDP before its shards were cut is refused (the optimizer would have copied
placeholder values into its fp32 main parameters).

Prefetch. The FSEP layers of one model chunk (one TransformerConfig and one virtual pipeline
stage) form a chain by layer number. During the forward a layer starts the next layer's gather
before running its own experts, after running that layer's forward pre-hooks (under the
distributed optimizer with ``overlap_param_gather`` they wait for the parameter all-gather that
makes its shards current); under the ``regather`` policy its backward starts the previous layer's
backward gather. At most one prefetch per direction is in flight in a process, and the next FSEP
pass of that direction takes it (or, if it is another layer's, waits for it and drops it), so a
prefetch never outlives that pass; a forward pass inside the backward (activation recompute)
prefetches nothing, since the next forward pass is not the next layer's.

Burst copies (``--microep-burst-slots``). After the count read every rank plans the same burst
copies for the micro-batch (``planning.burst.plan_burst`` over the layout, no home or node rule, none
held from earlier micro-batches); their shards are gathered on demand, right after the decision,
beside the token dispatch, and their gradients return with the layout copies' (docs/fsep.md).
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
    ShardGradients,
    ShardSpec,
    attach_shard_gradients,
    communicates_on,
    fsep_layout,
    initial_fsep_placement,
    run_sharded_experts,
    shard_group,
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


class FSEPShardsError(RuntimeError):
    """FSEP shards that cannot be cut from the stock experts where they are (named in the message)."""


class FSEPExperts(MegatronModule):
    """One layer's experts as this EP rank's shards: ``shards`` [E, S], 1/G of every expert.

    ``home``: the stock experts of this rank (``compat.expert_tensors``), kept as non-persistent
    buffers (so that moves and casts of the module apply to them) until ``materialize`` cuts them
    into the shards; on the meta device there is nothing to cut.
    """

    def __init__(self, config, spec: ShardSpec, home, ep_rank: int, expt_dp_rank: int, ep_group):
        super().__init__(config=config)
        self.spec = spec
        self.ep_rank = ep_rank
        self.expt_dp_rank = expt_dp_rank
        self.ep_group = ep_group
        first = home[0][0]
        num_experts = len(home) * spec.num_ranks
        self.shards = torch.nn.Parameter(
            torch.empty(num_experts, spec.shard_numel, dtype=first.dtype, device=first.device)
        )
        # An expert parameter: DDP's expert buffers, reduction over expert-DP only, expert optimizer.
        self.shards.allreduce = False
        self._stock_names: list[str] = []
        if first.device.type != "meta":
            for i in range(len(spec.shapes)):
                self._stock_names.append(f"_stock_{i}")
                self.register_buffer(
                    self._stock_names[-1], torch.stack([e[i].detach() for e in home]), persistent=False
                )

    @property
    def pending(self) -> bool:
        """Whether the shards still have to be cut from the stock experts."""
        return bool(self._stock_names)

    def materialize(self) -> None:
        """Cut the stock experts into this rank's shards (one all-to-all over the EP ranks); a no-op
        once done. Call on every rank of the EP group."""
        if not self._stock_names:
            return
        device = self.shards.device
        group = shard_group(self.ep_group)
        if not communicates_on(group, device):
            raise FSEPShardsError(
                f"FSEP experts on {device} cannot be cut into shards: the EP group communicates on "
                f"{dist.get_backend_config(group)}; move the model to that device first (model.cuda())"
            )
        if getattr(self.shards, "main_grad", None) is not None and self.shards.dtype != torch.float32:
            raise FSEPShardsError(
                "FSEP experts were wrapped by DistributedDataParallel before their shards were cut: a "
                f"{self.shards.dtype} model's optimizer would keep placeholder fp32 main parameters. Move or "
                "cast the model (model.cuda(), as Megatron-LM's get_model does) before wrapping it"
            )
        stacked = [getattr(self, name) for name in self._stock_names]
        with torch.no_grad():
            self.shards.copy_(shards_from_experts(stacked, self.spec, group))
        for name in self._stock_names:
            delattr(self, name)
        self._stock_names = []

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        if self._stock_names and communicates_on(shard_group(self.ep_group), self.shards.device):
            self.materialize()
        return module

    @property
    def num_experts(self) -> int:
        return self.shards.shape[0]

    def expert_tensors(self, shards: torch.Tensor) -> dict[tuple, torch.Tensor]:
        """{(expert, tensor index, half): view [b, *rest]} of a buffer laid out like ``shards``."""
        return {(e, i, p): view for e in range(shards.shape[0]) for i, p, view in self.spec.pieces(shards[e])}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        if (metadata or {}).get("singleton_local_shards", False):
            raise NotImplementedError("FSEP experts do not support singleton_local_shards checkpoints")
        self.materialize()  # a save reads the shards (a load then overwrites them)
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

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.materialize()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(f"{prefix}{_STOCK_EXTRA_STATE}.")]:
            del state_dict[key]  # the stock linears' extra state is empty; nothing to restore
        if f"{prefix}shards" in state_dict:  # the loaded shards replace the ones to be cut
            for name in self._stock_names:
                delattr(self, name)
            self._stock_names = []
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# FSEP layers built from one TransformerConfig (by identity); a prefetch chain is those of one model chunk.
_LAYERS: dict[int, list[weakref.ref]] = {}


def _register(config, layer) -> None:
    if id(config) not in _LAYERS:
        _LAYERS[id(config)] = []
        weakref.finalize(config, _LAYERS.pop, id(config), None)
    _LAYERS[id(config)].append(weakref.ref(layer))


@dataclass
class _Prefetched:
    layer: FSEPMoELayer
    exchange: ShardExchange
    pending: PendingGather

    def drop(self) -> None:
        """Unused: let the collective every rank started finish, free its buffers, count it."""
        self.layer.prefetch_dropped += 1
        self.pending.wait()


# direction ("forward", "backward") -> the one prefetched gather in flight in this process
_IN_FLIGHT: dict[str, _Prefetched] = {}


def _in_backward() -> bool:
    """Whether autograd is running a backward here: a forward pass inside one is an activation recompute."""
    return torch._C._current_graph_task_id() != -1


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
        self.experts = FSEPExperts(config, self.fsep_spec, home, groups.ep_rank, self._expt_dp_rank, groups.ep)
        del home  # the stock module goes with it; FSEPExperts keeps the tensors until it cuts them

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
            device=self.experts.shards.device,
            name=f" layer {layer_number}",
            layer_number=layer_number,
        )
        pp_group = getattr(pg_collection, "pp", None)
        if pp_group is None:
            from megatron.core import parallel_state

            self._pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        else:
            self._pp_rank = dist.get_rank(pp_group)
        self._chunk: int | None = None
        # Gathers of this layer started by a neighbour, those it then used, those dropped unused.
        self.prefetch_started = 0
        self.prefetch_hits = 0
        self.prefetch_dropped = 0
        self._shard_exchange: ShardExchange | None = None
        self._shard_grads: ShardGradients | None = None
        # Burst copies (--microep-burst-slots): any rank may take one, whatever its node (a copy is
        # gathered from every EP rank's shard, as the layout's are), none is held past its micro-batch.
        self._burst_node_size = None
        self._burst_layout: PhysicalLayout | None = None
        self._burst_gather: tuple[ShardExchange, PendingGather] | None = None
        self.burst_copies_gathered = 0  # burst copies this rank's layer gathered (with every rank), in total
        _register(config, self)

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
        """The shard exchange of ``layout`` (built once per layout, in a forward: it copies index tensors
        to the device)."""
        if self._shard_exchange is None or self._shard_exchange.layout is not layout:
            self._shard_exchange = self._new_exchange(layout)
        return self._shard_exchange

    def _new_exchange(self, layout: PhysicalLayout, **options) -> ShardExchange:
        groups = self.microep_groups
        device = self.experts.shards.device
        return ShardExchange(
            layout, groups.ep_rank, shard_group(groups.ep), self.fsep_spec, device, memory=GATHERED_MEMORY, **options
        )

    # --- prefetch -------------------------------------------------------------------------------
    def model_chunk(self) -> int:
        """This layer's virtual pipeline stage (0 without virtual pipelining), from its layer number."""
        if self._chunk is None:
            stages = getattr(self.config, "virtual_pipeline_model_parallel_size", None) or 1
            # Chunk v of this pipeline rank starts after the layers of offset(v); offsets grow with v.
            offsets = [compat.layer_offset(self.config, v, self._pp_rank) for v in range(stages)] if stages > 1 else [0]
            self._chunk = max(v for v, offset in enumerate(offsets) if offset < self.model_layer_id)
        return self._chunk

    def _neighbour(self, offset: int) -> FSEPMoELayer | None:
        """The FSEP layer ``offset`` places away in this layer's model chunk, if any."""
        if self.layer_number is None:
            return None
        layers = [ref() for ref in _LAYERS.get(id(self.config), [])]
        chain = sorted(
            (
                m
                for m in layers
                if m is not None and m.layer_number is not None and m.model_chunk() == self.model_chunk()
            ),
            key=lambda m: m.model_layer_id,
        )
        index = chain.index(self) + offset
        return chain[index] if 0 <= index < len(chain) else None

    def _take_prefetched(self, direction: str, exchange: ShardExchange) -> PendingGather | None:
        """The gather in flight for ``direction`` if it is this layer's for ``exchange``; any other is
        waited for (every rank started it) and dropped."""
        found = _IN_FLIGHT.pop(direction, None)
        if found is None:
            return None
        if found.layer is self and found.exchange is exchange:
            self.prefetch_hits += 1
            return found.pending
        found.drop()
        return None

    def make_current(self) -> None:
        """Run the experts' forward pre-hooks: under the distributed optimizer with overlapped
        parameter all-gather, DDP's hook waits there for the all-gather that makes the shards current
        in this step (and starts it if it has not been), before anything reads them."""
        compat.sync_expert_params(self.experts)

    def _prefetch(self, target: FSEPMoELayer | None, direction: str) -> None:
        if target is None:
            return
        if direction == "forward":
            if self._step is not None and target._step != self._step:
                target._on_new_step(self._step)  # adopt its layout for this step now, as its forward would
            target.experts.materialize()
            target.make_current()
            exchange = target.exchange_for(target.layout)
        else:
            exchange = target._shard_exchange  # built in its forward; a backward builds nothing
            if exchange is None or exchange.layout is not target.layout:
                return
        if direction in _IN_FLIGHT:
            _IN_FLIGHT.pop(direction).drop()
        _IN_FLIGHT[direction] = _Prefetched(target, exchange, exchange.start_gather(target.experts.shards))
        target.prefetch_started += 1

    # --- experts --------------------------------------------------------------------------------
    def dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        # The shards' gradient is added when the backward reaches these tokens, after the dispatch's
        # backward all-to-all: the gradient return, started by the experts' backward, overlaps it.
        self._shard_grads = ShardGradients()
        hidden_states = attach_shard_gradients(hidden_states, self.experts.shards, self._shard_grads)
        return super().dispatch(hidden_states, probs)

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        grads, self._shard_grads = self._shard_grads, None
        if grads is None:
            raise RuntimeError("FSEP layer: routed_experts_compute ran without this layer's dispatch")
        tokens, _, probs = self.token_dispatcher.dispatch_postprocess(hidden_states, probs)
        burst, self._burst_gather = self._burst_gather, None
        routing = self.token_dispatcher.routing
        layout = routing.layout  # with burst copies: the layout's plus burst slots
        self.experts.materialize()
        self.make_current()
        exchange = self.exchange_for(self.layout)
        counts = list(routing.group_rows)  # rows per local slot (host values, from the schedule)
        C = self.slots_per_rank
        rows = counts[: exchange.num_local]
        if burst is not None:
            rows += counts[C : C + burst[0].num_local]
        elif layout is not self.layout:
            raise RuntimeError("FSEP layer: a micro-batch layout with burst copies but no burst gather")
        if sum(rows) != sum(counts):
            raise RuntimeError(f"empty FSEP slots were sent tokens: {counts}")
        if self._backend is None:
            fc1, fc2 = self.fsep_spec.shapes[0], self.fsep_spec.shapes[1]
            self._backend = choose_backend(
                self.microep_settings.expert_backend,
                self.experts.shards.device,
                self.experts.shards.dtype,
                [fc1[1], fc1[0], fc2[1]],
            )
        pending = self._take_prefetched("forward", exchange) or exchange.start_gather(self.experts.shards)
        if not _in_backward():
            self._prefetch(self._neighbour(+1), "forward")
        backend, math = self._backend, self._math

        per = len(self.fsep_spec.shapes)

        def run(x, p, tensors):
            # The layout's copies' tensors, then the burst copies' (per tensors each, [copies, *shape]).
            weights = [
                compat.expert_weights([t[j] for t in tensors[first : first + per]])
                for first in range(0, len(tensors), per)
                for j in range(tensors[first].shape[0])
            ]
            return run_experts(backend, x, rows, p, weights, math)

        def regather() -> PendingGather:
            own = self._take_prefetched("backward", exchange) or exchange.start_gather(self.experts.shards)
            self._prefetch(self._neighbour(-1), "backward")
            return own

        output = run_sharded_experts(
            self.microep_settings.fsep_memory_policy,
            tokens,
            probs,
            self.experts.shards,
            exchange,
            run,
            grads,
            pending,
            regather,
            burst,
        )
        return self.token_dispatcher.combine_preprocess(output), None

    # --- burst copies ---------------------------------------------------------------------------
    def _bursts_on(self, step: int | None) -> bool:
        """FSEP's burst copies live one micro-batch (gathered for it, returned by its backward), so
        they need no training step; on whenever ``--microep-burst-slots`` > 0."""
        return self.microep_settings.burst_slots > 0

    def _plan_burst(self, tokens: np.ndarray):
        layout, schedule, order = super()._plan_burst(tokens)
        self._burst_layout = layout  # the layout's copies plus the burst copies, for their exchange
        return layout, schedule, order

    def _push_burst(self) -> None:
        """Start gathering the micro-batch's burst copies (one all-to-all of their shards over the
        shard group, from the side stream): it runs beside the token dispatch and is waited for at the
        experts. Nothing is held past the micro-batch, so ``plan_burst`` never sees held copies."""
        plan, self._burst_plan = self._burst_plan, None
        layout, self._burst_layout = self._burst_layout, None
        if plan.num_held:
            raise RuntimeError("FSEP burst copies are not held across micro-batches")
        if not len(plan.copies):
            return
        self.experts.materialize()
        self.make_current()
        exchange = self._new_exchange(layout, first_slot=self.slots_per_rank, non_blocking_index=True)
        if self._burst_gather is not None:  # a forward whose experts never ran: let its gather finish
            self._burst_gather[1].wait()
        self._burst_gather = (exchange, exchange.start_gather(self.experts.shards))
        self.burst_copies_gathered += len(plan.copies)


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

    layer.experts.materialize()
    return experts_from_shards(layer.experts.shards, layer.fsep_spec, layer.microep_groups.ep)
