"""Checkpoints of the embedded run: ``checkpoints/step_<N>/`` holds one ``rank<R>.pt`` per rank (model,
Megatron optimizer, LR scheduler, RNG states, every MicroEP layer's placement-controller state) and,
from rank 0, ``manifest.json`` (what the run must match to resume) and ``complete.json`` (written
last: a checkpoint without it is ignored). The controller state holds the placement, the load
history and a plan awaiting adoption, so a resumed run takes the decisions the uninterrupted one
would have taken and its losses are bitwise the same.

Format 2 (this one) holds the state of Megatron's optimizer (``get_megatron_optimizer``); format 1
held torch's AdamW and is refused with a one-line error.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_microep.glue.config import DISPATCHER_TYPE
from megatron_microep.glue.embedded import RunSpec, TrainError

CHECKPOINT_FORMAT = 2
KEEP_CHECKPOINTS = 2  # older complete checkpoints are deleted after a save


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:07d}"


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = output_dir / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if (p / "complete.json").exists()) if root.exists() else []
    return done[-1] if done else None


def manifest(spec: RunSpec, corpus_key: str) -> dict:
    """What a run must share with the checkpoint's run to continue it."""
    cfg = spec.config
    return {
        "format": CHECKPOINT_FORMAT,
        "world_size": spec.world_size,
        "corpus": corpus_key,
        "model": cfg.sections.get("model", {}),
        "moe": cfg.sections.get("moe", {}),
        "parallel": cfg.sections.get("parallel", {}),
        "batch": [cfg.get("training", "micro_batch_size"), cfg.get("training", "global_batch_size")],
        "seed": cfg.value("training", "seed"),
        # Saved placements have this many replica slots per rank.
        "redundant_slots": cfg.microep_section().redundant_slots if cfg.dispatcher == DISPATCHER_TYPE else None,
    }


def check_resumable(spec: RunSpec) -> None:
    """Raise TrainError unless the newest checkpoint in the output directory was written by a run
    this one can continue (same format, model, parallel layout, batch, seed, corpus, replica slots)."""
    checkpoint = latest_checkpoint(Path(spec.output_dir))
    corpus_key = json.loads((Path(spec.corpus_dir) / "meta.json").read_text())["key"]
    saved = json.loads((checkpoint / "manifest.json").read_text())
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(
            f"{checkpoint}: checkpoint format {saved.get('format')!r}, this version reads format "
            f"{CHECKPOINT_FORMAT} (the run now trains with Megatron's optimizer); start a new output directory"
        )
    current = manifest(spec, corpus_key)
    for key in current:
        if saved.get(key) != current[key]:
            raise TrainError(
                f"{checkpoint}: checkpoint was written with {key} = {saved.get(key)!r}, this run has "
                f"{current[key]!r}; resume with the same config (or start a new output directory)"
            )


def rank_state(step: int, losses: list[float], model, optimizer, scheduler, micro_layers, trace_bytes) -> dict:
    """This rank's part of a checkpoint. Waits for a plan still being computed (its outcome is saved)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {
        "step": step,
        "losses": losses,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()},
        "placement_controllers": {
            int(layer.layer_number): layer.placement_controller.state() for layer in micro_layers
        },
        "trace_bytes": trace_bytes,
    }


def save(directory: Path, state: dict, manifest_: dict, log) -> None:
    """Write this rank's state, then (rank 0) the manifest and the completion mark; keep the newest
    ``KEEP_CHECKPOINTS`` complete checkpoints. Collective: every rank calls it."""
    rank = dist.get_rank()
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    torch.save(state, directory / f"rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        (directory / "manifest.json").write_text(json.dumps(manifest_, indent=1))
        mark = {"step": state["step"], "trace_bytes": state["trace_bytes"], "saved": time.time()}
        (directory / "complete.json").write_text(json.dumps(mark))
        log(f"saved checkpoint {directory}")
        complete = sorted(p for p in directory.parent.glob("step_*") if (p / "complete.json").exists())
        for old in complete[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)
    dist.barrier()


def restore(checkpoint: Path, model, optimizer, scheduler, micro_layers, ep_size: int) -> dict:
    """Load this rank's state into the model, optimizer, scheduler, RNGs and MicroEP layers; returns it."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_microep.planning.placement import Placement

    state = torch.load(checkpoint / f"rank{dist.get_rank():05d}.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    get_cuda_rng_tracker().set_states(state["rng"]["tracker"])
    saved = state["placement_controllers"]
    if sorted(saved) != sorted(int(layer.layer_number) for layer in micro_layers):
        raise TrainError(f"{checkpoint}: saved MicroEP layers {sorted(saved)} are not the model's")
    for layer in micro_layers:
        controller_state = dict(saved[int(layer.layer_number)])
        pending = controller_state["pending"]
        if pending is not None and pending["placement"] is not None:
            controller_state["pending"] = {**pending, "placement": Placement.from_lists(pending["placement"], ep_size)}
        controller = layer.placement_controller
        layout = controller.build_layout(Placement.from_lists(controller_state["placement"], ep_size))
        controller.load_state(controller_state, layout)
    return state
