"""The one interface every balancing policy implements, and what they share.

A policy answers two questions at two rates (see docs/simulator.md):

* ``place(history, current) -> Placement``: which GPUs hold a copy of each expert. Called at step
  boundaries every ``replan_interval`` steps, off the critical path, from the recent routing only.
* ``assign(tokens, placement) -> Assignment``: where the tokens of one micro-batch and layer are
  processed, given int64 [G, E] routed counts. Called every micro-batch and layer.

Policies are pure numpy (numba where a loop sits on the critical path), so the trace simulator and
the training runtime call the same objects. Each policy keeps its parameters in a frozen dataclass
``Params`` whose field docs are its documented parameters; ``make_policy`` validates them by name.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numba
import numpy as np

from megatron_microep.planning.history import LoadHistory
from megatron_microep.planning.placement import Placement
from megatron_microep.planning.scheduler import split_by_source


class PolicyError(ValueError):
    """Bad policy parameters or an input a policy cannot take (named in the message)."""


@dataclass(frozen=True)
class Layout:
    """The EP group a policy balances.

    ``redundant_slots`` R: extra expert copies each GPU may hold beyond its home experts (the memory
    budget every replicating or moving policy shares). ``gpus_per_node``: GPUs per NVLink domain;
    it must divide ``num_gpus``; ``None`` means one node.
    """

    num_gpus: int
    num_experts: int
    redundant_slots: int = 0
    gpus_per_node: int | None = None

    def __post_init__(self):
        if self.num_gpus < 1:
            raise PolicyError(f"num_gpus must be >= 1, got {self.num_gpus}")
        if self.num_experts < 1:
            raise PolicyError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.redundant_slots < 0:
            raise PolicyError(f"redundant_slots must be >= 0, got {self.redundant_slots}")
        gpn = self.gpus_per_node
        if gpn is not None and (gpn < 1 or self.num_gpus % gpn):
            raise PolicyError(f"gpus_per_node={gpn} must be >= 1 and divide num_gpus={self.num_gpus}")

    @property
    def node_size(self) -> int:
        return self.gpus_per_node or self.num_gpus

    @property
    def num_nodes(self) -> int:
        return self.num_gpus // self.node_size

    @property
    def home_slots(self) -> int:
        """Most home experts on one GPU under the contiguous layout."""
        return -(-self.num_experts // self.num_gpus)

    @property
    def slot_limit(self) -> int:
        """Most physical experts (home + extra) any GPU may hold."""
        return self.home_slots + self.redundant_slots

    def node_of(self, gpus: np.ndarray) -> np.ndarray:
        return np.asarray(gpus) // self.node_size

    def contiguous(self) -> Placement:
        return Placement.contiguous(self.num_experts, self.num_gpus)

    def home(self) -> np.ndarray:
        """int64 [E]: each expert's home GPU (Megatron's contiguous layout)."""
        return np.arange(self.num_experts, dtype=np.int64) * self.num_gpus // self.num_experts


@dataclass(frozen=True)
class History:
    """Recent routing of one layer, oldest first.

    expert_loads int64 [S, E]: per-micro-batch expert totals of the last S micro-batches.
    step_tokens int64 [T, G, E]: per-source counts summed over each of the last T complete steps.
    loads: the expert totals in per-step blocks (the runtime's history type).
    """

    expert_loads: np.ndarray
    step_tokens: np.ndarray
    loads: LoadHistory


class HistoryWindow:
    """Bounded record of one layer's routing: the last ``micro_batches`` expert-load vectors (a
    ``planning.history.LoadHistory``, the runtime's history type, in whole steps) and the per-source
    sums of the last ``steps`` completed steps. Memory is O((micro_batches + steps) * G * E)."""

    def __init__(self, num_gpus: int, num_experts: int, micro_batches: int, steps: int):
        if micro_batches < 1 or steps < 1:
            raise PolicyError(f"history window must keep >= 1 micro-batch and step, got {micro_batches}, {steps}")
        self.micro_batches = micro_batches
        self.loads = LoadHistory(num_experts, micro_batches=micro_batches)
        self._steps = np.zeros((steps, num_gpus, num_experts), dtype=np.int64)
        self._num_steps = 0
        self._current = np.zeros((num_gpus, num_experts), dtype=np.int64)
        self._current_used = False

    def push(self, tokens: np.ndarray) -> None:
        """Record one micro-batch's int64 [G, E] counts."""
        self.loads.record(tokens.sum(axis=0))
        self._current += tokens
        self._current_used = True

    def end_step(self) -> None:
        self.loads.end_step()
        if not self._current_used:
            return
        self._steps = np.roll(self._steps, -1, axis=0)
        self._steps[-1] = self._current
        self._num_steps = min(self._num_steps + 1, len(self._steps))
        self._current = np.zeros_like(self._current)
        self._current_used = False

    @property
    def empty(self) -> bool:
        return len(self.loads) == 0 and len(self.loads.current()) == 0

    def view(self) -> History:
        """The completed steps and the rows of the step in progress (policies plan at step boundaries,
        where the step in progress has none)."""
        rows = np.concatenate([self.loads.window(), self.loads.current()])
        return History(
            expert_loads=rows[len(rows) - min(self.micro_batches, len(rows)) :],
            step_tokens=self._steps[len(self._steps) - self._num_steps :],
            loads=self.loads,
        )


@dataclass(frozen=True)
class Assignment:
    """Where one micro-batch's tokens of one layer are processed.

    ``tokens`` int64 [G, E]: the routed counts distributed (the input, except for ``ideal``, which
    replaces it by force-balanced routing with the same per-source totals).
    ``placement``: the copies in effect for this micro-batch (policies that move or add copies per
    micro-batch return an extended placement). A single-copy expert's tokens all run on its copy.
    ``slot_tokens`` int64 [nnz]: tokens each copy processes.
    Pieces cover experts with more than one copy: ``piece_count[p]`` tokens of GPU ``piece_src[p]``
    run on copy ``piece_slot[p]``.
    ``weight_moves`` int64 [K, 2]: (from GPU, to GPU) of every expert's weights sent for this
    micro-batch before its experts run (LLEP spills, BalanceMoE moves, UltraEP replica pushes).
    ``step_copies`` int64 [K, 2]: (expert, gpu) of the copies in ``placement`` that are kept until
    the end of the step (MicroEP's burst copies); the ones the previous micro-batch of the step did
    not hold are pushed from their expert's home GPU beside the dispatch all-to-all, and their
    gradients go home once per step.
    ``gathered_copies`` int64 [K, 2]: (expert, gpu) of the copies in ``placement`` gathered from
    shards for this micro-batch alone, on demand after the count read (MicroEP's FSEP burst copies);
    the rest of a fully sharded policy's placement is its prefetched layout.
    """

    tokens: np.ndarray
    placement: Placement
    slot_tokens: np.ndarray
    piece_src: np.ndarray
    piece_slot: np.ndarray
    piece_count: np.ndarray
    weight_moves: np.ndarray
    step_copies: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    gathered_copies: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))

    def gpu_load(self) -> np.ndarray:
        """int64 [G]: tokens each GPU processes."""
        return np.bincount(self.placement.gpus, weights=self.slot_tokens, minlength=self.placement.num_gpus).astype(
            np.int64
        )


