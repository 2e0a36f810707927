"""The exact per-micro-batch token scheduler (MicroEP's min-max solve).

Problem. ``tokens[s, e]`` tokens on GPU ``s`` are routed to logical expert ``e``; expert ``e`` has
copies on the GPUs ``placement.copies(e)``. Assign every token to one copy of its expert so that
the largest GPU load is as small as possible; among such assignments keep tokens on their source
GPU where the local-first pass can.

Method. Summed over sources this is a bipartite flow (experts -> GPUs holding them), so the LP's
integral optimum is ``ceil`` of its value. Experts with one copy are fixed load on their GPU; only
replicated experts are routed by the flow. Starting from the bound ``max(max fixed, total / G)``,
a max-flow is completed by BFS augmenting paths; when no augmenting path exists, the residual
reachable set (experts S, GPUs U = every GPU holding an expert of S) is a Hall violator and
``(load(S) + fixed(U)) / |U|`` is a strictly larger proven lower bound. Raising the GPU capacities
to its ceiling and continuing from the current flow terminates at a feasible flow whose max load
equals the last bound: optimal, with the certificate returned as ``lower_bound``.

Every rank that runs this on the same counts gets the same answer (integer arithmetic, fixed
iteration order), so nothing needs to be broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from megatron_microep.planning.placement import Placement


@dataclass(frozen=True)
class Schedule:
    """Result of one solve. Shapes: G GPUs, E experts, nnz physical copies (slots), P pieces.

    Slot ``r`` is ``placement.gpus[r]``; copies of expert ``e`` are slots ``ptr[e]..ptr[e+1]-1``.
    Pieces cover replicated experts only: ``piece_count[p]`` tokens of GPU ``piece_src[p]`` go to
    slot ``piece_slot[p]``. A single-copy expert's tokens all go to its one slot.
    """

    max_load: int
    gpu_load: np.ndarray  # int64 [G]
    lower_bound: float  # proven: ceil(lower_bound) <= optimal max load
    remote_tokens: int  # tokens processed on a GPU other than their source
    slot_tokens: np.ndarray  # int64 [nnz]
    piece_src: np.ndarray  # int64 [P]
    piece_slot: np.ndarray  # int64 [P]
    piece_count: np.ndarray  # int64 [P]

    def source_split(self, tokens: np.ndarray, placement: Placement, source: int) -> np.ndarray:
        """int64 [nnz]: tokens GPU ``source`` sends to each slot (its all-to-all send plan)."""
        split = np.zeros(placement.num_slots, dtype=np.int64)
        single = placement.replica_counts() == 1
        split[placement.ptr[:-1][single]] = tokens[source, single]
        mine = self.piece_src == source
        np.add.at(split, self.piece_slot[mine], self.piece_count[mine])
        return split

    def assignment(self, tokens: np.ndarray, placement: Placement) -> list[list[int]]:
        """Every non-empty (source, expert, gpu, count), single-copy experts included."""
        slot_expert = np.repeat(np.arange(placement.num_experts), placement.replica_counts())
        rows: list[list[int]] = []
        for e in np.flatnonzero(placement.replica_counts() == 1):
            home = int(placement.gpus[placement.ptr[e]])
            for s in np.flatnonzero(tokens[:, e]):
                rows.append([int(s), int(e), home, int(tokens[s, e])])
        for s, r, n in zip(self.piece_src, self.piece_slot, self.piece_count):
            rows.append([int(s), int(slot_expert[r]), int(placement.gpus[r]), int(n)])
        rows.sort()
        return rows


def _ceil_div(num: int, den: int) -> int:
    return -(-num // den)


_ceil_div_jit = numba.njit(cache=True, nogil=True)(_ceil_div)

# numba wraps a negative signed index around (a compare and an add on every array access) but uses
# an unsigned one as is; every index in the search's and the push's loops is a slot, GPU, expert or
# queue position (never negative), so they index through ``_ix`` (about a tenth of the route's time).
_ix = np.uint64


@numba.njit(cache=True, nogil=True, inline="always")
def _expand(g, tail, slot_tokens, keep, slot_expert, gpu_ptr, gpu_slot, seen_expert, via_slot_expert, queue):
    """Queue the unseen experts that full GPU ``g``'s flow above ``keep`` leads back to; the new tail."""
    for i in range(gpu_ptr[_ix(g)], gpu_ptr[_ix(g + 1)]):
        r2 = gpu_slot[_ix(i)]
        e2 = slot_expert[_ix(r2)]
        if slot_tokens[_ix(r2)] > keep[_ix(r2)] and not seen_expert[_ix(e2)]:
            seen_expert[_ix(e2)] = True
            via_slot_expert[_ix(e2)] = r2
            queue[_ix(tail)] = e2
            tail += 1
    return tail


