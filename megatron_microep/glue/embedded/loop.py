"""One rank of the embedded run: Megatron-LM's training loop in small, on Megatron's own stack.

Per step: ``get_forward_backward_func`` runs the step's micro-batches (loss averaged over them, the
MoE auxiliary losses scaled alike, gradient sync deferred to the last micro-batch,
``finalize_model_grads`` at the end), the Megatron optimizer steps (gradient clipping over dense and
expert parameters), the scheduler advances. Evaluation is the same schedule, forward only. Around
it: the routing trace, the per-interval log and metrics, checkpoints and the stop request.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_microep.glue.embedded import STOP_FILE, RunSpec, TrainError
from megatron_microep.glue.embedded import checkpoint as ckpt
from megatron_microep.glue.embedded.model import (
    build_model,
    moe_layers,
    optimizer_names,
    quiet_megatron_warnings,
    training_stack,
    transformer_config,
)
from megatron_microep.glue.embedded.routing import RoutingRecorder, home_loads, max_over_mean


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


def _to_batches(pairs, seq_length: int):
    mask = torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool), diagonal=1)[None, None]
    out = []
    for tokens, labels in pairs:
        t = torch.from_numpy(np.ascontiguousarray(tokens))
        positions = torch.arange(seq_length)[None].expand(t.shape[0], seq_length)
        out.append((t, torch.from_numpy(np.ascontiguousarray(labels)), positions, mask))
    return out


def forward_step(data_iterator, model):
    """Megatron's ``forward_step_func``: the next micro-batch through ``model``; its mean token loss."""
    tokens, labels, positions, mask = next(data_iterator)
    output = model(tokens, positions, mask, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        # A copy: the schedule divides the returned loss in place by the number of micro-batches.
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def run_schedule(ddp, batches, seq_length: int, forward_only: bool) -> list[torch.Tensor]:
    """Megatron's schedule over ``batches``; the mean loss of every micro-batch."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    results = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[ddp],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=batches[0][0].shape[0],
        forward_only=forward_only,
    )
    return [r["lm loss"] for r in results]


def evaluate(ddp, batches, seq_length: int) -> list[torch.Tensor]:
    ddp.eval()
    try:
        with torch.no_grad():
            return run_schedule(ddp, batches, seq_length, forward_only=True)
    finally:
        ddp.train()


def _mean_over_dp(values: list[torch.Tensor], group) -> float:
    total = torch.stack(values).mean().reshape(1).to(torch.float64)
    dist.all_reduce(total, group=group)
    return float(total.item()) / dist.get_world_size(group)


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


def train_rank(spec: RunSpec) -> dict:
    """One rank of the run (the default process group is initialised). Returns a summary dict."""
    cfg, out = spec.config, Path(spec.output_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    quiet_megatron_warnings()
    if world != spec.world_size:
        raise TrainError(
            f"{world} ranks were started, the config asks for embedded.processes = {spec.world_size} "
            f"(--set embedded.processes={world})"
        )
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_microep.glue.data import Sampler, load_corpus, validation_batches
    from megatron_microep.glue.distributed import init_megatron_parallel
    from megatron_microep.glue.layer import microep_layers, set_training_step
    from megatron_microep.runtime.telemetry import summarize
    from megatron_microep.simulator.traces import NativeTraceWriter

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
    ddp, optimizer, scheduler = training_stack(cfg, tconfig, model)
    train_iters = cfg.get("training", "train_iters")
    layers = moe_layers(model)
    micro_layers = microep_layers(model)
    recorder = RoutingRecorder(layers, ep_group)

    manifest = ckpt.manifest(spec, corpus.meta["key"])
    start_step, losses, resume_step = 0, [], None
    trace_path = out / "routing" / "trace.mept"
    checkpoint = ckpt.latest_checkpoint(out) if spec.resume else None
    if checkpoint is not None:
        state = ckpt.restore(checkpoint, model, optimizer, scheduler, micro_layers, ep)
        start_step, losses, resume_step = state["step"], state["losses"], state["step"]
        if rank == 0:
            with open(trace_path, "r+b") as f:  # records of steps after the checkpoint are re-recorded
                f.truncate(state["trace_bytes"])

    log = _Log(out, rank == 0, resume_step)
    trace = None
    if rank == 0:
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"source": "microep train", "config": cfg.name}
        trace = NativeTraceWriter(trace_path, ep, tconfig.num_moe_experts, meta=meta)
    stop = _StopRequest(out / STOP_FILE)
    log_interval = cfg.get("training", "log_interval", 10)
    save_interval = cfg.get("training", "save_interval")

    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        log.line(
            f"model: {cfg.get('model', 'num_layers')} layers, {len(layers)} MoE layers x "
            f"{tconfig.num_moe_experts} experts (top-{tconfig.moe_router_topk}), {n_params / 1e6:.2f} M "
            f"parameters on rank 0; dispatcher {cfg.dispatcher}; EP={ep}, DP={dp_size}, "
            f"{num_micro} micro-batches of {mbs} x {seq} tokens per rank and step; Megatron schedule "
            f"{get_forward_backward_func().__name__}, optimizer {' + '.join(optimizer_names(optimizer))}"
        )
        if resume_step is not None:
            log.line(f"resumed from {checkpoint} at step {resume_step}")

    def save(step: int) -> None:
        nonlocal trace
        trace_bytes = None
        if rank == 0:
            trace.close()  # flush: the checkpoint records how much of the trace it covers
            trace_bytes = trace_path.stat().st_size
            trace = NativeTraceWriter(trace_path, ep, tconfig.num_moe_experts)
        state = ckpt.rank_state(step, losses, model, optimizer, scheduler, micro_layers, trace_bytes)
        ckpt.save(ckpt.checkpoint_dir(out, step), state, manifest, log.line)

    interval_start, interval_steps = time.perf_counter(), 0
    interval_before: dict[int, list[float]] = {lid: [] for lid in recorder.layer_ids}
    status, last_saved = "completed", resume_step
    for step in range(start_step, train_iters):
        set_training_step(step)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        batches = _to_batches([sampler.micro_batch(step, m, dp_rank) for m in range(num_micro)], seq)
        micro_losses = run_schedule(ddp, batches, seq, forward_only=False)
        step_lr = optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = optimizer.step()
        if grad_norm is None or not math.isfinite(grad_norm):
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
                if after.get(layer_id):
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
            val = _mean_over_dp(evaluate(ddp, valid, seq), dp_group)
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
    recorder.close()
    return {"status": status, "step": last_saved, "losses": losses, "rank": rank}
