"""The embedded training run (``microep train``): a megatron-core MoE GPT trained on CPU ranks (gloo).

One run = one output directory:

- ``train.log`` / stdout: per-interval loss, learning rate, tokens/s and, per MoE layer, the mean
  max/mean load over EP ranks before scheduling (stock EP: every token on its expert's home rank)
  and after (the MicroEP schedule); validation loss at ``eval_interval``;
- ``metrics.jsonl``: the same figures, one JSON object per logged step;
- ``routing/trace.mept``: every training micro-batch's routing (tokens per source EP rank and expert,
  per MoE layer) in the simulator's native trace format;
- ``checkpoints/step_<N>/``: per-rank model, optimizer, scheduler and RNG state, plus the MicroEP
  placements and the per-step expert-load history of every MoE layer, and the trace/metrics length;
- ``report/``: at the end, the simulator's replay of the recorded routing through every policy
  (``report.md``, ``summary.csv``, plots).

The model is Megatron's GPTModel (local spec) with ``MicroEPMoELayer`` in the MoE positions when
``moe.moe_token_dispatcher_type`` is ``microep`` (stock ``MoELayer`` otherwise), trained through
Megatron's DistributedDataParallel, ``finalize_model_grads`` and ``OptimizerParamScheduler`` with
torch's AdamW (megatron-core's optimizers and schedules allocate on CUDA). Ranks come from ``spawn_gloo`` (``processes`` of them) or
from torchrun (``WORLD_SIZE`` set), e.g. under Slurm.

Interrupting (Ctrl-C, SIGTERM, or a ``STOP`` file in the output directory) saves a checkpoint at the
end of the current step and exits; ``resume`` continues from the newest checkpoint: same samples,
same optimizer state, the same loss curve (up to floating-point summation order, which replicas
change). A placement plan still being computed when the checkpoint is written is not saved; the
next re-planning interval plans again from the restored history.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_microep.glue.config import DISPATCHER_TYPE, MicroEPConfig
from megatron_microep.glue.config_schema import (
    MEGATRON_DATA,
    SECTIONS,
    TRANSFORMER,
    LaunchConfig,
    embedded_unsupported,
)
from megatron_microep.settings import simulator_params

CHECKPOINT_FORMAT = 1
KEEP_CHECKPOINTS = 2  # older complete checkpoints are deleted after a save
STOP_FILE = "STOP"
# Megatron's flag names that differ from the TransformerConfig field they set.
_TRANSFORMER_FIELD = {"num_experts": "num_moe_experts", "norm_epsilon": "layernorm_epsilon"}


class TrainError(RuntimeError):
    """A run that cannot start or continue (bad config for this run, incompatible checkpoint)."""


# --- settings -----------------------------------------------------------------------------------


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


def check_embedded_support(config: LaunchConfig) -> list[str]:
    """Raise TrainError for settings this CPU run cannot honour; return notes on what it leaves out."""
    unsupported = embedded_unsupported(config)
    if unsupported:
        raise TrainError(
            f"{config.source}: the embedded CPU run cannot honour {', '.join(unsupported)} "
            "(Megatron-LM only: use scripts/pretrain_gpt_microep.py, docs/launch.md)"
        )
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        if config.get("parallel", key, 1) != 1:
            raise TrainError(f"{config.source}: parallel.{key} must be 1 in the embedded CPU run")
    if config.get("parallel", "expert_tensor_parallel_size", 1) != 1:
        raise TrainError(f"{config.source}: parallel.expert_tensor_parallel_size must be 1 in the embedded CPU run")
    if config.get("model", "transformer_impl", "local") != "local":
        raise TrainError(
            f"{config.source}: the embedded CPU run needs model.transformer_impl: local (TransformerEngine needs CUDA)"
        )
    if config.get("moe", "moe_grouped_gemm", False):
        raise TrainError(
            f"{config.source}: moe.moe_grouped_gemm needs TransformerEngine (CUDA); "
            "set it to false for the embedded CPU run"
        )
    if config.get("model", "group_query_attention", False) and config.get("model", "num_query_groups") is None:
        raise TrainError(f"{config.source}: model.group_query_attention needs model.num_query_groups")
    notes = []
    data = [
        k
        for k, v in config.sections.get("data", {}).items()
        if {o.key: o for o in SECTIONS["data"]}[k].embedded == MEGATRON_DATA and v is not False
    ]
    if data:
        notes.append(
            f"data.{', data.'.join(data)}: Megatron-LM data settings, not used here (this run "
            "trains on the Python standard-library corpus)"
        )
    if config.dispatcher != DISPATCHER_TYPE and config.sections.get("microep"):
        notes.append(
            f"microep section not used: moe.moe_token_dispatcher_type is {config.dispatcher} "
            "(the balance report still uses microep.redundant_slots)"
        )
    return notes


def transformer_config(config: LaunchConfig):
    """The TransformerConfig the config's model/moe/parallel keys describe, for CPU (fp32, local spec)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    kwargs = {}
    for section in ("model", "moe", "parallel"):
        options = {o.key: o for o in SECTIONS[section]}
        for key, value in config.sections.get(section, {}).items():
            if options[key].embedded != TRANSFORMER:
                continue
            if key == "swiglu":
                if value:
                    kwargs.update(gated_linear_unit=True, activation_func=torch.nn.functional.silu)
                continue
            if key == "disable_bias_linear":
                kwargs["add_bias_linear"] = not value
                continue
            name = _TRANSFORMER_FIELD.get(key, key)
            if name not in fields:
                raise TrainError(f"{section}.{key}: this megatron-core has no TransformerConfig.{name}")
            kwargs[name] = value
    # Megatron's per-EP-rank expert initialisation (the CPU harness makes it work): with CPU
    # initialisation every EP rank would start from identical local experts.
    kwargs.update(
        use_cpu_initialization=False,
        params_dtype=torch.float32,
        bf16=False,
        fp16=False,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )
    config_obj = TransformerConfig(**kwargs)
    settings = config.microep_settings()
    if settings is not None:
        from megatron_microep.glue.config import attach_microep_config

        attach_microep_config(config_obj, settings)
    return config_obj