@numba.njit(cache=True, nogil=True)
def _pending_experts(excess):
    """The experts with unplaced load ``excess`` int64 [E] > 0, in id order, as ``_find_path`` takes
    them: (pending int64 [E], num_pending int64 [1])."""
    pending = np.empty(excess.size, np.int64)
    num_pending = np.zeros(1, np.int64)
    for e in range(excess.size):
        if excess[e] > 0:
            pending[num_pending[0]] = e
            num_pending[0] += 1
    return pending, num_pending


# _nrt=False (here and in _push_path; neither allocates): without numba's runtime a call does not
# take and drop an atomic reference on each of its array arguments, about a tenth of the time of
# the route and of the burst kernel, which call these hundreds of times per micro-batch.
@numba.njit(cache=True, nogil=True, _nrt=False)
def _find_path(
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
    frontier,
):
    """BFS from every expert with unplaced load to GPUs with spare capacity.

    Expert e's copies are slots ``begin[e]..end[e]-1`` (``ptr[:-1]``, ``ptr[1:]`` of a placement;
    the burst kernel moves an expert's slots when it adds a copy).

    Forward edges expert -> GPU are unbounded; backward edges GPU -> expert carry the flow of a
    copy above its ``keep`` amount. Lists the GPUs with spare it reaches in ``targets`` (BFS order,
    stopping once ``targets`` is full) and returns how many; leaves the search tree in
    ``via_slot_*`` and the reached sets in ``seen_*``. When it finds none, the reached sets are a
    Hall violator: experts S with unplaced load whose copies all sit on full GPUs U.
    ``pending[:num_pending[0]]`` lists, in id order, every expert that may still have unplaced load
    (a caller's excess only ever falls); the search drops those that have none left.
    ``frontier`` int64 [3]: where a search that filled ``targets`` stopped (queue head, tail, the
    last target's slot), else -1 in [0]. A caller passes it back unchanged to resume that search,
    with ``targets`` of one, when the push to its target filled the target and left the rest of the
    state as it was (``_push_path`` says so): a fresh search would retrace the same tree up to
    there, then expand the now-full target. frontier[0] = -1 searches afresh. A search that ends
    without filling ``targets`` leaves frontier[1] = how many experts it reached (``queue`` lists them).
    """
    found = 0
    if frontier[0] < 0:
        seen_expert[:] = False
        seen_gpu[:] = False
        tail = 0
        for i in range(num_pending[0]):
            e = pending[i]
            if excess[e] > 0:
                pending[tail] = e
                seen_expert[e] = True
                via_slot_expert[e] = -1
                queue[tail] = e
                tail += 1
        num_pending[0] = tail
        head = 0
    else:
        # Resume: expand the now-full last target, then the rest of the copies of its expert (a loop
        # of its own: folded into the one below, the burst kernel ran up to 7% slower).
        head, tail, last = frontier[0], frontier[1], frontier[2]
        tail = _expand(
            gpus[last], tail, slot_tokens, keep, slot_expert, gpu_ptr, gpu_slot, seen_expert, via_slot_expert, queue
        )
        for r in range(last + 1, end[slot_expert[last]]):
            g = gpus[r]
            if seen_gpu[g]:
                continue
            seen_gpu[g] = True
            via_slot_gpu[g] = r
            if spare[g] > 0:
                targets[0] = g
                frontier[2] = r
                frontier[1] = tail
                return 1
            tail = _expand(
                g, tail, slot_tokens, keep, slot_expert, gpu_ptr, gpu_slot, seen_expert, via_slot_expert, queue
            )
    while head < tail:
        e = queue[_ix(head)]
        head += 1
        for r in range(begin[_ix(e)], end[_ix(e)]):
            g = gpus[_ix(r)]
            if seen_gpu[_ix(g)]:
                continue
            seen_gpu[_ix(g)] = True
            via_slot_gpu[_ix(g)] = r
            if spare[_ix(g)] > 0:
                targets[found] = g
                found += 1
                if found == targets.size:
                    frontier[0] = head
                    frontier[1] = tail
                    frontier[2] = r
                    return found
                continue
            tail = _expand(
                g, tail, slot_tokens, keep, slot_expert, gpu_ptr, gpu_slot, seen_expert, via_slot_expert, queue
            )
    frontier[0] = -1
    frontier[1] = tail
    return found


