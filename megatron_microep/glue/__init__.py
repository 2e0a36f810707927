"""Megatron glue: argument registration, layer specs, version compatibility and the CPU harness."""
