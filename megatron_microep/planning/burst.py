"""Burst copies: temporary expert copies chosen inside the micro-batch from its own counts.

Problem. The persistent placement comes from history; when a micro-batch sends a burst to an expert
with too few copies, the exact scheduler's optimum over that placement stays high. Each GPU has
``slots`` burst slots per step: a burst slot holds a temporary copy of any expert, pushed from the
expert's home GPU when first needed and kept (with its gradient) until the step ends, so later
micro-batches of the step reuse it. Given this micro-batch's counts, add copies until the max GPU
load is within ``tolerance`` of the mean, or no slot can help.

Method. The tolerance cap is ``T = max(ceil(total / G), floor(tolerance * total / G))``. The
scheduler routes the micro-batch over the persistent copies plus the copies already held this step;
if its max load is within T, that is the schedule and nothing is added. Otherwise its flow is
stripped down to T on every GPU (the stripped tokens become unplaced load of their experts) and a
max-flow at cap T continues from there with the scheduler's residual search and path push. When no
augmenting path is left, the reached sets are the scheduler's certificate, a Hall violator: experts
S with unplaced load, every copy of which sits on a full GPU of U, so the optimum is above T. A copy
of the expert of S with the most load per copy, on the least-loaded eligible GPU outside U (no copy
of it yet, a burst slot free, and by default in the expert's home node, so the push stays on
NVLink), gives S a way out; the flow continues from where it stood, the new copy being one more
edge. When no expert of S has an eligible GPU, no later copy can help S either, so its bound
``load(S) / |U|`` holds for the final placement and the cap rises to it, as in the scheduler. The
result: max load <= T when copies can bring it there, else the exact optimum over the extended
placement (the last raise certifies it).

Greedy choices can take the slot a later violator needed: S's only free slots are on its own full
GPUs while a GPU it could use holds an earlier new copy whose expert would fit elsewhere. When the
first such S appears, the search is run again with relocations: before any raise, such a copy moves
to a free slot (U included; its flow becomes unplaced load again) and S's expert takes its GPU. The
plan keeps the second run only if its max load is lower, so no plan gets worse (43 of 4000 random
small instances got better; no micro-batch of the bench traces reruns).

Every rank that calls ``plan_burst`` with the same counts, placement and held copies gets the same
copies and schedule: integer arithmetic (the tolerance is rounded to 1/1000), fixed iteration order,
so nothing is broadcast: the runtime can call it on every rank once per micro-batch and layer, after
the count read (the simulator's ``microep`` policy does, with ``burst_slots``).
``planning.burst_reference`` gives the best choice of copies exactly (a MIP) for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from megatron_microep.planning.placement import Placement, PlacementError
from megatron_microep.planning.scheduler import (
    Schedule,
    _check_tokens,
    _complete,
    _find_path,
    _pending_experts,
    _push_path,
    _route,
    _split_by_source,
)

NO_COPIES = np.zeros((0, 2), dtype=np.int64)
AFTER_COPY_TARGETS = 4  # GPUs with spare a search serves once copies are being added
TOLERANCE_UNIT = 1000  # the tolerance is an integer number of thousandths on the critical path


@dataclass(frozen=True)
class BurstPlan:
    """Result of one burst decision. K burst copies held after this micro-batch, N of them new.

    ``placement``: the persistent copies of each expert, then its burst copies (held, then new).
    ``copies`` int64 [K, 2]: (expert, gpu) of every burst copy, the held ones first in the order
    given, then the new ones in the order they were chosen; a GPU's burst copies in this order fill
    its burst slots 0, 1, ... (``burst_slot``). ``num_held``: ``copies[:num_held]`` were held before.
    ``pushes`` int64 [N, 2]: (home GPU, gpu) weight transfers of the new copies.
    ``schedule``: the schedule over ``placement`` (``plan_burst`` says which).
    """

    placement: Placement
    copies: np.ndarray
    num_held: int
    pushes: np.ndarray
    schedule: Schedule

    def burst_slot(self) -> np.ndarray:
        """int64 [K]: the burst slot each copy occupies on its GPU (its rank among that GPU's copies)."""
        gpu = self.copies[:, 1]
        order = np.argsort(gpu, kind="stable")
        rank = np.empty(len(gpu), dtype=np.int64)
        rank[order] = np.arange(len(gpu)) - np.searchsorted(gpu[order], gpu[order])
        return rank


@numba.njit(cache=True, nogil=True)
def _peak_and_total(gpu_load):
    """(max, sum) of gpu_load int64 [G] in one compiled call (two numpy reductions cost more)."""
    peak = 0
    total = 0
    for g in range(gpu_load.size):
        peak = max(peak, gpu_load[g])
        total += gpu_load[g]
    return peak, total


def tolerance_cap(total: int, num_gpus: int, tolerance: float) -> int:
    """The load T a GPU may carry: max(ceil(total / G), floor(tolerance * total / G)), integers only
    (``tolerance`` rounded to 1/1000)."""
    thousandths = round(tolerance * TOLERANCE_UNIT)
    return max(-(-total // num_gpus), total * thousandths // (num_gpus * TOLERANCE_UNIT))


@numba.njit(cache=True, nogil=True)
def _held_problem(held, ptr, gpus, num_gpus, slots):
    """0 if burst copies ``held`` int64 [K, 2] fit (ptr, gpus) and ``slots``; else 1: an id out of
    range, 2: a GPU over its slots, 3: a copy its GPU already holds."""
    num_experts = ptr.size - 1
    per_gpu = np.zeros(num_gpus, np.int64)
    for k in range(held.shape[0]):
        e, g = held[k, 0], held[k, 1]
        if e < 0 or e >= num_experts or g < 0 or g >= num_gpus:
            return 1
        per_gpu[g] += 1
        if per_gpu[g] > slots:
            return 2
        for r in range(ptr[e], ptr[e + 1]):
            if gpus[r] == g:
                return 3
        for j in range(k):
            if held[j, 0] == e and held[j, 1] == g:
                return 3
    return 0


_HELD_PROBLEMS = {
    1: "a burst copy names an expert or GPU outside the placement",
    2: "a GPU holds more burst copies than it has burst slots",
    3: "a burst copy duplicates a copy its GPU already holds",
}


def check_burst_copies(copies: np.ndarray, placement: Placement, slots: int) -> np.ndarray:
    """Validate burst copies int [K, 2] (expert, gpu) against ``placement`` and ``slots`` per GPU;
    returns them as int64 [K, 2]. Raises PlacementError naming the problem."""
    copies = np.ascontiguousarray(copies, dtype=np.int64).reshape(-1, 2)
    problem = len(copies) and _held_problem(copies, placement.ptr, placement.gpus, placement.num_gpus, slots)
    if problem:
        raise PlacementError(_HELD_PROBLEMS[problem])
    return copies


@numba.njit(cache=True, nogil=True)
def _extend(ptr, gpus, copies):
    """(ptr, gpus) with copies int64 [K, 2] (expert, gpu) appended to their experts' copies, in order."""
    num_experts = ptr.size - 1
    added = np.zeros(num_experts + 1, np.int64)
    for k in range(copies.shape[0]):
        added[copies[k, 0] + 1] += 1
    new_ptr = ptr.copy()
    for e in range(num_experts):
        added[e + 1] += added[e]
        new_ptr[e + 1] += added[e + 1]
    new_gpus = np.empty(new_ptr[num_experts], np.int64)
    fill = new_ptr[:-1].copy()
    for e in range(num_experts):
        for r in range(ptr[e], ptr[e + 1]):
            new_gpus[fill[e]] = gpus[r]
            fill[e] += 1
    for k in range(copies.shape[0]):
        new_gpus[fill[copies[k, 0]]] = copies[k, 1]
        fill[copies[k, 0]] += 1
    return new_ptr, new_gpus


def with_copies(placement: Placement, copies: np.ndarray) -> Placement:
    """``placement`` plus burst copies int [K, 2] (expert, gpu), each after its expert's other copies."""
    if len(copies) == 0:
        return placement
    ptr, gpus = _extend(placement.ptr, placement.gpus, np.ascontiguousarray(copies, dtype=np.int64))
    return Placement(num_gpus=placement.num_gpus, ptr=ptr, gpus=gpus)


@numba.njit(cache=True, nogil=True)
def _reverse(gpus, num_gpus):
    """GPU -> slots adjacency of ``gpus`` int64 [nnz]: (gpu_ptr int64 [G+1], gpu_slot int64 [nnz])."""
    gpu_ptr = np.zeros(num_gpus + 1, np.int64)
    for r in range(gpus.size):
        gpu_ptr[gpus[r] + 1] += 1
    for g in range(num_gpus):
        gpu_ptr[g + 1] += gpu_ptr[g]
    gpu_slot = np.empty(gpus.size, np.int64)
    fill = gpu_ptr[:-1].copy()
    for r in range(gpus.size):
        gpu_slot[fill[gpus[r]]] = r
        fill[gpus[r]] += 1
    return gpu_ptr, gpu_slot


@numba.njit(cache=True, nogil=True)
def _compact(begin, end, gpus, slot_tokens, slot_expert, gpu_slot, top, num_entries):
    """Move the slots in use below ``top`` down to 0.. (keeping their order) and renumber them in
    ``begin``, ``end`` and the ``num_entries`` entries of ``gpu_slot``; returns the new top."""
    remap = np.empty(top, np.int64)
    kept = 0
    for r in range(top):
        e = slot_expert[r]
        if begin[e] <= r < end[e]:
            remap[r] = kept
            gpus[kept] = gpus[r]
            slot_tokens[kept] = slot_tokens[r]
            slot_expert[kept] = e
            kept += 1
    for e in range(begin.size):
        if end[e] > begin[e]:
            begin[e], end[e] = remap[begin[e]], remap[end[e] - 1] + 1
    for i in range(num_entries):
        gpu_slot[i] = remap[gpu_slot[i]]
    return kept


@numba.njit(cache=True, nogil=True)
def _add_copy(begin, end, gpus, slot_tokens, slot_expert, gpu_ptr, gpu_slot, top, num_entries, expert, gpu):
    """Add one (empty) copy of ``expert`` on ``gpu`` after its other copies, renumbering no other
    slot: the expert's slots ``begin..end`` move to the unused slots from ``top`` on, the new copy
    after them, and the old ones fall out of use (an insertion into CSR arrays shifted every later
    slot, O(nnz) per copy); when the slot arrays have no room left for that, the slots in use are
    compacted first. Each GPU's list in (gpu_ptr, gpu_slot), of ``num_entries`` entries with room
    for one more, stays in expert order, the order ``_reverse`` gives a placement and the searches
    follow. Returns the new top."""
    if top + end[expert] - begin[expert] + 1 > gpus.size:
        top = _compact(begin, end, gpus, slot_tokens, slot_expert, gpu_slot, top, num_entries)
    moved = end[expert] - begin[expert]
    for i in range(moved):
        old = begin[expert] + i
        g = gpus[old]
        gpus[top + i] = g
        slot_tokens[top + i] = slot_tokens[old]
        slot_expert[top + i] = expert
        for j in range(gpu_ptr[g], gpu_ptr[g + 1]):
            if gpu_slot[j] == old:
                gpu_slot[j] = top + i
                break
    at = top + moved
    gpus[at] = gpu
    slot_tokens[at] = 0
    slot_expert[at] = expert
    begin[expert] = top
    end[expert] = at + 1
    pos = gpu_ptr[gpu + 1]
    while pos > gpu_ptr[gpu] and slot_expert[gpu_slot[pos - 1]] > expert:
        pos -= 1
    for i in range(num_entries, pos, -1):
        gpu_slot[i] = gpu_slot[i - 1]
    gpu_slot[pos] = at
    gpu_ptr[gpu + 1 :] += 1
    return at + 1


# _nrt=False: no allocation; see scheduler._find_path.
@numba.njit(cache=True, nogil=True, _nrt=False, inline="always")
def _behind(load, begin, end, e, best):
    """Whether expert ``e`` yields to ``best`` (>= 0): less load per copy, or as much and a higher id
    (load[e] / copies(e) against load[best] / copies(best), in integers)."""
    ours = load[e] * (end[best] - begin[best])
    theirs = load[best] * (end[e] - begin[e])
    return ours < theirs or (ours == theirs and e > best)


@numba.njit(cache=True, nogil=True, _nrt=False, inline="always")
def _holds(begin, end, gpus, expert, gpu):
    """Whether ``gpu`` holds a copy of ``expert`` (its slots ``begin[expert]..end[expert]-1``)."""
    for r in range(begin[expert], end[expert]):
        if gpus[r] == gpu:
            return True
    return False


@numba.njit(cache=True, nogil=True, _nrt=False)
def _eligible_gpu(expert, begin, end, gpus, seen_gpu, spare, free, node_size):
    """The least-loaded (most spare) GPU outside U that may take a burst copy of ``expert``: a slot
    free, no copy of it yet, in its home GPU's node when node_size > 0 (ties: lower id); -1 if none.
    Its copies are slots ``begin[expert]..end[expert]-1``, the home copy first."""
    lo, hi = 0, spare.size
    if node_size > 0:
        lo = (gpus[begin[expert]] // node_size) * node_size
        hi = lo + node_size
    best = -1
    for t in range(lo, hi):
        if seen_gpu[t] or free[t] == 0 or (best >= 0 and spare[t] <= spare[best]):
            continue
        if not _holds(begin, end, gpus, expert, t):
            best = t
    return best


@numba.njit(cache=True, nogil=True, _nrt=False)
def _binding_expert(load, begin, end, gpus, violator, seen_gpu, spare, free, node_size):
    """The heaviest expert of the violator S (``violator`` int64 [|S|]: its experts, in any order),
    by load per copy (ties: lower id), with an eligible GPU outside U; -1 if none. Per copy, so that
    an expert just copied yields to one that has fewer. One pass over S, not every expert: only an
    expert ahead of the best so far needs its eligibility checked."""
    best = -1
    for e in violator:
        if best >= 0 and _behind(load, begin, end, e, best):
            continue
        if _eligible_gpu(e, begin, end, gpus, seen_gpu, spare, free, node_size) >= 0:
            best = e
    return best


@numba.njit(cache=True, nogil=True)
def _move_copy(gpus, slot_tokens, slot_expert, gpu_ptr, gpu_slot, num_entries, slot, gpu):
    """Move copy ``slot`` to ``gpu`` in place, emptied, keeping its place among its expert's copies:
    its entry leaves its GPU's list in (gpu_ptr, gpu_slot), of ``num_entries`` entries, and joins
    ``gpu``'s in expert order."""
    old = gpus[slot]
    pos = gpu_ptr[old]
    while gpu_slot[pos] != slot:
        pos += 1
    for i in range(pos, num_entries - 1):
        gpu_slot[i] = gpu_slot[i + 1]
    gpu_ptr[old + 1 :] -= 1
    expert = slot_expert[slot]
    pos = gpu_ptr[gpu + 1]
    while pos > gpu_ptr[gpu] and slot_expert[gpu_slot[pos - 1]] > expert:
        pos -= 1
    for i in range(num_entries - 1, pos, -1):
        gpu_slot[i] = gpu_slot[i - 1]
    gpu_slot[pos] = slot
    gpu_ptr[gpu + 1 :] += 1
    gpus[slot] = gpu
    slot_tokens[slot] = 0


@numba.njit(cache=True, nogil=True, _nrt=False)
def _relocation(load, begin, end, gpus, violator, new, n, seen_gpu, spare, free, node_size, nowhere):
    """A way out for a violator no copy can help: a new copy (e', t) (``new[:n]``) on a GPU t outside
    U that an expert e of S may take, whose expert e' has another GPU u with a free slot (U
    included; ``nowhere``: an all-False mask). Moving (e', t) to u frees t for e. The heaviest such e
    of S (load per copy, then lower id), then the earliest such copy. Returns (e, k, u), k indexing
    ``new``; (-1, -1, -1) if none."""
    best, best_k, best_u = -1, -1, -1
    for e in violator:
        if best >= 0 and _behind(load, begin, end, e, best):
            continue
        for k in range(n):
            t = new[k, 1]
            if seen_gpu[t] or (node_size > 0 and t // node_size != gpus[begin[e]] // node_size):
                continue
            if _holds(begin, end, gpus, e, t):
                continue
            u = _eligible_gpu(new[k, 0], begin, end, gpus, nowhere, spare, free, node_size)
            if u >= 0:
                best, best_k, best_u = e, k, u
                break
    return best, best_k, best_u


@numba.njit(cache=True, nogil=True)
def _burst_copies(load, flow, ptr, gpus, num_gpus, cap, held, slots, node_size, relocate):
    """Add copies until ``load`` fits under ``cap`` or no copy helps (see the module doc).

    load int64 [E]; flow int64 [nnz]: tokens per copy of (ptr int64 [E+1], gpus int64 [nnz]) placing
    every expert's load (the scheduler's slot_tokens); held int64 [K, 2]: the burst copies among
    them, of ``slots`` per GPU; new copies must share their expert's home node of ``node_size`` GPUs
    (0: any GPU). Returns (ptr, gpus, slot_tokens, gpu_load, copies int64 [K+N, 2], pushes int64
    [N, 2], bound_num, bound_den): the extended placement (new copies (expert, gpu) after their
    expert's others, in the order chosen), its flow, whose max load is at most max(cap,
    ceil(bound_num / bound_den)), a lower bound proven for the extended placement (total / G, or
    the last violator no copy could help), the held then the new copies, the new copies' (home
    GPU, gpu) weight transfers, and whether the first violator no copy could help had a relocation
    (``_relocation``): with ``relocate`` it was made, else only reported.
    """
    num_experts = load.size
    nnz = gpus.size
    free = np.full(num_gpus, slots, np.int64)
    for k in range(held.shape[0]):
        free[held[k, 1]] -= 1
    limit = free.sum()
    # Slots in use lie anywhere below ``top``: a new copy moves its expert's slots (at most one per
    # GPU) to ``top`` (``_add_copy``); at most nnz + limit are in use, so a compaction leaves room.
    room = 2 * (nnz + limit) + num_gpus
    begin, end = ptr[:-1].copy(), ptr[1:].copy()
    gpus_room = np.empty(room, np.int64)
    gpus_room[:nnz] = gpus
    gpus = gpus_room
    slot_tokens = np.empty(room, np.int64)
    slot_tokens[:nnz] = flow
    slot_expert = np.empty(room, np.int64)
    for e in range(num_experts):
        for r in range(ptr[e], ptr[e + 1]):
            slot_expert[r] = e
    top = nnz
    # Strip every GPU down to the cap; what it sheds is unplaced load of its experts.
    gpu_load = np.zeros(num_gpus, np.int64)
    for r in range(nnz):
        gpu_load[gpus[r]] += slot_tokens[r]
    excess = np.zeros(num_experts, np.int64)
    for r in range(nnz):
        over = gpu_load[gpus[r]] - cap
        if over > 0:
            take = min(over, slot_tokens[r])
            slot_tokens[r] -= take
            gpu_load[gpus[r]] -= take
            excess[slot_expert[r]] += take
    spare = cap - gpu_load
    # Unplaced load first fills its experts' other copies that have room, then augmenting paths.
    for e in range(num_experts):
        for r in range(ptr[e], ptr[e + 1]):
            take = min(excess[e], spare[gpus[r]])
            slot_tokens[r] += take
            spare[gpus[r]] -= take
            excess[e] -= take
    gpu_ptr, reversed_slots = _reverse(gpus[:nnz], num_gpus)
    gpu_slot = np.empty(nnz + limit, np.int64)
    gpu_slot[:nnz] = reversed_slots
    num_entries = nnz
    seen_expert = np.zeros(num_experts, np.bool_)
    seen_gpu = np.zeros(num_gpus, np.bool_)
    via_slot_gpu = np.empty(num_gpus, np.int64)
    via_slot_expert = np.empty(num_experts, np.int64)
    queue = np.empty(num_experts, np.int64)
    all_targets = np.empty(num_gpus, np.int64)
    new = np.empty((limit, 2), np.int64)
    keep = np.zeros(room, np.int64)  # nothing is protected
    pending, num_pending = _pending_experts(excess)  # excess only falls from here, but at a relocation
    fresh = np.full(3, -1, np.int64)  # every search starts afresh (several targets, one tree each)
    n = 0
    bound_num = 0
    for e in range(num_experts):
        bound_num += load[e]
    bound_den = num_gpus
    cap_raised = False
    relocatable = False
    nowhere = np.zeros(num_gpus, np.bool_)
    while True:
        # Before the first copy the unplaced load is spread wide, and serving every GPU with
        # spare a search reaches pays; after it, paths run through the new copy, so a search
        # stops at a few (the later pushes of a wide search mostly find the path used up).
        targets = all_targets if n == 0 else all_targets[:AFTER_COPY_TARGETS]
        found = _find_path(
            excess,
            spare,
            slot_tokens,
            keep,
            begin,
            end,
            gpus,
            slot_expert,
            gpu_ptr,
            gpu_slot,
            seen_expert,
            seen_gpu,
            via_slot_gpu,
            via_slot_expert,
            queue,
            targets,
            pending,
            num_pending,
            fresh,
        )
        fresh[0] = -1
        if found > 0:
            for i in range(found):
                _push_path(
                    targets[i], excess, spare, slot_tokens, keep, gpus, slot_expert, via_slot_gpu, via_slot_expert
                )
            continue
        left = False
        for i in range(num_pending[0]):
            if excess[pending[i]] > 0:
                left = True
                break
        if not left:
            # The extended placement in CSR form, expert by expert.
            out_ptr = np.empty(num_experts + 1, np.int64)
            out_gpus = np.empty(num_entries, np.int64)
            out_tokens = np.empty(num_entries, np.int64)
            gpu_load[:] = 0
            out_ptr[0] = 0
            k = 0
            for e in range(num_experts):
                for r in range(begin[e], end[e]):
                    out_gpus[k] = gpus[r]
                    out_tokens[k] = slot_tokens[r]
                    gpu_load[gpus[r]] += slot_tokens[r]
                    k += 1
                out_ptr[e + 1] = k
            copies = np.empty((held.shape[0] + n, 2), np.int64)
            copies[: held.shape[0]] = held
            copies[held.shape[0] :] = new[:n]
            pushes = np.empty((n, 2), np.int64)
            for k in range(n):
                pushes[k, 0] = gpus[begin[new[k, 0]]]
                pushes[k, 1] = new[k, 1]
            return out_ptr, out_gpus, out_tokens, gpu_load, copies, pushes, bound_num, bound_den, relocatable
        # Hall violator (S = seen experts, U = seen GPUs): the certificate names what binds.
        violator = queue[: fresh[1]]
        e = _binding_expert(load, begin, end, gpus, violator, seen_gpu, spare, free, node_size)
        t = -1
        if e < 0 and not cap_raised:
            # The slots S could use hold new copies that fit elsewhere: move one (before any raise,
            # so that every raise's bound still holds for the final placement).
            e, k, u = _relocation(load, begin, end, gpus, violator, new, n, seen_gpu, spare, free, node_size, nowhere)
            relocatable = relocatable or e >= 0
            if not relocate:
                e = -1
            if e >= 0:
                moved, t = new[k, 0], new[k, 1]
                slot = begin[moved]
                while gpus[slot] != t:
                    slot += 1
                excess[moved] += slot_tokens[slot]
                spare[t] += slot_tokens[slot]
                _move_copy(gpus, slot_tokens, slot_expert, gpu_ptr, gpu_slot, num_entries, slot, u)
                take = min(excess[moved], spare[u])
                slot_tokens[slot] = take
                spare[u] -= take
                excess[moved] -= take
                free[u] -= 1
                free[t] += 1
                new[k, 1] = u
                pending, num_pending = _pending_experts(excess)
        if e < 0:
            # No copy can help S now or later: its bound holds for the final placement.
            bound_num = 0
            bound_den = 0
            for e2 in range(num_experts):
                if seen_expert[e2]:
                    bound_num += load[e2]
            for g in range(num_gpus):
                if seen_gpu[g]:
                    bound_den += 1
            cap_raised = True
            raised = -(-bound_num // bound_den)
            spare += raised - cap
            cap = raised
            continue
        if t < 0:
            t = _eligible_gpu(e, begin, end, gpus, seen_gpu, spare, free, node_size)
        top = _add_copy(begin, end, gpus, slot_tokens, slot_expert, gpu_ptr, gpu_slot, top, num_entries, e, t)
        num_entries += 1
        take = min(excess[e], spare[t])
        slot_tokens[end[e] - 1] = take
        spare[t] -= take
        excess[e] -= take
        free[t] -= 1
        new[n, 0] = e
        new[n, 1] = t
        n += 1


def plan_burst(
    tokens: np.ndarray,
    placement: Placement,
    held: np.ndarray,
    slots: int,
    node_size: int | None,
    tolerance: float,
) -> BurstPlan:
    """Burst copies and the schedule for one micro-batch and layer.

    tokens int [G, E]: this micro-batch's routed counts. placement: the persistent placement.
    held int [K, 2]: (expert, gpu) burst copies already pushed earlier in this step (reused first:
    they are part of the placement routed). slots: burst slots per GPU, held copies included.
    node_size: new copies stay in their expert's home node of this many GPUs (None: anywhere).
    tolerance: add copies only while the max load is above ``tolerance_cap`` (1.0: aim at perfect
    balance).

    Without new copies the schedule is ``scheduler.schedule``'s over the persistent and held copies.
    With new copies it is the search's own flow (max load at most T, or the exact optimum over the
    extended placement when that is above T; ``lower_bound`` is the bound the search proved), each
    copy's quota filled from its own GPU's tokens first (``scheduler.split_by_source``).
    """
    if slots < 0:
        raise ValueError(f"slots must be >= 0, got {slots}")
    if tolerance < 1.0:
        raise ValueError(f"tolerance must be >= 1, got {tolerance}")
    num_gpus = placement.num_gpus
    if node_size is not None and (node_size < 1 or num_gpus % node_size):
        raise ValueError(f"node_size={node_size} must be >= 1 and divide num_gpus={num_gpus}")
    held = check_burst_copies(held, placement, slots)
    current = with_copies(placement, held)
    tokens = _check_tokens(tokens, current)
    load = tokens.sum(axis=0)
    routed = _route(load, tokens, current.ptr, current.gpus, num_gpus, 0)
    peak, total = _peak_and_total(routed[1])
    cap = tolerance_cap(total, num_gpus, tolerance)
    if peak <= cap or len(held) == num_gpus * slots:
        return BurstPlan(current, held, len(held), NO_COPIES, _complete(tokens, current, load, routed))
    args = (load, routed[0], current.ptr, current.gpus, num_gpus, cap, held, slots, node_size or 0)
    ptr, gpus, slot_tokens, gpu_load, copies, pushes, num, den, relocatable = _burst_copies(*args, False)
    if relocatable:
        moved = _burst_copies(*args, True)
        if moved[3].max() < gpu_load.max():
            ptr, gpus, slot_tokens, gpu_load, copies, pushes, num, den, _ = moved
    if len(pushes) == 0:
        return BurstPlan(current, held, len(held), NO_COPIES, _complete(tokens, current, load, routed))
    src, slot, count, remote = _split_by_source(tokens, slot_tokens, ptr, gpus)
    flow = Schedule(int(gpu_load.max()), gpu_load, num / den, int(remote), slot_tokens, src, slot, count)
    extended = Placement(num_gpus=num_gpus, ptr=ptr, gpus=gpus)
    return BurstPlan(extended, copies, len(held), pushes, flow)
