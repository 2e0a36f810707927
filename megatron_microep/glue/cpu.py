"""Run megatron-core's MoE code on CPU (gloo): a shim for the CUDA calls it makes unconditionally.

megatron-core assumes a CUDA device even where the math is device-agnostic: it allocates on
``torch.cuda.current_device()``, creates side streams, keeps its RNG states on the CUDA generator,
and hands the all-to-all dispatcher's split sizes over as numpy arrays only when they start on the
GPU; its optimizers, gradient clipping and schedules allocate with a literal ``device="cuda"`` and
check parameter types against CUDA type names. ``enable_cpu_megatron()`` neutralises exactly those
uses so that the stock ``MoELayer`` (local spec, ``SequentialMLP``) and our dispatcher run forward
and backward on CPU processes joined by gloo, and train through Megatron's
``DistributedDataParallel``, ``get_megatron_optimizer`` and ``get_forward_backward_func``.
Checked against megatron-core 0.16.1, 0.19.2 and 0.20.0 (Megatron-LM main); see docs/cpu-harness.md.
``enable_cpu_megatron_training`` adds what Megatron-LM's own ``pretrain()`` needs (megatron.training).

The shim is only for processes without CUDA: every ``torch.cuda`` function it replaces, and every
``device="cuda"`` allocation it redirects, raises there, so replacing it cannot change behaviour
that worked; the CUDA type names are reported only while the three megatron calls that compare
them run. With CUDA present it refuses to run. Megatron
functions are replaced where megatron looks them up (module globals), and only after checking that
the target exists, so a megatron-core release that moved one fails loudly instead of running
unpatched.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Names of the applied patches once enable_cpu_megatron() has completed.
_ENABLED: list[str] | None = None


class _CpuEvent:
    """What ``_CpuStream.record_event`` returns: CPU work is synchronous, so it has always completed."""

    def synchronize(self) -> None:
        pass


class _CpuStream:
    """Stands in for ``torch.cuda.Stream``: CPU execution is in order, so waiting is a no-op.

    Implements what megatron's MoE code calls on streams: ``wait_stream`` (dispatcher, shared
    experts) and ``record_event(...).synchronize()`` (alltoall dispatcher's device-to-host copies);
    equality, because the dispatcher compares its side stream with the current one.
    """

    def __init__(self, *args, **kwargs) -> None:
        pass  # device/priority arguments mean nothing on CPU

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None):
        return _CpuEvent()

    def __eq__(self, other) -> bool:
        return isinstance(other, _CpuStream)

    def __hash__(self) -> int:
        return 0


_CPU_STREAM = _CpuStream()


def _require(module, *names: str) -> None:
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        import megatron.core

        raise RuntimeError(
            f"enable_cpu_megatron: {module.__name__} in megatron-core {megatron.core.__version__} "
            f"has no {', '.join(missing)}; the CPU harness is checked against 0.16.1, 0.19.2 and 0.20.0 "
            "(see docs/cpu-harness.md)"
        )


def _patch_torch_cuda() -> None:
    # Router gating, RoPE inv_freq, expert buffers and tensor_parallel/mappings.py allocate on
    # torch.cuda.current_device(); on CPU the "current device" is the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # The alltoall dispatcher (its device-to-host copy stream, created in __init__) and overlapped
    # shared experts create side streams and compare/wait on the current one; CPU execution is in
    # order, so one stream whose waits are no-ops is exact. (torch.cuda.stream(s) and
    # torch.cuda.Event already work without CUDA and are left alone.)
    torch.cuda.Stream = _CpuStream
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM
    # dist_checkpointing's writer and megatron's timers synchronise the device; CPU work is
    # already synchronous.
    torch.cuda.synchronize = lambda device=None: None


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    _require(
        mcore_random,
        "CudaRNGStatesTracker",
        "_get_cuda_rng_state",
        "_set_cuda_rng_state",
        "_CUDA_RNG_STATE_TRACKER",
        "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
        "_MODEL_PARALLEL_RNG_TRACKER_NAME",
    )

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """megatron's named RNG states (data-, tensor- and expert-parallel) kept on the CPU generator.

        Expert initialisation and dropout fork these states exactly as on GPU, so EP ranks still
        draw different expert weights and identical seeds still give identical models.
        """

        def add(self, name, seed):
            if seed in self.seeds_:
                raise ValueError(f"seed {seed} already exists")
            if name in self.states_:
                raise ValueError(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise ValueError(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                if self._current_state_name != name:
                    raise RuntimeError(f"rng state {self._current_state_name} is current, expected {name}")
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    # Activation recompute (tensor_parallel.checkpoint, e.g. moe_layer_recompute) saves and restores
    # the "CUDA" generator state through these two module-level helpers; on CPU that state is the
    # CPU generator's.
    mcore_random._get_cuda_rng_state = get_rng_state
    mcore_random._set_cuda_rng_state = set_rng_state
    # initialize_rng_tracker() looks the class up by this module-level name on every (re)init,
    # so every tracker megatron builds from now on keeps its states on the CPU generator.
    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    if tracker is not None and not isinstance(tracker, CpuRNGStatesTracker):
        # A CUDA tracker built before the shim could never fork on CPU: drop it so the next
        # get_cuda_rng_tracker() builds the CPU one.
        mcore_random._CUDA_RNG_STATE_TRACKER = None
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


def _patch_moe_utils() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    _require(moe_utils, "maybe_move_tensor_to_cpu")
    _require(token_dispatcher, "maybe_move_tensor_to_cpu")
    # 0.16.x imports te_general_gemm only inside its TransformerEngine try-block, yet the router's
    # gating GEMM tests `te_general_gemm is not None` (NameError without TE); 0.19 binds it to None.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # Megatron converts split sizes to numpy only for CUDA tensors; CPU tensors would reach
        # all_to_all_single as tensors. Give the CPU ones the numpy form the dispatcher expects.
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    # token_dispatcher.py imported the function by name: patch the name it calls.
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_uneven_all_gather() -> None:
    from megatron.core.tensor_parallel import mappings

    _require(mappings, "_gather_along_first_dim")
    original = mappings._gather_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        # With expert-TP > 1 the alltoall dispatcher gathers a different number of tokens from each
        # expert-TP peer (torch.distributed.all_gather into uneven slices); gloo requires equal
        # sizes. Pad every slice to the longest, gather, and cut the padding off again.
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        if input_.shape[0] != sizes[group.rank()]:
            raise ValueError(
                f"uneven all-gather: this rank holds {input_.shape[0]} rows, split sizes say "
                f"{sizes[group.rank()]} ({sizes})"
            )
        padded = input_.new_zeros((max(sizes),) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        slots = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(slots, padded, group=group)
        return torch.cat([slot[:n] for slot, n in zip(slots, sizes)])

    # The autograd functions in mappings.py look the helper up by module-global name at call time.
    mappings._gather_along_first_dim = _gather_along_first_dim


def _patch_default_causal_mask() -> None:
    from megatron.core.fusions import fused_softmax

    _require(fused_softmax, "get_default_causal_mask")

    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        # Local-spec attention without an explicit mask builds the causal mask with device="cuda".
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    # fused_softmax.py imported the function by name: patch the name it calls.
    fused_softmax.get_default_causal_mask = get_default_causal_mask


def _patch_mtp_inference_linear_check() -> None:
    from megatron.core.transformer import multi_token_prediction as mtp

    if not hasattr(mtp, "is_inference_column_parallel_linear"):
        return  # before megatron-core 0.20 MTP layers make no such check
    from megatron.core.tensor_parallel import inference_layers

    if inference_layers.HAVE_TE:
        return
    # From 0.20 an MTP layer asks isinstance(eh_proj, (InferenceColumnParallelLinear, ...)); without
    # TransformerEngine those classes derive from a MagicMock stand-in, are no types, and isinstance
    # raises TypeError, so no MTP layer builds. Without TE no inference-optimized linear exists.
    mtp.is_inference_column_parallel_linear = lambda module: False


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0] == "cuda"


def _on_cpu_if_cuda(factory):
    @functools.wraps(factory)
    def make(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return make


class _TorchWithCpuFactories(types.ModuleType):
    """``torch`` as seen from one megatron module: tensors it creates with ``device="cuda"`` go to
    the CPU; every other name is torch's own (looked up once, then cached here).

    The optimizer, gradient clipping and the pipeline schedules allocate flags, norms and token
    counts with a literal ``device="cuda"``. Redirecting only inside those modules keeps the
    plugin's own code honest: a hard-coded ``device="cuda"`` there still fails on CPU.
    """

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full")

    def __init__(self) -> None:
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, _on_cpu_if_cuda(getattr(torch, name)))

    def __getattr__(self, name):
        value = getattr(torch, name)
        setattr(self, name, value)
        return value


_CPU_FACTORY_TORCH = _TorchWithCpuFactories()

# Megatron modules whose literal device="cuda" allocations are on the training path, per feature.
_CUDA_LITERAL_MODULES = (
    "megatron.core.optimizer.optimizer",  # found_inf, overflow buffer, loss scale of every optimizer
    "megatron.core.optimizer.clip_grads",  # gradient norm, clipping, zero counting
    "megatron.core.optimizer.grad_scaler",  # fp16 loss scale and its bounds
    "megatron.core.utils",  # local_multi_tensor_l2_norm, the norm without apex/TE
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens of every schedule
)


def _patch_cuda_literal_allocations() -> None:
    for name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        _require(module, "torch")
        if module.torch is not torch and module.torch is not _CPU_FACTORY_TORCH:
            raise RuntimeError(f"enable_cpu_megatron: {name}.torch is not the torch module")
        module.torch = _CPU_FACTORY_TORCH


@contextlib.contextmanager
def _cuda_type_names():
    """CPU tensors answer ``.type()`` with the CUDA type name of their dtype while inside.

    Megatron's optimizers sort parameters into fp32 and 16-bit groups, and gradient clipping
    asserts fp32 gradients, by comparing ``tensor.type()`` with "torch.cuda.FloatTensor" etc.
    """
    original = torch.Tensor.type

    def cuda_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is not None:
            return original(self, dtype, non_blocking, **kwargs)
        name = original(self)
        return "torch.cuda." + name[len("torch.") :] if self.device.type == "cpu" else name

    torch.Tensor.type = cuda_type
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapped._cpu_harness_wrapped = True
    return wrapped


def _patch_type_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    _require(optimizer, "Float16OptimizerWithFloat16Params", "clip_grad_by_total_norm_fp32")
    _require(distrib_optimizer, "DistributedOptimizer")
    _require(clip_grads, "clip_grad_by_total_norm_fp32")
    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        if not getattr(cls.__init__, "_cpu_harness_wrapped", False):
            cls.__init__ = _with_cuda_type_names(cls.__init__)
    clip = clip_grads.clip_grad_by_total_norm_fp32
    if not getattr(clip, "_cpu_harness_wrapped", False):
        clip = _with_cuda_type_names(clip)
    # optimizer.py imported the function by name: patch both names.
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    optimizer.clip_grad_by_total_norm_fp32 = clip


@dataclass(frozen=True)
class _Patch:
    name: str
    apply: Callable[[], None]


_PATCHES: tuple[_Patch, ...] = (
    _Patch("torch.cuda current_device/Stream/current_stream/synchronize", _patch_torch_cuda),
    _Patch("megatron RNG tracker on the CPU generator", _patch_rng_tracker),
    _Patch("moe_utils: te_general_gemm, CPU split sizes", _patch_moe_utils),
    _Patch("uneven first-dim all-gather on gloo", _patch_uneven_all_gather),
    _Patch("default causal attention mask on CPU", _patch_default_causal_mask),
    _Patch("0.20 MTP layers build without TransformerEngine", _patch_mtp_inference_linear_check),
    _Patch("optimizer, clipping, schedules: device='cuda' allocations on CPU", _patch_cuda_literal_allocations),
    _Patch("optimizer parameter type checks accept CPU tensors", _patch_type_checks),
)


def enable_cpu_megatron() -> list[str]:
    """Make megatron-core's MoE path run on CPU; idempotent. Returns the names of the patches applied.

    Call in each CPU process before building megatron modules (``init_megatron_parallel`` does).
    Raises ``RuntimeError`` if CUDA is available (the shim would hide the GPU from megatron) and
    ``ImportError`` if megatron-core is not installed.
    """
    global _ENABLED
    if _ENABLED is not None:
        return list(_ENABLED)
    if torch.cuda.is_available():
        raise RuntimeError(
            "enable_cpu_megatron: CUDA is available in this process; the CPU shim would redirect "
            "megatron's CUDA allocations to the CPU. Run CPU ranks with CUDA_VISIBLE_DEVICES=''."
        )
    import megatron.core  # noqa: F401 - a clear ImportError before any patch is applied

    applied = []
    for patch in _PATCHES:
        patch.apply()
        applied.append(patch.name)
    _ENABLED = applied
    return list(applied)


# --- Megatron-LM's own training loop (megatron.training's pretrain()) on CPU ranks ---------------


def provide_typing_override() -> bool:
    """Give ``typing`` the ``override`` decorator of Python 3.12 where it lacks it; True if added.

    From core_r0.17 ``megatron.training`` imports ``typing.override``, and that is its only use of
    3.12 (megatron.core takes it from ``typing_extensions``). ``typing_extensions.override`` is
    the same decorator (it only marks the function). Call before Megatron-LM is imported.
    """
    import typing

    if hasattr(typing, "override"):
        return False
    import typing_extensions

    typing.override = typing_extensions.override
    return True


class _TorchForTrainingLoop(_TorchWithCpuFactories):
    """``torch`` as seen from one ``megatron.training`` module: ``device="cuda"`` tensors on the CPU."""

    _FACTORIES = (*_TorchWithCpuFactories._FACTORIES, "rand")


class _CudaAsOneDevicePerRank(types.ModuleType):
    """``torch.cuda`` as seen from ``megatron.training.initialize``: one device per rank, the CPU.

    Without a device, Megatron-LM's initialisation refuses to start, and (with ``allow_no_cuda``)
    would skip the model-parallel set-up and the RNG-tracker seeding, both guarded by
    ``device_count() > 0``; with one device it runs both as on a GPU (the harness keeps the
    tracker's states on the CPU generator), and selecting the device does nothing.
    """

    def __init__(self) -> None:
        super().__init__("torch.cuda")
        self.is_available = lambda: True
        self.device_count = lambda: 1
        self.set_device = lambda device: None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchForInitialize(_TorchForTrainingLoop):
    def __init__(self) -> None:
        super().__init__()
        self.cuda = _CudaAsOneDevicePerRank()


_TRAINING_LOOP_TORCH = _TorchForTrainingLoop()
_INITIALIZE_TORCH = _TorchForInitialize()

# Modules of Megatron-LM's training loop that allocate with a literal device="cuda": flags, losses,
# timers and iteration counts of pretrain()/train()/evaluate(), the batch broadcast, the rerun
# state machine's checks, and checkpointing. Per version some do not exist (training/utils.py
# became the package training/utils/ in core_r0.19); each one that exists is patched.
_TRAINING_LOOP_MODULES = (
    "megatron.training.training",
    "megatron.training.utils",
    "megatron.training.utils.common_utils",
    "megatron.training.checkpointing",
    "megatron.core.rerun_state_machine",
)


def _patch_training_initialize() -> None:
    from megatron.training import initialize

    _require(initialize, "torch", "initialize_megatron", "_initialize_distributed", "_set_random_seed")
    initialize.torch = _INITIALIZE_TORCH
    if hasattr(initialize, "fused_kernels"):
        # core_r0.16's legacy fused kernels: load() only asks nvcc for the CUDA version.
        initialize.fused_kernels = types.SimpleNamespace(load=lambda args: None)


def _patch_training_loop_allocations() -> None:
    patched = 0
    for name in _TRAINING_LOOP_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        if isinstance(module, types.ModuleType) and getattr(module, "__path__", None) is not None:
            continue  # a package (training/utils/ from core_r0.19): its modules are listed themselves
        _require(module, "torch")
        if module.torch is not torch and module.torch is not _TRAINING_LOOP_TORCH:
            raise RuntimeError(f"enable_cpu_megatron_training: {name}.torch is not the torch module")
        module.torch = _TRAINING_LOOP_TORCH
        patched += 1
    if patched < 4:
        raise RuntimeError(
            f"enable_cpu_megatron_training: only {patched} of the training-loop modules "
            f"{', '.join(_TRAINING_LOOP_MODULES)} exist in this Megatron-LM"
        )


def _patch_cuda_rng_state() -> None:
    # The rerun state machine and checkpoints save and restore "the CUDA generator" next to the CPU
    # one; on CPU ranks the CPU generator is the one megatron's tracker forks (see above).
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)


def _cpu_tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self


def _cpu_module_cuda(self, device=None):
    return self


def _patch_cuda_moves() -> None:
    # get_model() moves the model with .cuda(current_device()); the batch getters move each batch
    # with .cuda(non_blocking=True). On CPU ranks the CPU is the device.
    torch.Tensor.cuda = _cpu_tensor_cuda
    torch.nn.Module.cuda = _cpu_module_cuda


_TRAINING_PATCHES: tuple[_Patch, ...] = (
    _Patch("megatron.training.initialize: one device per rank (the CPU)", _patch_training_initialize),
    _Patch(
        "training loop, checkpointing, rerun checks: device='cuda' allocations on CPU", _patch_training_loop_allocations
    ),
    _Patch("torch.cuda RNG state is the CPU generator's", _patch_cuda_rng_state),
    _Patch("Tensor.cuda() / Module.cuda() keep tensors on the CPU", _patch_cuda_moves),
)
_TRAINING_ENABLED: list[str] | None = None


def enable_cpu_megatron_training() -> list[str]:
    """``enable_cpu_megatron()`` plus what Megatron-LM's own ``pretrain()`` needs on CPU ranks.

    Covers ``megatron.training``: initialisation, the training and evaluation loop, timers, logging
    and distributed checkpointing. Process-wide, ``Tensor.cuda()`` and ``Module.cuda()`` return
    their input (they raise on CPU-only torch), and ``torch.cuda``'s RNG state is the CPU
    generator's; so call it only in a process that runs Megatron-LM's training on CPU (the entry
    script does, when no GPU is visible), never in the plugin's own tests of device code.
    Idempotent; returns the names of every patch applied. Same refusals as ``enable_cpu_megatron``;
    ``ImportError`` when ``megatron.training`` (a Megatron-LM checkout) is not importable.
    """
    global _TRAINING_ENABLED
    if _TRAINING_ENABLED is not None:
        return list(_TRAINING_ENABLED)
    applied = enable_cpu_megatron()
    import megatron.training  # noqa: F401 - a clear ImportError before any training patch

    for patch in _TRAINING_PATCHES:
        patch.apply()
        applied.append(patch.name)
    _TRAINING_ENABLED = applied
    return list(applied)