def padded_vocab_size(vocab_size: int, config: LaunchConfig) -> int:
    multiple = config.get("model", "make_vocab_size_divisible_by", 128)
    return int(math.ceil(vocab_size / multiple) * multiple)


def build_model(config: LaunchConfig, tconfig, vocab_size: int):
    """GPTModel with Megatron's local decoder block spec, MoE layers swapped for MicroEP ones if selected."""
    from megatron.core.models.gpt import GPTModel

    from megatron_microep.glue import compat

    if config.dispatcher == DISPATCHER_TYPE:
        from megatron_microep.glue.spec import microep_decoder_block_spec

        spec = microep_decoder_block_spec(tconfig, use_transformer_engine=False)
    else:
        spec = compat.stock_decoder_block_spec(tconfig, use_transformer_engine=False)
    seq = config.get("model", "seq_length")
    gpt_kwargs = dict(
        position_embedding_type=config.get("model", "position_embedding_type", "learned_absolute"),
        share_embeddings_and_output_weights=not config.get("model", "untie_embeddings_and_output_weights", False),
    )
    for key in ("rotary_base", "rotary_percent"):
        if config.get("model", key) is not None:
            gpt_kwargs[key] = config.get("model", key)
    return GPTModel(
        config=tconfig,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(vocab_size, config),
        max_sequence_length=config.get("model", "max_position_embeddings", seq),
        **gpt_kwargs,
    )


def moe_layers(model) -> list[torch.nn.Module]:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


# --- routing: trace, balance figures and load history -------------------------------------------


