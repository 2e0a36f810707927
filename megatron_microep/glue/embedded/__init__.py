"""The embedded training run (``microep train``): a megatron-core MoE GPT trained on CPU ranks (gloo)
through Megatron's own training stack.

The model is Megatron's GPTModel (local spec) with ``MicroEPMoELayer`` in the MoE positions when
``moe.moe_token_dispatcher_type`` is ``microep`` (stock ``MoELayer`` otherwise). It trains through
Megatron's ``DistributedDataParallel``, ``get_forward_backward_func`` (the micro-batch schedule,
which also runs evaluation), ``finalize_model_grads``, ``get_megatron_optimizer`` (Adam with
Megatron's gradient clipping and weight-decay rules) and ``OptimizerParamScheduler``; the CPU harness
(``glue/cpu.py``) lets them run on CPU processes. Ranks come from ``spawn_gloo`` (``processes`` of
them) or from torchrun (``WORLD_SIZE`` set), e.g. under Slurm.

One run = one output directory:

- ``train.log`` / stdout: per-interval loss, learning rate, tokens/s and, per MoE layer, the mean
  max/mean load over EP ranks before scheduling (stock EP: every token on its expert's home rank)
  and after (the MicroEP schedule); validation loss at ``eval_interval``;
- ``metrics.jsonl``: the same figures, one JSON object per logged step;
- ``routing/trace.mept``: every training micro-batch's routing (tokens per source EP rank and expert,
  per MoE layer) in the simulator's native trace format;
- ``checkpoints/step_<N>/``: per-rank model, optimizer, scheduler and RNG state and every MicroEP
  layer's placement-controller state (placement, load history, a plan awaiting adoption), plus how
  much of the trace and metrics the checkpoint covers (``checkpoint.py``);
- ``report/``: at the end, what the run measured and the simulator's replay of the recorded routing
  (``report.py``).

Modules: ``model`` (config checks, the model and Megatron's training stack around it), ``routing``
(recorded routing and balance figures), ``loop`` (one rank's training loop), ``checkpoint``,
``report``, ``run`` (the entry point: corpus, launching, signals).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_microep.glue.config_schema import LaunchConfig

STOP_FILE = "STOP"  # in the output directory: finish the current step, save and exit


class TrainError(RuntimeError):
    """A run that cannot start or continue (bad config for this run, incompatible checkpoint)."""


@dataclass(frozen=True)
class RunSpec:
    """Everything a rank needs (picklable: it travels to ``spawn_gloo`` ranks)."""

    config: LaunchConfig
    output_dir: str
    corpus_dir: str
    resume: bool
    world_size: int

    def embedded(self, key: str):
        return self.config.value("embedded", key)