@numba.njit(cache=True, nogil=True, _nrt=False)
def _push_path(target, excess, spare, slot_tokens, keep, gpus, slot_expert, via_slot_gpu, via_slot_expert):
    """Push the bottleneck amount along ``_find_path``'s search tree to GPU ``target``.

    Walks back to the root expert measuring the bottleneck (spare of the target, excess of the
    root, flow above ``keep`` on every backward edge), then moves that much along the path. A path
    an earlier push along the same tree used up is left at the first empty edge. Returns whether
    the target's spare alone was the bottleneck (the root and every backward edge keep some).
    """
    push = spare[target]
    by_target = True
    g = target
    while True:
        e = slot_expert[_ix(via_slot_gpu[_ix(g)])]
        back = via_slot_expert[_ix(e)]
        if back < 0:
            if excess[_ix(e)] <= push:
                push = excess[_ix(e)]
                by_target = False
            break
        if slot_tokens[_ix(back)] - keep[_ix(back)] <= push:
            push = slot_tokens[_ix(back)] - keep[_ix(back)]
            by_target = False
            if push <= 0:
                return False
        g = gpus[_ix(back)]
    if push <= 0:
        return False
    g = target
    while True:
        r = via_slot_gpu[_ix(g)]
        slot_tokens[_ix(r)] += push
        e = slot_expert[_ix(r)]
        back = via_slot_expert[_ix(e)]
        if back < 0:
            excess[_ix(e)] -= push
            break
        slot_tokens[_ix(back)] -= push
        g = gpus[_ix(back)]
    spare[target] -= push
    return by_target