class RoutingRecorder:
    """Per training micro-batch and MoE layer, this rank's tokens per expert (a forward hook on each
    router); at the end of a step they are gathered over the EP group into ``tokens[source, expert]``.

    Rank 0 of the EP group holding global rank 0 writes the records to the trace. Every rank keeps
    the last ``history_steps`` steps of expert loads per layer (the checkpointed load history).
    """

    def __init__(self, layers: list[torch.nn.Module], ep_group, num_experts: int, history_steps: int):
        self.layers = layers
        self.layer_ids = [int(layer.layer_number) for layer in layers]
        self.ep_group, self.num_experts = ep_group, num_experts
        self.ep_size = dist.get_world_size(ep_group)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (layer id, int64 [E]) in forward order
        self.history: dict[int, deque[np.ndarray]] = {lid: deque(maxlen=history_steps) for lid in self.layer_ids}
        self.handles = [
            layer.router.register_forward_hook(self._hook(lid)) for layer, lid in zip(layers, self.layer_ids)
        ]

    def _hook(self, layer_id: int):
        def hook(module, inputs, output):
            if module.training and torch.is_grad_enabled():
                routing_map = output[1]
                self.pending.append((layer_id, routing_map.sum(dim=0).to(torch.int64).cpu()))

        return hook

    def end_step(self) -> list[tuple[int, int, np.ndarray]]:
        """Gather this step's counts; returns (micro-batch, layer id, tokens int64 [G, E]) per record."""
        if not self.pending:
            return []
        local = torch.stack([counts for _, counts in self.pending])  # [records, E]
        gathered = [torch.empty_like(local) for _ in range(self.ep_size)]
        dist.all_gather(gathered, local, group=self.ep_group)
        tokens = torch.stack(gathered, dim=1).numpy()  # [records, G, E]
        records, seen = [], {}
        per_layer: dict[int, list[np.ndarray]] = {lid: [] for lid in self.layer_ids}
        for (layer_id, _), block in zip(self.pending, tokens):
            micro = seen.get(layer_id, 0)
            seen[layer_id] = micro + 1
            records.append((micro, layer_id, block))
            per_layer[layer_id].append(block.sum(axis=0))
        for layer_id, rows in per_layer.items():
            self.history[layer_id].append(np.stack(rows) if rows else np.zeros((0, self.num_experts), np.int64))
        self.pending = []
        return records

    def state(self) -> dict[int, list[np.ndarray]]:
        return {lid: list(steps) for lid, steps in self.history.items()}

    def load_state(self, state: dict[int, list[np.ndarray]]) -> None:
        if sorted(state) != sorted(self.history):
            raise TrainError(
                f"checkpoint load history covers MoE layers {sorted(state)}, the model has {sorted(self.history)}"
            )
        for layer_id, steps in state.items():
            self.history[layer_id].clear()
            self.history[layer_id].extend(steps)


def home_loads(tokens: np.ndarray) -> np.ndarray:
    """int64 [G]: tokens each EP rank processes under stock EP (experts homed in contiguous blocks)."""
    G, E = tokens.shape
    return tokens.sum(axis=0).reshape(G, E // G).sum(axis=1)


def max_over_mean(loads: np.ndarray) -> float:
    mean = float(loads.mean())
    return float(loads.max()) / mean if mean > 0 else 1.0


# --- checkpoints ----------------------------------------------------------------------------------


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:07d}"


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = output_dir / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if (p / "complete.json").exists()) if root.exists() else []
    return done[-1] if done else None


