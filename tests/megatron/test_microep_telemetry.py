"""Telemetry reaches Megatron-LM's metrics writers and the log; --microep-trace-dir writes a trace the
simulator reads back. One CPU rank (gloo, EP = 1), three training steps of two micro-batches."""

import logging
import os
import sys
import types

import numpy as np
import pytest
import torch
from test_microep_parity import HIDDEN, MICRO_BATCH, SEQ_LEN, _build, _configs

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo

STEPS, MICRO_BATCHES, TOPK = 3, 2, 2


class _Recorder:
    """Stands in for TensorBoard's SummaryWriter and the W&B run: records what the layer writes."""

    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append(("add_scalar", tag, float(value), step))

    def log(self, values, step):
        self.calls.append(("log", dict(values), step))


def _telemetry_rank(rank, world_size, trace_dir):
    from megatron_microep.glue.config import MicroEPConfig, attach_microep_config
    from megatron_microep.glue.layer import MicroEPMoELayer, close_traces, set_training_step

    pg = init_megatron_parallel(seed=3)
    _, config = _configs(1, TOPK, 0)
    attach_microep_config(config, MicroEPConfig(trace_dir=trace_dir))
    layer = _build(config, pg, MicroEPMoELayer)
    layer.set_layer_number(3)
    tensorboard, wandb = _Recorder(), _Recorder()
    # What megatron.training.global_vars holds in a Megatron-LM job with both writers enabled.
    sys.modules["megatron.training.global_vars"] = types.SimpleNamespace(
        _GLOBAL_ARGS=None,
        _GLOBAL_TENSORBOARD_WRITER=tensorboard,
        _GLOBAL_WANDB_WRITER=wandb,
    )
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("megatron_microep.glue.layer").addHandler(handler)
    logging.getLogger("megatron_microep.glue.layer").setLevel(logging.INFO)
    layer.train()
    for step in range(1, STEPS + 1):
        set_training_step(step)
        for _ in range(MICRO_BATCHES):
            x = torch.randn(SEQ_LEN, MICRO_BATCH, HIDDEN, requires_grad=True)
            out, _ = layer(x)
            out.sum().backward()
    with torch.no_grad():  # evaluation: not recorded
        layer.eval()
        layer(torch.randn(SEQ_LEN, MICRO_BATCH, HIDDEN))
    summary = layer.log_telemetry(STEPS)
    close_traces()
    return {"summary": summary, "tensorboard": tensorboard.calls, "wandb": wandb.calls, "log": records}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    trace_dir = str(tmp_path_factory.mktemp("trace"))
    return spawn_gloo(_telemetry_rank, 1, trace_dir, timeout_s=120)[0], trace_dir


def test_summary_written_to_tensorboard_wandb_and_log(run):
    res, _ = run
    summary = res["summary"]
    assert summary["micro_batches"] == STEPS * MICRO_BATCHES
    # EP = 1: everything is local and balanced by construction.
    assert summary["imbalance_before"] == summary["imbalance_after"] == 1.0
    assert summary["remote_after"] == 0 and summary["replicas"] == 0
    tags = {call[1] for call in res["tensorboard"]}
    assert {f"microep/layer3/{k}" for k in summary} == tags
    assert all(call[3] == STEPS for call in res["tensorboard"])
    (wandb_call,) = res["wandb"]
    assert wandb_call[1] == {f"microep/layer3/{k}": v for k, v in summary.items()} and wandb_call[2] == STEPS
    assert any("MicroEP layer 3 step 3" in line for line in res["log"])


def test_trace_dir_records_every_training_micro_batch(run):
    from megatron_microep.simulator.traces import read_native

    _, trace_dir = run
    files = os.listdir(trace_dir)
    assert files == ["routing_rank0.mept"]
    info, records = read_native(os.path.join(trace_dir, files[0]))
    records = list(records)
    assert (info.num_gpus, info.num_experts) == (1, 8)
    assert [(r.step, r.micro_batch, r.layer) for r in records] == [
        (s, m, 3) for s in range(1, STEPS + 1) for m in range(MICRO_BATCHES)
    ]
    assert all(int(np.asarray(r.tokens).sum()) == SEQ_LEN * MICRO_BATCH * TOPK for r in records)
