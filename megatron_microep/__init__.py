"""megatron-microep: MicroEP token scheduling, replica placement and FSEP for Megatron-core MoE.

Five rooms, one concept in one place each; imports point down the list, never up:
- ``planning``: pure numerics (no torch.distributed, no Megatron): placements, the exact
  per-micro-batch scheduler, the placement planners, workloads, the balancing policies.
- ``simulator``: trace formats, the cost model, the streaming replay and its report, on planning.
- ``runtime``: torch mechanics that run inside a training step (dispatch, experts, replicas, FSEP shards).
- ``glue``: everything that knows about Megatron (the layer and dispatcher, specs, arguments, version
  compatibility, the CPU harness, the embedded run).
- ``cli``: the ``microep`` command, one thin module per subcommand.
Beneath them all: ``settings`` (every MicroEP setting, declared once) and ``validation``.
"""

__version__ = "0.1.0"