def _manifest(spec: RunSpec, corpus_key: str) -> dict:
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
    this one can continue (same model, parallel layout, batch, seed, corpus, replica slots)."""
    checkpoint = latest_checkpoint(Path(spec.output_dir))
    corpus_key = json.loads((Path(spec.corpus_dir) / "meta.json").read_text())["key"]
    saved = json.loads((checkpoint / "manifest.json").read_text())
    _check_manifest(saved, _manifest(spec, corpus_key), checkpoint)


def _check_manifest(saved: dict, current: dict, where: Path) -> None:
    for key in current:
        if saved.get(key) != current[key]:
            raise TrainError(
                f"{where}: checkpoint was written with {key} = {saved.get(key)!r}, this run has "
                f"{current[key]!r}; resume with the same config (or start a new output directory)"
            )


# --- the rank loop --------------------------------------------------------------------------------


class _StopRequest:
    """Set by SIGINT/SIGTERM in this process or by ``STOP`` in the output directory; agreed on by all ranks."""

    def __init__(self, stop_file: Path):
        self.stop_file, self.signalled = stop_file, False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signalled = True

    def agreed(self) -> bool:
        flag = torch.tensor([1 if (self.signalled or self.stop_file.exists()) else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class _Log:
    def __init__(self, output_dir: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.text = open(output_dir / "train.log", "a", encoding="utf-8") if enabled else None
        metrics = output_dir / "metrics.jsonl"
        if enabled and resume_step is not None and metrics.exists():
            # Steps after the checkpoint are trained again: drop their old lines.
            kept = [
                ln
                for ln in metrics.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln)["step"] <= resume_step
            ]
            metrics.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        self.metrics = open(metrics, "a", encoding="utf-8") if enabled else None

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)
            self.text.write(text + "\n")
            self.text.flush()

    def record(self, row: dict) -> None:
        if self.enabled:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def close(self) -> None:
        if self.enabled:
            self.text.close()
            self.metrics.close()


def train_micro_batches(ddp, batches) -> list[torch.Tensor]:
    """Forward and backward of one step's micro-batches, then Megatron's gradient finalisation.

    What megatron-core's no-pipelining schedule does (it allocates on CUDA, so it is not used here):
    each micro-batch's mean token loss is divided by the number of micro-batches, the MoE auxiliary
    losses are scaled the same way, and ``finalize_model_grads`` reduces the DDP gradient buffers
    (dense parameters over data-parallel ranks, expert parameters over expert-data-parallel ranks).
    Returns the unscaled mean loss of every micro-batch.
    """
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    losses = []
    scale = 1.0 / len(batches)
    for tokens, labels, positions, mask in batches:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([scale]))
        loss = ddp(tokens, positions, mask, labels=labels).float().mean()
        (loss * scale).backward()
        losses.append(loss.detach())
    finalize_model_grads([ddp])
    return losses


def _to_batches(pairs, seq_length: int):
    mask = torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool), diagonal=1)[None, None]
    out = []
    for tokens, labels in pairs:
        t = torch.from_numpy(np.ascontiguousarray(tokens))
        positions = torch.arange(seq_length)[None].expand(t.shape[0], seq_length)
        out.append((t, torch.from_numpy(np.ascontiguousarray(labels)), positions, mask))
    return out


def _mean_over_dp(values: list[torch.Tensor], group) -> float:
    total = torch.stack(values).mean().reshape(1).to(torch.float64)
    dist.all_reduce(total, group=group)
    return float(total.item()) / dist.get_world_size(group)


def train_rank(spec: RunSpec) -> dict:
    """One rank of the run (the default process group is initialised). Returns a summary dict."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_microep.glue.data import Sampler, load_corpus, validation_batches
    from megatron_microep.glue.distributed import init_megatron_parallel
    from megatron_microep.glue.layer import microep_layers, set_training_step
    from megatron_microep.planning.placement import Placement
    from megatron_microep.runtime.telemetry import summarize
    from megatron_microep.simulator.traces import NativeTraceWriter

    cfg, out = spec.config, Path(spec.output_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != spec.world_size:
        raise TrainError(
            f"{world} ranks were started, the config asks for embedded.processes = {spec.world_size} "
            f"(--set embedded.processes={world})"
        )
    torch.set_num_threads(spec.embedded("threads_per_rank"))
    seed = cfg.value("training", "seed")
    ep = cfg.get("parallel", "expert_model_parallel_size")
    init_megatron_parallel(expert_model_parallel_size=ep, seed=seed)
    dp_group = parallel_state.get_data_parallel_group()
    dp_size, dp_rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    ep_group = parallel_state.get_expert_model_parallel_group()

    corpus = load_corpus(spec.corpus_dir)
    seq = cfg.get("model", "seq_length")
    mbs, gbs = cfg.get("training", "micro_batch_size"), cfg.get("training", "global_batch_size")
    num_micro = gbs // (mbs * dp_size)
    sampler = Sampler(corpus.train, seq, mbs, gbs, dp_size, seed)
    eval_interval, eval_iters = cfg.get("training", "eval_interval"), cfg.get("training", "eval_iters", 4)
    valid = (
        _to_batches(validation_batches(corpus.valid, seq, mbs, eval_iters, dp_rank, dp_size), seq)
        if eval_interval
        else None
    )

    tconfig = transformer_config(cfg)
    model = build_model(cfg, tconfig, corpus.vocab_size)
    ddp = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    train_iters = cfg.get("training", "train_iters")
    lr, min_lr = cfg.get("training", "lr"), cfg.get("training", "min_lr", 0.0)
    weight_decay = cfg.get("training", "weight_decay", 0.01)
    optimizer = AdamOnMainGrads(model, cfg, ep_group)
    scheduler = OptimizerParamScheduler(
        optimizer.torch_optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=cfg.get("training", "lr_warmup_iters", 0),
        lr_decay_steps=cfg.get("training", "lr_decay_iters", train_iters),
        lr_decay_style=cfg.get("training", "lr_decay_style", "linear"),
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
    )

    layers = moe_layers(model)
    micro_layers = microep_layers(model)
    settings: MicroEPConfig | None = cfg.microep_settings()
    history_steps = settings.history_window if settings else cfg.get("microep", "history_window", 50)
    recorder = RoutingRecorder(layers, ep_group, tconfig.num_moe_experts, history_steps)
    writes_trace = rank == 0

    manifest = _manifest(spec, corpus.meta["key"])
    start_step, losses, resume_step = 0, [], None
    trace_path = out / "routing" / "trace.mept"
    checkpoint = latest_checkpoint(out) if spec.resume else None
    if checkpoint is not None:
        state = torch.load(checkpoint / f"rank{rank:05d}.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        get_cuda_rng_tracker().set_states(state["rng"]["tracker"])
        recorder.load_state(state["load_history"])
        for layer in micro_layers:
            # Replay the saved per-step loads into the layer's planner history (as its forwards would
            # have recorded them), then restore the placement in force at the checkpoint.
            _restore_planner_history(layer, state["load_history"][int(layer.layer_number)])
            saved = state["placements"][int(layer.layer_number)]
            layer.set_placement(Placement.from_lists(saved, ep))
        start_step, losses, resume_step = state["step"], state["losses"], state["step"]
        if writes_trace:
            with open(trace_path, "r+b") as f:  # records of steps after the checkpoint are re-recorded
                f.truncate(state["trace_bytes"])

    log = _Log(out, rank == 0, resume_step)
    if rank == 0:
        trace_path.parent.mkdir(parents=True, exist_ok=True)
    trace = (
        NativeTraceWriter(trace_path, ep, tconfig.num_moe_experts, meta={"source": "microep train", "config": cfg.name})
        if writes_trace
        else None
    )
    stop = _StopRequest(out / STOP_FILE)
    log_interval = cfg.get("training", "log_interval", 10)
    save_interval = cfg.get("training", "save_interval")

    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        log.line(
            f"model: {cfg.get('model', 'num_layers')} layers, {len(layers)} MoE layers x "
            f"{tconfig.num_moe_experts} experts (top-{tconfig.moe_router_topk}), {n_params / 1e6:.2f} M "
            f"parameters on rank 0; dispatcher {cfg.dispatcher}; EP={ep}, DP={dp_size}, "
            f"{num_micro} micro-batches of {mbs} x {seq} tokens per rank and step"
        )
        if resume_step is not None:
            log.line(f"resumed from {checkpoint} at step {resume_step}")

    def save(step: int) -> Path:
        nonlocal trace
        directory = checkpoint_dir(out, step)
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            trace.close()  # flush: the checkpoint records how much of the trace it covers
            trace = NativeTraceWriter(trace_path, ep, tconfig.num_moe_experts)
        dist.barrier()
        state = {
            "step": step,
            "losses": losses,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()},
            "load_history": recorder.state(),
            "placements": {int(layer.layer_number): _placement_lists(layer.layout.placement) for layer in micro_layers},
            "trace_bytes": trace_path.stat().st_size if rank == 0 else None,
        }
        torch.save(state, directory / f"rank{rank:05d}.pt")
        dist.barrier()
        if rank == 0:
            state_rank0 = {"step": step, "trace_bytes": state["trace_bytes"], "saved": time.time()}
            (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
            (directory / "complete.json").write_text(json.dumps(state_rank0))
            log.line(f"saved checkpoint {directory}")
            complete = sorted(p for p in directory.parent.glob("step_*") if (p / "complete.json").exists())
            for old in complete[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old)
        dist.barrier()
        return directory

    interval_start, interval_steps = time.perf_counter(), 0
    interval_before: dict[int, list[float]] = {lid: [] for lid in recorder.layer_ids}
    status, step, last_saved = "completed", start_step, resume_step
    for step in range(start_step, train_iters):
        set_training_step(step)
        ddp.zero_grad_buffer()
        batches = _to_batches([sampler.micro_batch(step, m, dp_rank) for m in range(num_micro)], seq)
        micro_losses = train_micro_batches(ddp, batches)
        step_lr = optimizer.torch_optimizer.param_groups[0]["lr"]
        grad_norm = optimizer.step()
        if not math.isfinite(grad_norm):
            raise TrainError(f"step {step + 1}: gradient norm is {grad_norm} (non-finite gradients)")
        scheduler.step(increment=1)
        losses.append(_mean_over_dp(micro_losses, dp_group))
        for micro, layer_id, tokens in recorder.end_step():
            interval_before[layer_id].append(max_over_mean(home_loads(tokens)))
            if trace is not None:
                trace.write(step, micro, layer_id, tokens)
        interval_steps += 1
        done = step + 1
        if done % log_interval == 0 or done == train_iters:
            elapsed = time.perf_counter() - interval_start
            row = {
                "step": done,
                "loss": float(np.mean(losses[-interval_steps:])),
                "lr": step_lr,
                "grad_norm": grad_norm,
                "tokens_per_s": interval_steps * gbs * seq / elapsed,
                "s_per_step": elapsed / interval_steps,
                "layers": {},
            }
            after = {int(layer.layer_number): summarize(layer.telemetry.drain()) for layer in micro_layers}
            for layer_id in recorder.layer_ids:
                figures = {"before": float(np.mean(interval_before[layer_id]))}
                if layer_id in after and after[layer_id]:
                    s = after[layer_id]
                    figures.update(
                        after=s["imbalance_after"],
                        telemetry_before=s["imbalance_before"],
                        replicas=int(s["replicas"]),
                        replica_tokens=s["replica_tokens"],
                        remote_before=s["remote_before"],
                        remote_after=s["remote_after"],
                        scheduling_ms=s["scheduling_ms"],
                    )
                row["layers"][str(layer_id)] = figures
                interval_before[layer_id] = []
            log.record(row)
            log.line(_format_row(row, train_iters))
            interval_start, interval_steps = time.perf_counter(), 0
        if eval_interval and (done % eval_interval == 0 or done == train_iters):
            val = _mean_over_dp(evaluate(ddp, valid), dp_group)
            log.record({"step": done, "valid_loss": val})
            log.line(f"step {done:>5}/{train_iters} | validation loss {val:.4f} (ppl {math.exp(min(val, 50)):.1f})")
        stopping = stop.agreed()
        if (save_interval and done % save_interval == 0) or stopping or done == train_iters:
            save(done)
            last_saved = done
        if stopping:
            status = "interrupted"
            log.line(f"stopped after step {done} (signal or {STOP_FILE} file); resume with --resume")
            break
    if trace is not None:
        trace.close()
    log.close()
    for handle in recorder.handles:
        handle.remove()
    return {"status": status, "step": last_saved, "losses": losses, "rank": rank}


class AdamOnMainGrads:
    """torch AdamW stepping on the gradients Megatron's DDP reduced into ``param.main_grad``.

    megatron-core's own optimizers allocate CUDA tensors in their constructors, so the CPU run uses
    torch's AdamW with Megatron's conventions: no weight decay on biases and norm weights (1-D
    parameters), and the gradient norm clipped over the whole model, where expert parameters
    (``param.allreduce == False``) differ across EP ranks and dense ones are replicated.
    """

    def __init__(self, model, cfg: LaunchConfig, ep_group):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ep_group = ep_group
        self.clip = cfg.get("training", "clip_grad", 1.0)
        decay = [p for p in self.params if p.dim() > 1]
        no_decay = [p for p in self.params if p.dim() <= 1]
        betas = (cfg.get("training", "adam_beta1", 0.9), cfg.get("training", "adam_beta2", 0.999))
        self.torch_optimizer = torch.optim.AdamW(
            [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}],
            lr=cfg.get("training", "lr"),
            betas=betas,
            eps=cfg.get("training", "adam_eps", 1e-8),
            weight_decay=cfg.get("training", "weight_decay", 0.01),
        )

    def grad_norm(self) -> float:
        dense = torch.zeros(1, dtype=torch.float64)
        expert = torch.zeros(1, dtype=torch.float64)
        for p in self.params:
            target = dense if getattr(p, "allreduce", True) else expert
            target += p.grad.double().square().sum()
        dist.all_reduce(expert, group=self.ep_group)
        return float((dense + expert).sqrt().item())

    def step(self) -> float:
        """Clip and apply one update; returns the gradient norm before clipping."""
        for p in self.params:
            p.grad = p.main_grad
        norm = self.grad_norm()
        if self.clip and math.isfinite(norm):
            coeff = self.clip / (norm + 1e-6)
            if coeff < 1.0:
                for p in self.params:
                    p.grad.mul_(coeff)
        if math.isfinite(norm):
            self.torch_optimizer.step()
        for p in self.params:
            p.grad = None
        return norm

    def state_dict(self) -> dict:
        return self.torch_optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.torch_optimizer.load_state_dict(state)


def evaluate(ddp, batches) -> list[torch.Tensor]:
    ddp.eval()
    try:
        with torch.no_grad():
            return [
                ddp(tokens, positions, mask, labels=labels).float().mean()
                for tokens, labels, positions, mask in batches
            ]
    finally:
        ddp.train()


def _placement_lists(placement) -> list[list[int]]:
    return [placement.gpus[placement.ptr[e] : placement.ptr[e + 1]].tolist() for e in range(placement.num_experts)]


def _restore_planner_history(layer, steps: list[np.ndarray]) -> None:
    """Feed saved per-step expert loads to the layer's placement controller through its public
    ``record``/``on_step`` interface, with re-planning paused so that no plan starts during the replay.
    Replay steps are numbered below zero, so the first real step is always a new one."""
    controller = layer.placement_controller
    interval, controller.replan_interval = controller.replan_interval, 0
    try:
        for index, rows in enumerate(steps):
            controller.on_step(index - len(steps) - 1)
            for row in rows:
                controller.record(row)
        controller.on_step(-1)
    finally:
        controller.replan_interval = interval


def _format_row(row: dict, total: int) -> str:
    parts = [
        f"step {row['step']:>5}/{total}",
        f"loss {row['loss']:.4f}",
        f"lr {row['lr']:.2e}",
        f"{row['tokens_per_s']:,.0f} tok/s",
        f"{row['s_per_step']:.2f} s/step",
    ]
    layers = row["layers"]
    if any("after" in f for f in layers.values()):
        balance = " ".join(f"L{lid} {f['before']:.2f}->{f['after']:.2f}" for lid, f in layers.items())
        parts.append(f"max/mean before->after {balance}")
        replica = sum(f.get("replica_tokens", 0.0) for f in layers.values())
        parts.append(f"replica tokens/mb {replica:,.0f}")
    else:
        parts.append("max/mean (stock EP) " + " ".join(f"L{lid} {f['before']:.2f}" for lid, f in layers.items()))
    return " | ".join(parts)


# --- launching ------------------------------------------------------------------------------------


def _rank_entry(rank: int, world_size: int, spec: RunSpec) -> dict:
    return train_rank(spec)


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def report_policies(config: LaunchConfig) -> list[str]:
    from megatron_microep.planning.policies import POLICIES

    names = config.value("embedded", "report_policies")
    if names == ["all"]:
        return list(POLICIES)
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise TrainError(
            f"{config.source}: embedded.report_policies: unknown policy {unknown[0]!r} "
            f"(known: all, {', '.join(POLICIES)})"
        )
    return names


def write_balance_report(output_dir: Path, config: LaunchConfig):
    """Replay the recorded routing through the balancing policies (the simulator's report).

    Times are the simulator's default cost model (DeepSeek-V3-shaped experts on H100 nodes): the
    tiny model's own expert GEMMs would be all fixed overhead, while balance figures (max/mean,
    remote tokens) do not depend on the cost model.
    """
    from megatron_microep.simulator import simulate
    from megatron_microep.simulator.cost import CostModel

    cost = CostModel()
    microep = config.microep_section()
    # The run's node size when its planner confined replicas to nodes (the microep row replays that).
    gpus_per_node = microep.gpus_per_node if config.dispatcher == DISPATCHER_TYPE else None
    return simulate(
        str(output_dir / "routing" / "trace.mept"),
        report_policies(config),
        microep.redundant_slots,
        gpus_per_node,
        output_dir / "report",
        cost,
        policy_params=replayed_microep_params(config),
        warmup_steps=1,
        plots=True,
        progress=None,
    )


def replayed_microep_params(config: LaunchConfig) -> dict[str, dict]:
    """The simulator's ``microep`` policy set up as the run's MicroEP layers were (re-plan interval,
    history window, the shared planner's settings), so the report's microep row replays what trained."""
    if config.dispatcher != DISPATCHER_TYPE:
        return {}
    settings = config.microep_settings()
    if settings.replan_interval == 0:
        return {}  # never re-planned in the run: the simulator's defaults show what re-planning would do
    micro_batches = config.get("training", "global_batch_size") // (
        config.get("training", "micro_batch_size") * config.value("embedded", "processes")
    )
    return {"microep": simulator_params(settings, micro_batches)}