@numba.njit(cache=True, nogil=True)
def _route(load, local, ptr, gpus, num_gpus, start_cap, resume=True):
    """Exact min-max routing of per-expert loads over their copies.

    load int64 [E]; local int64 [G, E] tokens already on each GPU (shape [0, E] disables the
    local-first pass); ptr int64 [E+1]; gpus int64 [nnz]; start_cap: a known lower bound on the
    optimum to start from (0 if none); resume: let a search continue the previous one's tree where
    that gives the same tree (``_find_path``), False searching afresh every time (the reference).
    Returns (slot_tokens int64 [nnz], gpu_load int64 [G], bound_num, bound_den, raised) with
    max(gpu_load) == ceil(bound_num / bound_den), the proven optimum; ``raised`` tells whether the
    capacity had to grow past the one the local-first fill ran at.
    """
    num_experts = ptr.size - 1
    nnz = gpus.size
    fixed = np.zeros(num_gpus, np.int64)
    slot_tokens = np.zeros(nnz, np.int64)
    slot_expert = np.empty(nnz, np.int64)
    excess = np.zeros(num_experts, np.int64)
    flexible = np.zeros(num_experts, np.bool_)
    total = 0
    for e in range(num_experts):
        total += load[e]
        for r in range(ptr[e], ptr[e + 1]):
            slot_expert[r] = e
        if ptr[e + 1] - ptr[e] == 1:
            fixed[gpus[ptr[e]]] += load[e]
            slot_tokens[ptr[e]] = load[e]
        elif load[e] > 0:
            flexible[e] = True
            excess[e] = load[e]

    # Proven bound as a fraction num/den: max(max fixed, total / G).
    bound_num = total
    bound_den = num_gpus
    for g in range(num_gpus):
        if fixed[g] * bound_den > bound_num:
            bound_num = fixed[g]
            bound_den = 1
    cap = max(_ceil_div_jit(bound_num, bound_den), start_cap)
    spare = np.empty(num_gpus, np.int64)
    for g in range(num_gpus):
        spare[g] = cap - fixed[g]
    raised = False

    # Reverse adjacency GPU -> flexible slots, for walking back along flow.
    gpu_ptr = np.zeros(num_gpus + 1, np.int64)
    for r in range(nnz):
        if flexible[slot_expert[r]]:
            gpu_ptr[gpus[r] + 1] += 1
    for g in range(num_gpus):
        gpu_ptr[g + 1] += gpu_ptr[g]
    gpu_slot = np.empty(gpu_ptr[num_gpus], np.int64)
    fill = gpu_ptr[:-1].copy()
    for r in range(nnz):
        if flexible[slot_expert[r]]:
            gpu_slot[fill[gpus[r]]] = r
            fill[gpus[r]] += 1

    # Local-first: tokens already on a copy's GPU stay there while capacity allows.
    if local.shape[0] > 0:
        for e in range(num_experts):
            if flexible[e]:
                for r in range(ptr[e], ptr[e + 1]):
                    g = gpus[r]
                    take = min(local[g, e], spare[g], excess[e])
                    slot_tokens[r] += take
                    spare[g] -= take
                    excess[e] -= take
    # Greedy fill of the rest, copy by copy; augmenting paths repair what it cannot place.
    for e in range(num_experts):
        if flexible[e]:
            for r in range(ptr[e], ptr[e + 1]):
                take = min(spare[gpus[r]], excess[e])
                slot_tokens[r] += take
                spare[gpus[r]] -= take
                excess[e] -= take

    # Flow of a copy that serves its own GPU's tokens is "protected": augmenting paths first try to
    # move only unprotected flow, and touch local flow only when nothing else completes the path.
    protected = np.zeros(nnz, np.int64)
    if local.shape[0] > 0:
        for r in range(nnz):
            if flexible[slot_expert[r]]:
                protected[r] = local[gpus[r], slot_expert[r]]
    seen_expert = np.zeros(num_experts, np.bool_)
    seen_gpu = np.zeros(num_gpus, np.bool_)
    via_slot_gpu = np.empty(num_gpus, np.int64)  # slot whose forward edge reached this GPU
    via_slot_expert = np.empty(num_experts, np.int64)  # slot whose flow was walked back to this expert
    queue = np.empty(num_experts, np.int64)
    target = np.empty(1, np.int64)  # the first GPU with spare a search reaches
    no_protection = np.zeros(nnz, np.int64)
    pending, num_pending = _pending_experts(excess)  # excess only falls from here
    frontier = np.full(3, -1, np.int64)  # a protected search to resume, if its push kept its tree
    begin, end = ptr[:-1], ptr[1:]
    while True:
        left = False
        for i in range(num_pending[0]):
            if excess[pending[i]] > 0:
                left = True
                break
        if not left:
            break
        found = _find_path(
            excess,
            spare,
            slot_tokens,
            protected,
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
            target,
            pending,
            num_pending,
            frontier,
        )
        keep = protected
        found_unprotected = False
        if not found:
            keep = no_protection
            found_unprotected = True
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
                target,
                pending,
                num_pending,
                frontier,
            )
        if not found:
            # Hall violator: experts S (seen) only reach GPUs U (seen), all full.
            num = 0
            den = 0
            for e in range(num_experts):
                if seen_expert[e]:
                    num += load[e]
            for g in range(num_gpus):
                if seen_gpu[g]:
                    num += fixed[g]
                    den += 1
            bound_num = num
            bound_den = den
            new_cap = _ceil_div_jit(num, den)
            for g in range(num_gpus):
                spare[g] += new_cap - cap
            cap = new_cap
            raised = True
            continue
        kept_tree = _push_path(
            target[0], excess, spare, slot_tokens, keep, gpus, slot_expert, via_slot_gpu, via_slot_expert
        )
        if not (kept_tree and resume) or found_unprotected:
            frontier[0] = -1

    gpu_load = fixed.copy()
    for r in range(nnz):
        if flexible[slot_expert[r]]:
            gpu_load[gpus[r]] += slot_tokens[r]
    return slot_tokens, gpu_load, bound_num, bound_den, raised


