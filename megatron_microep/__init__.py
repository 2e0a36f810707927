"""megatron-microep: MicroEP token scheduling, replica placement and FSEP for Megatron-core MoE.

Three rooms, one concept each:
- ``planning``: pure numerics (no torch.distributed, no Megatron): placements, the exact
  per-micro-batch scheduler, the OR-Tools placement planner, baseline policies, the simulator.
- ``runtime``: torch mechanics (dispatch, experts, sharding) that run inside a training step.
- ``glue``: everything that knows about Megatron (arguments, specs, version compatibility, CPU harness).
"""

__version__ = "0.1.0"