def run(
    config: LaunchConfig,
    output_dir: str | os.PathLike,
    resume: bool = False,
    cache_dir: str | None = None,
    report: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Prepare the corpus, train (spawned gloo ranks, or this process as one torchrun rank), write the report.

    Returns ``{"status", "step", "losses", "report"}`` (``report``: the simulator output or None).
    """
    from megatron_microep.glue.data import prepare_corpus
    from megatron_microep.glue.distributed import RankFailedError, spawn_gloo

    notes = check_embedded_support(config)
    if not (_under_torchrun() and os.environ["RANK"] != "0"):  # once per run, not once per torchrun rank
        for note in notes:
            log(f"note: {note}")
    report_policies(config)  # reject unknown names before training, not after
    out = Path(output_dir)
    if resume and latest_checkpoint(out) is None:
        raise TrainError(f"--resume: no complete checkpoint in {out / 'checkpoints'}")
    if not resume and (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise TrainError(f"{out} already holds checkpoints: pass --resume to continue, or use a new output directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / STOP_FILE).unlink(missing_ok=True)
    cache = Path(cache_dir or os.environ.get("MICROEP_CACHE_DIR") or Path.home() / ".cache" / "megatron-microep")
    world = config.value("embedded", "processes")
    seed = config.value("training", "seed")
    get = lambda key: config.value("embedded", key)  # noqa: E731

    def corpus():
        return prepare_corpus(
            cache, get("corpus_megabytes"), get("tokenizer_vocab_size"), get("validation_fraction"), seed, log=log
        )

    if _under_torchrun():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks: the CPU harness refuses to run beside CUDA
        rank = int(os.environ["RANK"])
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=get("timeout_minutes")))
        try:
            # Rank 0 builds the corpus (cached on the shared file system); the others wait for it.
            directory = [str(corpus().directory) if rank == 0 else None]
            dist.broadcast_object_list(directory, src=0)
            spec = RunSpec(config, str(out), directory[0], resume, world)
            if resume:
                check_resumable(spec)
            result = train_rank(spec)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if rank != 0:
            return {**result, "report": None}
    else:
        spec = RunSpec(config, str(out), str(corpus().directory), resume, world)
        if resume:
            check_resumable(spec)
        stop_file = out / STOP_FILE
        previous = {}

        def request_stop(signum, frame):
            # Ranks see the signal too when it came from the terminal; the file reaches them otherwise.
            stop_file.touch()
            log(f"stop requested ({signal.Signals(signum).name}): finishing the current step and saving")
            for sig, handler in previous.items():
                signal.signal(sig, handler)  # a second signal interrupts at once

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request_stop)
        try:
            results = spawn_gloo(
                _rank_entry,
                world,
                spec,
                timeout_s=60 * get("timeout_minutes"),
                threads_per_rank=get("threads_per_rank"),
            )
        except RankFailedError as err:
            raise TrainError(str(err)) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            stop_file.unlink(missing_ok=True)
        result = results[0]
    output = None
    if report and result["status"] == "completed":
        output = write_balance_report(out, config)
    return {**result, "report": output}