NO_MOVES = np.zeros((0, 2), dtype=np.int64)
_EMPTY = np.zeros(0, dtype=np.int64)


def single_copy_assignment(tokens: np.ndarray, placement: Placement, weight_moves: np.ndarray = NO_MOVES) -> Assignment:
    """Every expert has exactly one copy: all its tokens run there."""
    if placement.num_slots != placement.num_experts:
        raise PolicyError("single_copy_assignment needs exactly one copy per expert")
    return Assignment(tokens, placement, tokens.sum(axis=0), _EMPTY, _EMPTY, _EMPTY, weight_moves)


def quota_assignment(
    tokens: np.ndarray, placement: Placement, slot_tokens: np.ndarray, weight_moves: np.ndarray = NO_MOVES
) -> Assignment:
    """Per-copy quotas ``slot_tokens`` int64 [nnz] -> an Assignment; sources fill quotas local-first
    (a copy takes its own GPU's tokens first), then in source order (the scheduler's split)."""
    src, slot, count, _ = split_by_source(tokens, slot_tokens, placement)
    return Assignment(tokens, placement, slot_tokens, src, slot, count, weight_moves)


@numba.njit(cache=True, nogil=True)
def _even_split(tokens, ptr, gpus, node_size):
    """Pieces of the even split (see ``even_split_assignment``); node_size 0 means one node.
    Returns (piece_src, piece_slot, piece_count, slot_tokens)."""
    num_gpus, num_experts = tokens.shape
    bound = 0
    for e in range(num_experts):
        if ptr[e + 1] - ptr[e] > 1:
            bound += num_gpus * (ptr[e + 1] - ptr[e])
    src = np.empty(bound, np.int64)
    slot = np.empty(bound, np.int64)
    count = np.empty(bound, np.int64)
    slot_tokens = np.zeros(gpus.size, np.int64)
    usable = np.empty(gpus.size, np.int64)
    n = 0
    for e in range(num_experts):
        start, stop = ptr[e], ptr[e + 1]
        if stop - start == 1:
            for s in range(num_gpus):
                slot_tokens[start] += tokens[s, e]
            continue
        for s in range(num_gpus):
            t = tokens[s, e]
            if t == 0:
                continue
            k = 0
            if node_size > 0:
                for r in range(start, stop):
                    if gpus[r] // node_size == s // node_size:
                        usable[k] = r
                        k += 1
            if k == 0:
                for r in range(start, stop):
                    usable[k] = r
                    k += 1
            base = t // k
            rem = t - base * k
            for j in range(k):
                share = base + (1 if (j - s) % k < rem else 0)
                if share > 0:
                    src[n] = s
                    slot[n] = usable[j]
                    count[n] = share
                    slot_tokens[usable[j]] += share
                    n += 1
    return src[:n], slot[:n], count[:n], slot_tokens


