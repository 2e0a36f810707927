"""Rows MicroEP's experts actually process, counted by the tests themselves: a spy on the expert backend
call (``run_experts`` as glue/layer.py calls it), independent of the schedule's own telemetry.

Each call of a layer's experts is one record: the rows the backend received (its input and output
row counts and the per-slot split must agree), split into rows run with the layer's own expert
parameters (home experts) and rows run with other weights (replicas fetched from their home ranks).
Home is told apart by storage: a home expert's weight is (a view of) one of the layer's parameters.

Imported by module name (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import contextlib


def _storage(tensor) -> int:
    return tensor.untyped_storage().data_ptr()


@contextlib.contextmanager
def count_expert_rows():
    """Yields a list that receives ``{"layer", "training", "rows", "home", "replica"}`` per expert call
    of every MicroEP layer in this process while the context is open."""
    from megatron_microep.glue import layer as glue_layer

    records: list[dict] = []
    computing: list = []  # the layer whose experts run now
    original_compute = glue_layer.MicroEPMoELayer.routed_experts_compute
    original_run = glue_layer.run_experts

    def routed_experts_compute(self, hidden_states, probs):
        computing.append(self)
        try:
            return original_compute(self, hidden_states, probs)
        finally:
            computing.pop()

    def run_experts(backend, x, rows, probs, weights, math):
        layer = computing[-1]
        counts = [int(c) for c in getattr(rows, "counts", rows)]
        assert len(counts) == len(weights), f"{len(counts)} row groups for {len(weights)} expert weights"
        assert sum(counts) == x.shape[0], f"row groups {counts} do not cover the {x.shape[0]} input rows"
        own = {_storage(p) for p in layer.experts.parameters()}
        home = [_storage(w.fc1) in own for w in weights]
        output = original_run(backend, x, rows, probs, weights, math)
        assert output.shape[0] == x.shape[0], f"{x.shape[0]} rows in, {output.shape[0]} out"
        records.append(
            {
                "layer": layer.layer_number,
                "training": layer.training,
                "rows": int(x.shape[0]),
                "home": sum(c for c, h in zip(counts, home) if h),
                "replica": sum(c for c, h in zip(counts, home) if not h),
            }
        )
        return output

    glue_layer.MicroEPMoELayer.routed_experts_compute = routed_experts_compute
    glue_layer.run_experts = run_experts
    try:
        yield records
    finally:
        glue_layer.MicroEPMoELayer.routed_experts_compute = original_compute
        glue_layer.run_experts = original_run