@numba.njit(cache=True, nogil=True)
def _split_by_source(tokens, slot_tokens, ptr, gpus):
    """Per-source pieces for replicated experts: local tokens first, then sources in order.

    Each copy's quota ``slot_tokens[r]`` is first filled from its own GPU's tokens; the rest of
    the quotas of expert ``e`` are filled by sources 0..G-1 in order, copies in slot order.
    Sources are the outer loop so ``tokens`` is read row by row.
    Returns (piece_src, piece_slot, piece_count, remote_tokens) trimmed to the pieces made.
    """
    num_gpus, num_experts = tokens.shape
    remote = 0
    num_flexible = 0
    bound = 0
    for e in range(num_experts):
        copies = ptr[e + 1] - ptr[e]
        if copies == 1:
            remote += slot_tokens[ptr[e]] - tokens[gpus[ptr[e]], e]
        else:
            num_flexible += 1
            bound += num_gpus + copies
    flexible = np.empty(num_flexible, np.int64)
    slot_expert = np.empty(gpus.size, np.int64)
    i = 0
    for e in range(num_experts):
        for r in range(ptr[e], ptr[e + 1]):
            slot_expert[r] = e
        if ptr[e + 1] - ptr[e] > 1:
            flexible[i] = e
            i += 1
    piece_src = np.empty(bound, np.int64)
    piece_slot = np.empty(bound, np.int64)
    piece_count = np.empty(bound, np.int64)
    n = 0
    quota = slot_tokens.copy()
    kept = np.zeros(gpus.size, np.int64)
    # Local pass, and each GPU's flexible slots so row s can subtract what it kept locally.
    gpu_ptr = np.zeros(num_gpus + 1, np.int64)
    for e in flexible:
        for r in range(ptr[e], ptr[e + 1]):
            g = gpus[r]
            kept[r] = min(tokens[g, e], quota[r])
            quota[r] -= kept[r]
            gpu_ptr[g + 1] += 1
            if kept[r] > 0:
                piece_src[n] = g
                piece_slot[n] = r
                piece_count[n] = kept[r]
                n += 1
    for g in range(num_gpus):
        gpu_ptr[g + 1] += gpu_ptr[g]
    gpu_slot = np.empty(gpu_ptr[num_gpus], np.int64)
    fill = gpu_ptr[:-1].copy()
    for e in flexible:
        for r in range(ptr[e], ptr[e + 1]):
            gpu_slot[fill[gpus[r]]] = r
            fill[gpus[r]] += 1
    cursor = ptr[:-1].copy()  # next copy of each expert with quota left
    kept_here = np.zeros(num_experts, np.int64)
    for s in range(num_gpus):
        for i in range(gpu_ptr[s], gpu_ptr[s + 1]):
            kept_here[slot_expert[gpu_slot[i]]] = kept[gpu_slot[i]]
        for e in flexible:  # the hot loop: unsigned indices (see _ix)
            left = tokens[_ix(s), _ix(e)] - kept_here[_ix(e)]
            r = cursor[_ix(e)]
            while left > 0:
                while quota[_ix(r)] == 0:
                    r += 1
                take = min(left, quota[_ix(r)])
                piece_src[_ix(n)] = s
                piece_slot[_ix(n)] = r
                piece_count[_ix(n)] = take
                n += 1
                quota[_ix(r)] -= take
                left -= take
                remote += take
            cursor[_ix(e)] = r
        for i in range(gpu_ptr[s], gpu_ptr[s + 1]):
            kept_here[slot_expert[gpu_slot[i]]] = 0
    return piece_src[:n], piece_slot[:n], piece_count[:n], remote


_NO_LOCAL = np.zeros((0, 0), dtype=np.int64)


def _check_tokens(tokens: np.ndarray, placement: Placement) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape != (placement.num_gpus, placement.num_experts):
        raise ValueError(
            f"tokens must have shape [num_gpus={placement.num_gpus}, num_experts={placement.num_experts}], "
            f"got {list(tokens.shape)}"
        )
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size and tokens.min() < 0:
        raise ValueError("tokens must be non-negative")
    return np.ascontiguousarray(tokens, dtype=np.int64)


def schedule(tokens: np.ndarray, placement: Placement) -> Schedule:
    """Exact min-max assignment of ``tokens`` int [G, E] to the copies in ``placement``."""
    tokens = _check_tokens(tokens, placement)
    load = tokens.sum(axis=0)
    return _complete(
        tokens, placement, load, _route(load, tokens, placement.ptr, placement.gpus, placement.num_gpus, 0)
    )


def _complete(tokens: np.ndarray, placement: Placement, load: np.ndarray, routed: tuple) -> Schedule:
    """The Schedule of ``_route``'s local-first result ``routed`` for checked ``tokens`` int64 [G, E]
    with per-expert totals ``load`` (``planning.burst`` routes first and completes only when it adds
    no copy)."""
    ptr, gpus, num_gpus = placement.ptr, placement.gpus, placement.num_gpus
    slot_tokens, gpu_load, num, den, raised = routed
    if raised:
        # The local-first fill ran below the optimal capacity; routing again at the optimum from the
        # start keeps more tokens local (same max load, same certificate).
        slot_tokens, gpu_load, _, _, _ = _route(load, tokens, ptr, gpus, num_gpus, int(gpu_load.max(initial=0)))
    src, slot, count, remote = _split_by_source(tokens, slot_tokens, ptr, gpus)
    return Schedule(
        max_load=int(gpu_load.max(initial=0)),
        gpu_load=gpu_load,
        lower_bound=num / den,
        remote_tokens=int(remote),
        slot_tokens=slot_tokens,
        piece_src=src,
        piece_slot=slot,
        piece_count=count,
    )