def even_split_assignment(tokens: np.ndarray, placement: Placement, node_size: int | None = None) -> Assignment:
    """Each source splits its tokens of an expert evenly over the expert's copies (remainders go to
    copies in an order rotated by the source id, so no copy is favoured). With ``node_size``, a source
    uses only the copies in its own node when there are any (LAER's intra-node split).

    tokens int64 [G, E] -> Assignment with pieces for every multi-copy expert.
    """
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    src, slot, count, slot_tokens = _even_split(tokens, placement.ptr, placement.gpus, node_size or 0)
    return Assignment(tokens, placement, slot_tokens, src, slot, count, NO_MOVES)


def check_placement(placement: Placement, layout: Layout, policy: str) -> None:
    """Raise PolicyError if ``placement`` does not fit ``layout``: an expert without a copy, two copies
    on one GPU, or a GPU over the slot limit."""
    if placement.num_gpus != layout.num_gpus or placement.num_experts != layout.num_experts:
        raise PolicyError(
            f"{policy}: placement is for {placement.num_gpus} GPUs x {placement.num_experts} experts, "
            f"layout is {layout.num_gpus} x {layout.num_experts}"
        )
    counts = placement.replica_counts()
    if (counts < 1).any():
        raise PolicyError(f"{policy}: expert {int(np.flatnonzero(counts < 1)[0])} has no copy")
    per_gpu = placement.slots_per_gpu()
    if per_gpu.max(initial=0) > layout.slot_limit:
        g = int(per_gpu.argmax())
        raise PolicyError(f"{policy}: GPU {g} holds {int(per_gpu[g])} experts, limit {layout.slot_limit}")
    expert_of_slot = np.repeat(np.arange(placement.num_experts), counts)
    pairs = expert_of_slot * layout.num_gpus + placement.gpus
    if len(np.unique(pairs)) != len(pairs):
        raise PolicyError(f"{policy}: an expert has two copies on one GPU")


class Policy(ABC):
    """Base class: subclasses set ``name``, a frozen ``Params`` dataclass, and implement ``assign``
    (and ``place`` if they re-plan from history)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    #: Re-plans from history (``place`` is meaningful); ``replan_interval`` is then a parameter.
    replans: ClassVar[bool] = False
    #: Its per-micro-batch decision sits on the critical path (its wall time is charged per call).
    decides_per_micro_batch: ClassVar[bool] = False
    #: Copies it adds in ``assign`` are temporary: their gradients go back to the owner every micro-batch.
    temporary_copies: ClassVar[bool] = False
    #: Copies it adds in ``assign`` persist to the next micro-batch of the same step (UltraEP's cache).
    keeps_assign_placement: ClassVar[bool] = False
    #: Experts are fully sharded (FSEP): every step gathers each layout's weights from shards.
    fully_sharded: ClassVar[bool] = False
    #: Copies cost nothing to keep in sync (only the ``ideal`` bound).
    weightless: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Params:
        pass

    def __init__(self, layout: Layout, params: Policy.Params):
        self.layout = layout
        self.params = params

    # History a policy needs kept (micro-batches, steps); the engine keeps the max over policies.
    def history_needs(self) -> tuple[int, int]:
        return (1, 1)

    @property
    def replan_interval(self) -> int:
        return int(getattr(self.params, "replan_interval", 0)) if self.replans else 0

    def initial_placement(self) -> Placement:
        """The placement before any history exists: Megatron's contiguous layout."""
        return self.layout.contiguous()

    def place(self, history: History, current: Placement) -> Placement:
        return current

    @abstractmethod
    def assign(self, tokens: np.ndarray, placement: Placement) -> Assignment: ...

    def assign_in_step(self, tokens: np.ndarray, placement: Placement, held: np.ndarray) -> Assignment:
        """``assign`` inside a step: ``held`` int64 [K, 2] is the ``step_copies`` of the previous
        micro-batch of the same step (empty at its first). Policies without step copies ignore it."""
        return self.assign(tokens, placement)


