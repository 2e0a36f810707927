"""Rows MicroEP's experts actually process, counted by the tests themselves: a spy on the expert backend
call (``run_experts`` as glue/layer.py and glue/fsep.py call it), independent of the schedule's own
telemetry.

Each call of a layer's experts is one record: the rows the backend received (its input and output
row counts and the per-slot split must agree), split into rows run with the layer's own expert
parameters (home experts) and rows run with other weights (replicas fetched from their home ranks).
Home is told apart by storage: a home expert's weight is (a view of) one of the layer's parameters.
FSEP layers run every expert from gathered copies (no parameter storage: all rows count as replica
rows); which expert a copy is, is told apart by value (``name_slot_experts``), which needs distinct
experts (``use_cpu_initialization=False``).

``count_routed_tokens`` counts what Megatron's router chose (its routing map per expert), the other
side of token conservation.

Imported by module name (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import contextlib

import torch


def _storage(tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def count_expert_rows(keep_fc1: bool = False):
    """Yields a list that receives ``{"layer", "training", "backward", "rows", "slot_rows", "home",
    "replica"}`` per expert call of every MicroEP or FSEP layer in this process while the context is
    open (``slot_rows``: rows per weight the backend ran; ``backward``: a recompute inside autograd's
    backward, such as FSEP's ``regather``, whose ``layer`` is None: it runs outside the layer's call).
    ``keep_fc1``: also ``"slot_fc1"``, a copy of each slot's fc1 weight, for ``name_slot_experts``."""
    from megatron_microep.glue import fsep as glue_fsep
    from megatron_microep.glue import layer as glue_layer

    records: list[dict] = []
    computing: list = []  # the layer whose experts run now
    patched = [
        (glue_layer.MicroEPMoELayer, "routed_experts_compute"),
        (glue_fsep.FSEPMoELayer, "routed_experts_compute"),
        (glue_layer, "run_experts"),
        (glue_fsep, "run_experts"),
    ]
    originals = {(owner, name): owner.__dict__[name] for owner, name in patched}

    def compute_spy(original):
        def routed_experts_compute(self, hidden_states, probs):
            computing.append(self)
            try:
                return original(self, hidden_states, probs)
            finally:
                computing.pop()

        return routed_experts_compute

    def run_spy(original):
        def run_experts(backend, x, rows, probs, weights, math):
            layer = computing[-1] if computing else None
            backward = _in_backward()
            assert layer is not None or backward, "an expert call outside any MicroEP layer's routed_experts_compute"
            counts = [int(c) for c in getattr(rows, "counts", rows)]
            assert len(counts) == len(weights), f"{len(counts)} row groups for {len(weights)} expert weights"
            assert sum(counts) == x.shape[0], f"row groups {counts} do not cover the {x.shape[0]} input rows"
            own = {_storage(p) for p in layer.experts.parameters()} if layer is not None else set()
            home = [_storage(w.fc1) in own for w in weights]
            output = original(backend, x, rows, probs, weights, math)
            assert output.shape[0] == x.shape[0], f"{x.shape[0]} rows in, {output.shape[0]} out"
            record = {
                "layer": layer.model_layer_id if layer is not None else None,
                "training": layer.training if layer is not None else True,
                "backward": backward,
                "rows": int(x.shape[0]),
                "slot_rows": counts,
                "home": sum(c for c, h in zip(counts, home) if h),
                "replica": sum(c for c, h in zip(counts, home) if not h),
            }
            if keep_fc1:
                record["slot_fc1"] = [w.fc1.detach().clone() for w in weights]
            records.append(record)
            return output

        return run_experts

    for owner, name in patched:
        original = originals[(owner, name)]
        setattr(owner, name, compute_spy(original) if name == "routed_experts_compute" else run_spy(original))
    try:
        yield records
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def name_slot_experts(records: list[dict], layers) -> None:
    """Replace each record's ``slot_fc1`` (``count_expert_rows(keep_fc1=True)``) by ``slot_experts``:
    the expert whose fc1 weight each slot ran, found by bitwise equality among ``layers``' full
    experts (FSEP layers, their current weights: call before the optimizer step changes them).
    Gathers every FSEP layer's experts over its EP group: call on every rank of it, the same layers."""
    from megatron_microep.glue.fsep import full_experts

    fc1 = {layer.model_layer_id: full_experts(layer)[0] for layer in layers}
    for record in records:
        if "slot_fc1" not in record:
            continue
        experts = fc1[record["layer"]]
        named = []
        for weight in record.pop("slot_fc1"):
            matches = [e for e in range(experts.shape[0]) if torch.equal(experts[e], weight)]
            assert len(matches) == 1, f"layer {record['layer']}: a slot's weight matches experts {matches}"
            named.append(matches[0])
        record["slot_experts"] = named