def route_loads(expert_load: np.ndarray, placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """Exact min-max routing of aggregated per-expert loads int [E] (the planner's view).

    Returns (slot_tokens int64 [nnz], gpu_load int64 [G]). Copies are filled in slot order, so the
    home copy (slot ``ptr[e]``) takes what it can before replicas do.
    """
    load = np.ascontiguousarray(expert_load, dtype=np.int64)
    if load.shape != (placement.num_experts,):
        raise ValueError(f"expert_load must have shape [{placement.num_experts}], got {list(load.shape)}")
    local = _NO_LOCAL.reshape(0, placement.num_experts)
    slot_tokens, gpu_load, _, _, _ = _route(load, local, placement.ptr, placement.gpus, placement.num_gpus, 0)
    return slot_tokens, gpu_load


def optimal_max_load(expert_load: np.ndarray, placement: Placement) -> int:
    """Exact min-max GPU load for aggregated per-expert loads int [E] (the planner's objective)."""
    return int(route_loads(expert_load, placement)[1].max(initial=0))


def split_by_source(tokens: np.ndarray, slot_tokens: np.ndarray, placement: Placement):
    """Split per-copy quotas ``slot_tokens`` int [nnz] over the sources of ``tokens`` int [G, E].

    The quotas of each expert must sum to its tokens. Returns (piece_src, piece_slot, piece_count,
    remote_tokens) as in ``Schedule``; lets any policy's quotas become an all-to-all plan.
    """
    tokens = _check_tokens(tokens, placement)
    slot_tokens = np.ascontiguousarray(slot_tokens, dtype=np.int64)
    per_expert = np.add.reduceat(slot_tokens, placement.ptr[:-1]) if slot_tokens.size else slot_tokens
    if slot_tokens.shape != (placement.num_slots,) or not np.array_equal(per_expert, tokens.sum(axis=0)):
        raise ValueError("slot_tokens must have one entry per copy and sum to each expert's tokens")
    return _split_by_source(tokens, slot_tokens, placement.ptr, placement.gpus)


@numba.njit(cache=True)
def _remote_tokens(tokens, slot_tokens, ptr, gpus):
    """Tokens processed off their source GPU under ``_split_by_source``'s rule (each copy first
    keeps its own GPU's tokens), without listing the pieces."""
    remote = 0
    for e in range(ptr.size - 1):
        if ptr[e + 1] - ptr[e] == 1:
            remote += slot_tokens[ptr[e]] - tokens[gpus[ptr[e]], e]
            continue
        for r in range(ptr[e], ptr[e + 1]):
            remote += slot_tokens[r] - min(tokens[gpus[r], e], slot_tokens[r])
    return remote


def schedule_quotas(tokens: np.ndarray, placement: Placement) -> Schedule:
    """``schedule`` without the per-source pieces (empty): the same quotas, loads, bound and remote
    count, for a caller that needs only its own share of the split (``runtime.routing.rank_tables``
    derives it from the quotas by the same rule) and not every source's."""
    tokens = _check_tokens(tokens, placement)
    load = tokens.sum(axis=0)
    ptr, gpus, num_gpus = placement.ptr, placement.gpus, placement.num_gpus
    slot_tokens, gpu_load, num, den, raised = _route(load, tokens, ptr, gpus, num_gpus, 0)
    if raised:  # as in schedule: route again at the optimum from the start (more tokens stay local)
        slot_tokens, gpu_load, _, _, _ = _route(load, tokens, ptr, gpus, num_gpus, int(gpu_load.max(initial=0)))
    none = np.zeros(0, dtype=np.int64)
    return Schedule(
        max_load=int(gpu_load.max(initial=0)),
        gpu_load=gpu_load,
        lower_bound=num / den,
        remote_tokens=int(_remote_tokens(tokens, slot_tokens, ptr, gpus)),
        slot_tokens=slot_tokens,
        piece_src=none,
        piece_slot=none,
        piece_count=none,
    )