def build_params(cls: type[Policy], values: Mapping[str, Any]) -> Policy.Params:
    """Validate ``values`` against ``cls.Params``: unknown names and wrong types raise PolicyError."""
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise PolicyError(f"{cls.name}: unknown parameter {unknown[0]!r} (known: {known})")
    converted = {}
    for key, value in values.items():
        default = fields[key].default
        kind = type(default)
        try:
            if kind is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                converted[key] = value.lower() in ("true", "1")
            elif kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                converted[key] = int(value)
            elif kind is float:
                converted[key] = float(value)
            else:
                converted[key] = value
        except (TypeError, ValueError):
            raise PolicyError(f"{cls.name}: parameter {key} must be {kind.__name__}, got {value!r}") from None
    params = cls.Params(**converted)
    validate = getattr(params, "validate", None)
    if validate is not None:
        validate()
    return params


def parameter_docs(cls: type[Policy]) -> list[tuple[str, Any, str]]:
    """(name, default, description) of each parameter, from the Params field metadata."""
    return [(f.name, f.default, f.metadata.get("doc", "")) for f in dataclasses.fields(cls.Params)]


def param(default: Any, doc: str):
    """A documented policy parameter."""
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Traffic:
    """Tokens each GPU sends and receives in one all-to-all, split by link (int64 [G] each).
    Tokens processed on their own source GPU are not sent."""

    send_intra: np.ndarray
    send_inter: np.ndarray
    recv_intra: np.ndarray
    recv_inter: np.ndarray

    @property
    def remote_tokens(self) -> int:
        return int(self.send_intra.sum() + self.send_inter.sum())

    @property
    def inter_node_tokens(self) -> int:
        return int(self.send_inter.sum())


@numba.njit(cache=True, nogil=True)
def _traffic(tokens, ptr, gpus, piece_src, piece_slot, piece_count, node_size):
    num_gpus, num_experts = tokens.shape
    send_intra = np.zeros(num_gpus, np.int64)
    send_inter = np.zeros(num_gpus, np.int64)
    recv_intra = np.zeros(num_gpus, np.int64)
    recv_inter = np.zeros(num_gpus, np.int64)
    for e in range(num_experts):
        if ptr[e + 1] - ptr[e] != 1:
            continue
        g = gpus[ptr[e]]
        for s in range(num_gpus):
            n = tokens[s, e]
            if n == 0 or s == g:
                continue
            if s // node_size == g // node_size:
                send_intra[s] += n
                recv_intra[g] += n
            else:
                send_inter[s] += n
                recv_inter[g] += n
    for p in range(piece_src.size):
        s = piece_src[p]
        g = gpus[piece_slot[p]]
        n = piece_count[p]
        if s == g:
            continue
        if s // node_size == g // node_size:
            send_intra[s] += n
            recv_intra[g] += n
        else:
            send_inter[s] += n
            recv_inter[g] += n
    return send_intra, send_inter, recv_intra, recv_inter


def traffic(assignment: Assignment, node_size: int) -> Traffic:
    """Per-GPU all-to-all token counts of ``assignment``; GPUs ``[k*node_size, (k+1)*node_size)`` share a
    node. Single-copy experts send all their tokens to their one copy; multi-copy experts by pieces."""
    placement = assignment.placement
    return Traffic(
        *_traffic(
            np.ascontiguousarray(assignment.tokens, dtype=np.int64),
            placement.ptr,
            placement.gpus,
            assignment.piece_src,
            assignment.piece_slot,
            assignment.piece_count,
            node_size,
        )
    )