@contextlib.contextmanager
def count_routed_tokens():
    """Yields a list that receives ``{"layer", "backward", "per_expert"}`` per routing of every MicroEP
    or FSEP layer in this process while open: tokens Megatron's router sent to each expert (its
    routing map summed over tokens, a list of E ints), before any MicroEP scheduling."""
    from megatron_microep.glue import layer as glue_layer

    records: list[dict] = []
    own = glue_layer.MicroEPMoELayer.__dict__.get("route")  # None: Megatron's MoELayer.route, inherited
    original = glue_layer.MicroEPMoELayer.route

    def route(self, *args, **kwargs):
        probs, routing_map = original(self, *args, **kwargs)
        per_expert = routing_map.reshape(-1, routing_map.shape[-1]).sum(0)
        records.append(
            {
                "layer": getattr(self, "model_layer_id", self.layer_number),
                "backward": _in_backward(),
                "per_expert": per_expert.tolist(),
            }
        )
        return probs, routing_map

    glue_layer.MicroEPMoELayer.route = route
    try:
        yield records
    finally:
        if own is None:
            del glue_layer.MicroEPMoELayer.route
        else:
            glue_layer.MicroEPMoELayer.route = own


def calls_across_ranks(rows_per_rank, routed_per_rank, layer, num_experts: int) -> list[dict]:
    """One EP group's forward calls of ``layer``, matched across its ranks by order (every rank runs
    a layer's micro-batches in the same order): per call, ``ran`` (rows each expert ran, over all its
    copies: needs ``name_slot_experts``), ``copies`` (copies of each expert that ran rows), ``routed``
    (tokens the router sent each expert, over the group) and ``rank_rows`` (rows each rank ran).
    ``rows_per_rank``/``routed_per_rank``: each rank's ``count_expert_rows``/``count_routed_tokens`` records."""
    import numpy as np

    rows = [[r for r in records if r["layer"] == layer and not r["backward"]] for records in rows_per_rank]
    routed = [[r for r in records if r["layer"] == layer and not r["backward"]] for records in routed_per_rank]
    counts = {len(r) for r in rows + routed}
    assert len(counts) == 1, (
        f"layer {layer}: expert calls and routings per rank differ: {[len(r) for r in rows + routed]}"
    )
    calls = []
    for call in range(counts.pop()):
        ran = np.zeros(num_experts, dtype=np.int64)
        copies = np.zeros(num_experts, dtype=np.int64)
        for records in rows:
            for expert, count in zip(records[call]["slot_experts"], records[call]["slot_rows"]):
                ran[expert] += count
                copies[expert] += count > 0
        calls.append(
            {
                "ran": ran,
                "copies": copies,
                "routed": np.sum([records[call]["per_expert"] for records in routed], axis=0),
                "rank_rows": [records[call]["rows"] for records in rows],
            }
        )
    return calls


def assert_each_routed_pair_ran_once(calls: list[dict], pairs_per_call: int, label: str) -> list[bool]:
    """For ``calls_across_ranks``' calls: each expert ran exactly the tokens the router sent it (over
    its copies) and the router chose ``pairs_per_call`` (token, expert) pairs in each call. Returns,
    per call, whether some expert's tokens were split over copies."""
    for i, call in enumerate(calls):
        assert call["ran"].tolist() == call["routed"].tolist(), f"{label} call {i}: {call}"
        assert call["routed"].sum() == pairs_per_call, f"{label} call {i}: {call['routed'].sum()} routed pairs"
    return [bool((call["copies"] > 1).any()) for call in calls]
