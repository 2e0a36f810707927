#!/usr/bin/env python3
"""Megatron-LM GPT pretraining with MicroEP, without a fork.

Runs Megatron-LM's own ``pretrain_gpt.py`` pipeline (data, model provider, forward step, training
loop) from a Megatron-LM checkout on ``PYTHONPATH`` (or ``MEGATRON_LM_PATH``), core_r0.16 to main
(megatron-core 0.20), and adds MicroEP through Megatron-LM's own hooks:

- ``--microep-*`` flags and the ``microep`` value of ``--moe-token-dispatcher-type``: an
  ``extra_args_provider`` (passed to ``pretrain`` up to core_r0.17 and to
  ``parse_and_validate_args`` from core_r0.18, next to ModelOpt's when that is installed);
- the MicroEP layers: ``--spec megatron_microep.glue.spec microep_layer_spec``, added when the
  dispatcher is ``microep`` and no ``--spec`` is given;
- the MicroEP flags are checked against the rest of the job before anything is built.

Without a visible GPU the same command trains on CPU ranks (gloo): the CPU harness
(``megatron_microep.glue.cpu.enable_cpu_megatron_training``) patches Megatron at runtime, and
``CPU_FLAGS`` are added to the command line (the first log line says so). With a GPU nothing of this
happens. On Python 3.11, ``typing.override`` (3.12), which ``megatron.training`` imports from
core_r0.17 on, is provided from ``typing_extensions`` before Megatron-LM is imported.

    torchrun --nproc-per-node 8 ... scripts/pretrain_gpt_microep.py $(microep launch-args mixtral-8x7b) \\
        --data-path /data/corpus_text_document --save /ckpt --load /ckpt

``--microep-check args|model`` (this script's own option, removed before Megatron parses) checks a
launch without training: ``args`` parses and validates the command line with the checkout's
parser (``WORLD_SIZE`` sets the world size it assumes); ``model`` also builds the model with the
checkout's model provider on CPU ranks (gloo; start them with torchrun) and runs one forward and
backward pass. docs/launch.md lists the Megatron-LM versions this was run against.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import sys
import time
import types

_PROGRAM_START = time.time()

SPEC = ("megatron_microep.glue.spec", "microep_layer_spec")
SUPPORTED = ((0, 16), (0, 20))
CHECK_FLAG = "--microep-check"
CHECK_LEVELS = ("args", "model")
# What ``--microep-check args`` tells Megatron's argument validation about the GPU when there is none.
ASSUMED_GPU = types.SimpleNamespace(
    name="an H100 (compute capability 9.0, 80 GB)", major=9, minor=0, total_memory=80 * 2**30, multi_processor_count=132
)


# Added on CPU ranks (training and --microep-check model): gloo instead of NCCL, and the three fused
# kernels Megatron-LM turns on by default that need TransformerEngine or apex (CUDA); each one of them
# stops a CPU run. Megatron-LM's other fusions run on CPU (torch.compile) and stay as given.
CPU_FLAGS = (
    ("--distributed-backend", "gloo"),
    ("--no-rope-fusion",),
    ("--no-persist-layer-norm",),
    ("--no-gradient-accumulation-fusion",),
)


def fail(message: str) -> None:
    print(f"pretrain_gpt_microep.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def option_value(argv, flag):
    """Value of ``flag`` in ``argv`` (``--f v`` or ``--f=v``), or None."""
    for i, item in enumerate(argv):
        if item == flag:
            return argv[i + 1] if i + 1 < len(argv) else None
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return None


def replace_option(argv, flag, value):
    """``argv`` with the value of ``flag`` (``--f v`` or ``--f=v``) replaced by ``value``."""
    out = list(argv)
    for i, item in enumerate(out):
        if item == flag and i + 1 < len(out):
            out[i + 1] = value
        elif item.startswith(flag + "="):
            out[i] = f"{flag}={value}"
    return out


def pop_check_level(argv):
    """(argv without ``--microep-check LEVEL``, LEVEL or None)."""
    level = option_value(argv, CHECK_FLAG)
    if level is None:
        if CHECK_FLAG in argv:
            fail(f"{CHECK_FLAG} needs a level: {' or '.join(CHECK_LEVELS)}")
        return argv, None
    if level not in CHECK_LEVELS:
        fail(f"{CHECK_FLAG} must be one of {', '.join(CHECK_LEVELS)}, got {level!r}")
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == CHECK_FLAG:
            skip = True
            continue
        if item.startswith(CHECK_FLAG + "="):
            continue
        out.append(item)
    return out, level


def with_microep_spec(argv):
    """Add ``--spec`` for the MicroEP layers when the dispatcher is microep; reject a conflicting spec."""
    if option_value(argv, "--moe-token-dispatcher-type") != "microep":
        return argv
    if "--spec" not in argv:
        return [*argv, "--spec", *SPEC]
    at = argv.index("--spec")
    if tuple(argv[at + 1 : at + 3]) != SPEC:
        fail(
            f"--moe-token-dispatcher-type microep needs --spec {' '.join(SPEC)}, got --spec "
            f"{' '.join(argv[at + 1 : at + 3])}"
        )
    return argv


@contextlib.contextmanager
def stock_dispatcher_in_argv():
    """Show ``sys.argv`` with a stock dispatcher value for the duration of the block.

    Megatron-LM's fault-tolerance and in-process-restart set-up parse the whole command line with
    ``ignore_unknown_args=True`` but without extra argument providers: the ``--microep-*`` flags are
    skipped as unknown, yet argparse rejects the value ``microep`` of a known flag. Both read only
    their own flags, so they are shown ``--moe-token-dispatcher-type alltoall`` instead.
    """
    argv = sys.argv
    sys.argv = [argv[0], *replace_option(argv[1:], "--moe-token-dispatcher-type", "alltoall")]
    try:
        yield
    finally:
        sys.argv = argv


def wrap_own_flag_parsers() -> None:
    """``megatron.training.ft_integration.setup`` (called inside ``pretrain``) under
    ``stock_dispatcher_in_argv``; ``training.py`` looks it up on the module at call time."""
    from megatron.training import ft_integration

    original = ft_integration.setup

    @functools.wraps(original)
    def setup(*args, **kwargs):
        with stock_dispatcher_in_argv():
            return original(*args, **kwargs)

    ft_integration.setup = setup


def cpu_argv(argv):
    """``argv`` for CPU ranks: ``CPU_FLAGS`` added; exit 2 for settings that need a GPU."""
    impl = option_value(argv, "--transformer-impl")
    if impl != "local":
        fail(
            f"CPU ranks need --transformer-impl local, got {impl or 'transformer_engine (the default)'}: "
            "TransformerEngine needs CUDA"
        )
    if "--moe-grouped-gemm" in argv:
        fail("--moe-grouped-gemm needs TransformerEngine (CUDA); CPU ranks run the local experts")
    backend = option_value(argv, "--distributed-backend")
    if backend not in (None, "gloo"):
        fail(f"CPU ranks communicate over gloo, got --distributed-backend {backend}")
    given = {item.split("=", 1)[0] for item in argv}
    return [*argv, *(item for flag in CPU_FLAGS if flag[0] not in given for item in flag)]


def rank0_print(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def import_megatron_lm():
    """The checkout's ``pretrain_gpt`` module and megatron-core's (major, minor) version."""
    from megatron_microep.glue.cpu import provide_typing_override

    provide_typing_override()
    root = os.environ.get("MEGATRON_LM_PATH")
    if root:
        sys.path.insert(0, root)
    try:
        pretrain_gpt = importlib.import_module("pretrain_gpt")
    except ModuleNotFoundError as err:
        if err.name in ("pretrain_gpt", "gpt_builders", "model_provider", "megatron.training", "megatron"):
            fail(
                f"cannot import {err.name}: put a Megatron-LM checkout (core_r0.16 to main, megatron-core 0.20) "
                "on PYTHONPATH or set MEGATRON_LM_PATH"
            )
        raise
    from megatron.core import package_info

    version = tuple(int(x) for x in package_info.__version__.split(".")[:2])
    if not SUPPORTED[0] <= version <= SUPPORTED[1]:
        fail(
            f"Megatron-LM with megatron-core {package_info.__version__} is not supported "
            f"(megatron-core {SUPPORTED[0][0]}.{SUPPORTED[0][1]} to {SUPPORTED[1][0]}.{SUPPORTED[1][1]})"
        )
    return pretrain_gpt, version


def extra_args_provider(pretrain_gpt):
    """MicroEP's flags, plus ModelOpt's where ``pretrain_gpt`` would have registered them."""
    from megatron_microep.glue.args import add_microep_args

    providers = [add_microep_args]
    if getattr(pretrain_gpt, "has_nvidia_modelopt", False):
        providers.append(pretrain_gpt.add_modelopt_args)

    def provide(parser):
        for provider in providers:
            parser = provider(parser)
        return parser

    return provide


def validate_microep(args) -> None:
    from megatron_microep.glue.args import validate_microep_args
    from megatron_microep.glue.config import MicroEPConfigError

    try:
        validate_microep_args(args)
    except MicroEPConfigError as err:
        fail(str(err))


ARGS_DEFAULTS = {"tokenizer_type": "GPT2BPETokenizer"}  # pretrain_gpt.py's own default


def parse_and_validate(pretrain_gpt):
    """Parse and validate ``sys.argv`` with the checkout's parser; set Megatron's global args."""
    from megatron.training import arguments

    provider = extra_args_provider(pretrain_gpt)
    if hasattr(arguments, "parse_and_validate_args"):  # core_r0.18 on
        args = arguments.parse_and_validate_args(extra_args_provider=provider, args_defaults=ARGS_DEFAULTS)
    else:
        from megatron.training.global_vars import set_global_variables

        args = arguments.parse_args(extra_args_provider=provider)
        arguments.validate_args(args, ARGS_DEFAULTS)
        set_global_variables(args)
    validate_microep(args)
    return args


def pretrain(pretrain_gpt) -> None:
    """pretrain_gpt.py's main, per Megatron-LM version, with MicroEP's argument provider."""
    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, set_startup_timestamps
    from megatron.training import pretrain as megatron_pretrain

    set_startup_timestamps(program_start=_PROGRAM_START, main_entry=time.time())
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    wrap_own_flag_parsers()
    with stock_dispatcher_in_argv():
        run, store = inprocess_restart.maybe_wrap_for_inprocess_restart(megatron_pretrain)
    datasets = pretrain_gpt.train_valid_test_datasets_provider
    model_provider = functools.partial(pretrain_gpt.model_provider, pretrain_gpt.gpt_builder)
    common = dict(store=store, get_embedding_ranks=pretrain_gpt.get_embedding_ranks)

    if "extra_args_provider" in inspect.signature(megatron_pretrain).parameters:  # core_r0.16, core_r0.17
        from megatron.training import arguments

        provider = extra_args_provider(pretrain_gpt)
        # pretrain() parses the command line itself; parse it once before, so that bad MicroEP
        # flags fail here with a clear message rather than when the first layer is built.
        validate_microep(arguments.parse_args(extra_args_provider=provider))
        run(
            datasets,
            model_provider,
            ModelType.encoder_or_decoder,
            pretrain_gpt.forward_step,
            args_defaults=ARGS_DEFAULTS,
            extra_args_provider=provider,
            **common,
        )
        return
    from megatron.training import argument_utils

    args = parse_and_validate(pretrain_gpt)
    if hasattr(argument_utils, "gpt_config_from_args"):  # core_r0.19: the model comes from its config
        if getattr(pretrain_gpt, "has_nvidia_modelopt", False):
            pretrain_gpt.maybe_enable_modelopt(args)
        config = argument_utils.pretrain_cfg_container_from_args(args, argument_utils.gpt_config_from_args(args))
        run(config, datasets, ModelType.encoder_or_decoder, pretrain_gpt.forward_step, **common)
    else:  # core_r0.18
        config = argument_utils.pretrain_cfg_container_from_args(args)
        run(config, datasets, model_provider, ModelType.encoder_or_decoder, pretrain_gpt.forward_step, **common)


def check(pretrain_gpt, version, level: str) -> None:
    """``--microep-check``: validate the launch with the checkout; with ``model``, build and step it on CPU."""
    if level == "model":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks: the CPU harness refuses to run beside CUDA
        import datetime

        import torch.distributed as dist

        if "RANK" not in os.environ:
            os.environ.update(
                RANK="0",
                LOCAL_RANK="0",
                WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=os.environ.get("MASTER_PORT", "29571"),
            )
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    import torch

    if torch.cuda.is_available():
        args = parse_and_validate(pretrain_gpt)
    else:
        if level == "args":
            print(f"check: no GPU here: validating as on {ASSUMED_GPU.name}")
        # validate_args asks for the GPU architecture in some branches (grouped GEMM, fusions):
        # answer as a Hopper GPU (sm_90), the kind the presets target, while it runs (torch.compile
        # asks too, on the model check's CPU ranks, and must hear the truth).
        queries = torch.cuda.get_device_capability, torch.cuda.get_device_properties
        torch.cuda.get_device_capability = lambda device=None: (ASSUMED_GPU.major, ASSUMED_GPU.minor)
        torch.cuda.get_device_properties = lambda device=None: ASSUMED_GPU
        try:
            args = parse_and_validate(pretrain_gpt)
        finally:
            torch.cuda.get_device_capability, torch.cuda.get_device_properties = queries
    rank = int(os.environ.get("RANK", "0"))
    from megatron.core import package_info

    if rank == 0:
        print(
            f"check: Megatron-LM {os.path.dirname(os.path.abspath(pretrain_gpt.__file__))} (megatron-core "
            f"{package_info.__version__}): arguments parsed and validated; world size {args.world_size}, "
            f"TP {args.tensor_model_parallel_size} PP {args.pipeline_model_parallel_size} "
            f"EP {args.expert_model_parallel_size}, dispatcher {args.moe_token_dispatcher_type}, spec {args.spec}"
        )
    if level == "args":
        return
    check_model(pretrain_gpt, version, args, rank)


def check_model(pretrain_gpt, version, args, rank: int) -> None:
    import torch
    import torch.distributed as dist

    from megatron_microep.glue.distributed import init_megatron_parallel
    from megatron_microep.glue.layer import microep_layers, set_training_step

    if args.fp16 or args.bf16:
        fail(f"{CHECK_FLAG} model runs on CPU in fp32: drop --bf16/--fp16 for the check")
    pg = init_megatron_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size or args.tensor_model_parallel_size,
        seed=args.seed,
    )
    args.use_cpu_initialization = True
    if version >= (0, 19):
        from megatron.training import argument_utils

        config = argument_utils.gpt_config_from_args(args)
        config.transformer.use_cpu_initialization = True
        module, _, name = config.builder.rpartition(".")
        model = getattr(importlib.import_module(module), name)(config).build_model(
            pg, pre_process=True, post_process=True
        )
    else:
        model = pretrain_gpt.model_provider(pretrain_gpt.gpt_builder, pre_process=True, post_process=True)
    layers = microep_layers(model)
    moe = [m for m in model.modules() if type(m).__name__.endswith("MoELayer")]
    if args.moe_token_dispatcher_type == "microep" and (not layers or len(layers) != len(moe)):
        fail(f"the checkout built {len(layers)} MicroEP layers among {len(moe)} MoE layers")
    set_training_step(0)
    generator = torch.Generator().manual_seed(args.seed + rank)
    batch, seq = args.micro_batch_size, args.seq_length
    tokens = torch.randint(0, args.padded_vocab_size, (batch, seq + 1), generator=generator)
    positions = torch.arange(seq)[None].expand(batch, seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    model.train()
    loss = model(tokens[:, :-1], positions, mask, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is None and getattr(p, "main_grad", None) is None
    ]
    if missing:
        fail(f"parameters without gradient after backward: {missing[:5]}")
    total = torch.tensor([float(loss)])
    dist.all_reduce(total)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"check: rank {rank}: {type(model).__name__} with {len(layers)} MicroEP / {len(moe)} MoE layers, "
        f"{params / 1e6:.2f} M parameters; forward and backward on CPU, loss {float(loss):.4f}",
        flush=True,
    )
    dist.barrier()
    if rank == 0:
        print(
            f"check: model OK on {dist.get_world_size()} CPU ranks (mean loss {float(total) / dist.get_world_size():.4f})"
        )
    dist.destroy_process_group()


def runs_on_cpu(level: str | None, cuda_visible: bool) -> bool:
    """Whether this launch runs on CPU ranks: the model check always; training without a GPU."""
    return level == "model" or (level is None and not cuda_visible)


def main() -> None:
    import torch

    argv, level = pop_check_level(sys.argv[1:])
    argv = with_microep_spec(argv)
    on_cpu = runs_on_cpu(level, torch.cuda.is_available())
    if on_cpu:
        argv = cpu_argv(argv)
        what = "the model check" if level == "model" else "no GPU visible: Megatron-LM's pretrain()"
        rank0_print(
            f"pretrain_gpt_microep.py: {what} on CPU ranks (gloo) through the CPU harness "
            f"(megatron_microep.glue.cpu), with {' '.join(' '.join(flag) for flag in CPU_FLAGS)}"
        )
    sys.argv = [sys.argv[0], *argv]
    pretrain_gpt, version = import_megatron_lm()
    if version < (0, 19) and option_value(argv, "--mtp-num-layers") is not None:
        fail(
            "--mtp-num-layers needs Megatron-LM core_r0.19 or later here: before it, gpt_builders.py reads "
            "use_te before assigning it whenever --spec is given (MicroEP's layers come in through --spec)"
        )
    from megatron_microep.glue.spec import build_mtp_blocks_with_microep

    build_mtp_blocks_with_microep()  # the checkout's builders take MTP layers from Megatron's specs
    if level is not None:
        check(pretrain_gpt, version, level)
        return
    if on_cpu:
        from megatron_microep.glue.cpu import enable_cpu_megatron_training

        rank0_print(f"CPU harness: {'; '.join(enable_cpu_megatron_training())}")
    pretrain(pretrain_gpt)


if __name__ == "__main__":
    main()
