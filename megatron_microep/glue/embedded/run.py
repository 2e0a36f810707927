"""The entry point of the embedded run: prepare the corpus, start the ranks (spawned gloo processes, or
this process as one torchrun rank), turn signals into a stop request, write the report.

Interrupting (Ctrl-C, SIGTERM, or a ``STOP`` file in the output directory) saves a checkpoint at the
end of the current step and exits; ``resume`` continues from the newest checkpoint with the same
samples, optimizer state and placement decisions, so the loss curve is the uninterrupted one.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from megatron_microep.glue.config_schema import LaunchConfig
from megatron_microep.glue.embedded import STOP_FILE, RunSpec, TrainError
from megatron_microep.glue.embedded.checkpoint import check_resumable, latest_checkpoint
from megatron_microep.glue.embedded.model import check_embedded_support
from megatron_microep.glue.embedded.report import report_policies, write_balance_report


def _rank_entry(rank: int, world_size: int, spec: RunSpec) -> dict:
    from megatron_microep.glue.embedded.loop import train_rank

    return train_rank(spec)


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def run(
    config: LaunchConfig,
    output_dir: str | os.PathLike,
    resume: bool = False,
    cache_dir: str | None = None,
    report: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Prepare the corpus, train, write the report.

    Returns ``{"status", "step", "losses", "rank", "report"}`` (``report``: a ``BalanceReport`` or None).
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
            result = _rank_entry(rank, world, spec)
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
            # The file reaches the ranks (each leads its own process group: a terminal's signal does not).
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
