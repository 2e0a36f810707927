"""Expert MLPs over the local physical experts (home + replicas) of one rank, functionally.

The weights are passed in per slot, so home experts (Megatron's own parameters) and replicas
(copies fetched from their home ranks) run in one grouped GEMM and autograd routes each gradient
to the tensor it came from. The math mirrors Megatron's expert MLP: ``fc1`` (+ bias), activation or
gated linear unit (optional clamp and linear offset), multiplied by the routing probability and cast
back to the activation dtype, ``fc2``, plus ``fc2`` bias scaled by the probability; or, with
``probs_on_input``, the probability scales the input instead.

Backends (a registry in order of preference; ``choose_backend`` picks one per device and dtype,
logged once):
- ``te_grouped``: TransformerEngine's functional grouped GEMM (``general_grouped_gemm``, TE 2.0 on)
  inside an autograd function; used when TE imports and the tensors are on CUDA.
- ``grouped_mm``: ``torch.nn.functional.grouped_mm`` over weights stacked per slot; used where the
  device and dtype run it (CPU from torch 2.13, Hopper-class GPUs) and rows are 16-byte aligned.
- ``loop``: one ``matmul`` pair per slot; runs everywhere and is the exact reference.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertMath:
    """The activation stage of Megatron's expert MLP for one model configuration."""

    activation: Callable[[torch.Tensor], torch.Tensor]
    gated: bool = False
    clamp: float | None = None
    glu_offset: float = 0.0
    probs_on_input: bool = False


@dataclass(frozen=True)
class ExpertWeights:
    """One physical expert: fc1 [F1, H] (F1 = 2F when gated), fc2 [H, F], optional biases."""

    fc1: torch.Tensor
    fc2: torch.Tensor
    fc1_bias: torch.Tensor | None = None
    fc2_bias: torch.Tensor | None = None


def _scale_input(x: torch.Tensor, probs: torch.Tensor, math: ExpertMath) -> tuple[torch.Tensor, torch.Tensor]:
    if not math.probs_on_input:
        return x, probs
    return (probs.unsqueeze(-1) * x).to(x.dtype), torch.ones_like(probs)


def _activate(h: torch.Tensor, probs: torch.Tensor, math: ExpertMath) -> torch.Tensor:
    if math.gated:
        gate, linear = torch.chunk(h, 2, dim=-1)
        if math.clamp is not None:
            gate = gate.clamp(min=None, max=math.clamp)
            linear = linear.clamp(min=-math.clamp, max=math.clamp)
        out = math.activation(gate) * (linear + math.glu_offset)
    else:
        out = math.activation(h)
    return (out * probs.unsqueeze(-1)).to(out.dtype)


def loop_experts(
    x: torch.Tensor,
    tokens_per_slot: Sequence[int],
    probs: torch.Tensor,
    weights: Sequence[ExpertWeights],
    math: ExpertMath,
) -> torch.Tensor:
    """x [N, H], probs [N] -> [N, H]; rows of slot i are the i-th chunk of ``tokens_per_slot``.

    Every slot runs, also with zero rows, so every weight takes part in autograd.
    """
    x, probs = _scale_input(x, probs, math)
    outs = []
    for rows, p, w in zip(torch.split(x, list(tokens_per_slot)), torch.split(probs, list(tokens_per_slot)), weights):
        h = torch.matmul(rows, w.fc1.t())
        if w.fc1_bias is not None:
            h = h + w.fc1_bias
        y = torch.matmul(_activate(h, p, math), w.fc2.t())
        if w.fc2_bias is not None:
            # Megatron adds in place: computed in the promoted dtype, stored in the output's.
            y = (y + w.fc2_bias.unsqueeze(0) * p.unsqueeze(-1)).to(y.dtype)
        outs.append(y)
    return torch.cat(outs)


def _two_gemm_experts(
    x: torch.Tensor,
    tokens_per_slot: Sequence[int],
    probs: torch.Tensor,
    weights: Sequence[ExpertWeights],
    math: ExpertMath,
    linear: GroupedLinearFn,
) -> torch.Tensor:
    """``loop_experts``' contract with fc1 and fc2 each one grouped GEMM ``linear``; biases,
    activation and probabilities in torch around them."""
    x, probs = _scale_input(x, probs, math)
    counts = list(tokens_per_slot)
    h = linear(x, counts, [w.fc1 for w in weights])
    if weights[0].fc1_bias is not None:
        h = h + _rows_per_slot(torch.stack([w.fc1_bias for w in weights]), counts)
    y = linear(_activate(h, probs, math).contiguous(), counts, [w.fc2 for w in weights])
    if weights[0].fc2_bias is not None:
        bias = _rows_per_slot(torch.stack([w.fc2_bias for w in weights]), counts)
        y = (y + bias * probs.unsqueeze(-1)).to(y.dtype)
    return y


def _rows_per_slot(per_slot: torch.Tensor, counts: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(per_slot, torch.tensor(counts, device=per_slot.device), dim=0)


# x [N, K], rows per slot (sum N), weights per slot [M, K] -> [N, M]: row block i times weight i transposed.
GroupedLinearFn = Callable[[torch.Tensor, list[int], list[torch.Tensor]], torch.Tensor]


def _torch_grouped_linear(x: torch.Tensor, counts: list[int], weights: list[torch.Tensor]) -> torch.Tensor:
    offs = torch.cumsum(torch.tensor(counts, dtype=torch.int64, device=x.device), 0).to(torch.int32)
    return F.grouped_mm(x, torch.stack(weights).transpose(1, 2), offs=offs)


def grouped_mm_experts(
    x: torch.Tensor,
    tokens_per_slot: Sequence[int],
    probs: torch.Tensor,
    weights: Sequence[ExpertWeights],
    math: ExpertMath,
) -> torch.Tensor:
    """Same contract as ``loop_experts``; two ``torch.nn.functional.grouped_mm`` over stacked weights."""
    return _two_gemm_experts(x, tokens_per_slot, probs, weights, math, _torch_grouped_linear)


# --- TransformerEngine ------------------------------------------------------------------------
# The leading parameters of ``transformer_engine.pytorch.cpp_extensions.general_grouped_gemm`` per
# TransformerEngine release (read from its sources, v2.0 to v2.18) -> the extra keyword arguments
# that release needs, given the GEMM count and a cuBLAS workspace getter. Later parameters (layout,
# m_splits, grad, accumulate, single_output) are keywords in all. TE 1.x has no such function.
_TE_GEMM_EXTRA_KWARGS: dict[tuple[str, ...], Callable[[int, Callable], dict]] = {
    ("A", "B", "out", "out_dtype", "workspaces"): lambda n, workspaces: {"workspaces": workspaces()},  # 2.0-2.9
    ("A", "B", "out", "out_dtype", "layout"): lambda n, workspaces: {},  # 2.10
    ("A", "B", "out", "quantization_params", "out_dtype"):  # 2.11 on
    lambda n, workspaces: {"quantization_params": [None] * n},
}

# Adapted call: (A, B, out, layout, m_splits, single_output, grad) with TE's meaning: layout "TN"
# gives out_i = B_i A_i^T, "NN" out_i = B_i A_i, "NT" out_i = B_i^T A_i; with ``single_output``,
# ``out`` is one tensor whose row blocks (``m_splits``) are the outputs.
TEGemmCall = Callable[[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], str, list[int], bool, bool], None]


def te_gemm_adapter(gemm: Callable, workspaces: Callable[[], list[torch.Tensor]]) -> tuple[TEGemmCall | None, str]:
    """(call, '') for a ``general_grouped_gemm`` whose signature is known, else (None, why not).

    ``workspaces`` gives the cuBLAS workspaces that TE 2.0-2.9 expect from the caller.
    """
    try:
        leading = tuple(list(inspect.signature(gemm).parameters)[:5])
    except (TypeError, ValueError) as err:
        return None, f"cannot read general_grouped_gemm's signature: {err}"
    extra_kwargs = _TE_GEMM_EXTRA_KWARGS.get(leading)
    if extra_kwargs is None:
        return None, f"general_grouped_gemm{leading} is a signature MicroEP does not know (TE 2.0-2.18 checked)"

    def call(A, B, out, layout, m_splits, single_output, grad):
        gemm(
            A,
            B,
            out,
            out_dtype=out[0].dtype,
            layout=layout,
            m_splits=m_splits,
            single_output=single_output,
            grad=grad,
            accumulate=False,
            **extra_kwargs(len(A), workspaces),
        )

    return call, ""


@functools.cache
def transformer_engine_gemm() -> tuple[TEGemmCall | None, str]:
    """The installed TransformerEngine's grouped GEMM, adapted (``te_gemm_adapter``), or (None, why not)."""
    try:
        import transformer_engine.pytorch  # noqa: F401 - loads TE's torch extension
    except Exception as err:  # noqa: BLE001 - ImportError, or TE failing to load its CUDA libraries
        return None, f"TransformerEngine not usable ({type(err).__name__}: {_first_line(err)})"
    import transformer_engine

    version = getattr(transformer_engine, "__version__", "?")
    try:
        from transformer_engine.pytorch.cpp_extensions import general_grouped_gemm
    except ImportError:
        return None, f"TransformerEngine {version} has no general_grouped_gemm (te_grouped needs TE 2.0 or later)"

    def workspaces():
        from transformer_engine.pytorch.module.base import get_multi_stream_cublas_workspace

        return get_multi_stream_cublas_workspace()

    call, why = te_gemm_adapter(general_grouped_gemm, workspaces)
    return call, (f"TransformerEngine {version}: {why}" if call is None else "")


def _first_line(err: BaseException) -> str:
    text = str(err)
    return text.splitlines()[0] if text else ""


class _TEGroupedLinear(torch.autograd.Function):
    """``GroupedLinearFn`` through TE's grouped GEMM: x [N, K], weights [M, K] per slot -> [N, M].

    Backward: dx = dy_i W_i per row block, dW_i = dy_i^T x_i (zero for slots without rows).
    """

    @staticmethod
    def forward(ctx, gemm, x, counts, *weights):
        ctx.gemm, ctx.counts = gemm, counts
        ctx.save_for_backward(x, *weights)
        out = torch.empty(x.shape[0], weights[0].shape[0], dtype=x.dtype, device=x.device)
        if x.shape[0]:
            gemm(list(weights), list(torch.split(x, counts)), [out], "TN", counts, True, False)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, *weights = ctx.saved_tensors
        dy = dy.contiguous()
        dys = list(torch.split(dy, ctx.counts))
        dx = None
        if ctx.needs_input_grad[1]:
            dx = torch.empty_like(x)
            if x.shape[0]:
                ctx.gemm(weights, dys, [dx], "NN", ctx.counts, True, True)
        dws: list[torch.Tensor | None] = [None] * len(weights)
        if any(ctx.needs_input_grad[3:]):
            # Zero-initialised: a slot without rows has a zero gradient whether or not TE writes it.
            dws = [torch.zeros_like(w) for w in weights]
            if x.shape[0]:
                ctx.gemm(list(torch.split(x, ctx.counts)), dys, dws, "NT", ctx.counts, False, True)
            dws = [g if need else None for g, need in zip(dws, ctx.needs_input_grad[3:])]
        return (None, dx, None, *dws)


def te_grouped_experts(
    x: torch.Tensor,
    tokens_per_slot: Sequence[int],
    probs: torch.Tensor,
    weights: Sequence[ExpertWeights],
    math: ExpertMath,
) -> torch.Tensor:
    """Same contract as ``loop_experts``; fc1 and fc2 each one TransformerEngine grouped GEMM.

    Home weights (Megatron's parameters) and replica weights (plain tensors) go into the same GEMM;
    the autograd function hands each its own gradient. Weights must be plain (not FP8) tensors.
    """
    gemm, why = transformer_engine_gemm()
    if gemm is None:
        raise RuntimeError(f"expert backend te_grouped: {why}")

    def linear(a: torch.Tensor, counts: list[int], ws: list[torch.Tensor]) -> torch.Tensor:
        for w in ws:
            if w.dtype != a.dtype or type(w) not in (torch.Tensor, torch.nn.Parameter):
                raise TypeError(
                    f"te_grouped needs plain {a.dtype} weights like its input, got {type(w).__name__} {w.dtype}"
                )
        return _TEGroupedLinear.apply(gemm, a.contiguous(), counts, *(w.contiguous() for w in ws))

    return _two_gemm_experts(x, tokens_per_slot, probs, weights, math, linear)


ExpertsFn = Callable[[torch.Tensor, Sequence[int], torch.Tensor, Sequence[ExpertWeights], ExpertMath], torch.Tensor]
# (device, dtype, GEMM inner widths) -> None if the backend runs there, else why not.
AvailabilityFn = Callable[[torch.device, torch.dtype, Sequence[int]], str | None]


@dataclass(frozen=True)
class ExpertBackend:
    run: ExpertsFn
    unavailable: AvailabilityFn


_PROBED: dict[tuple[str, torch.dtype], str | None] = {}
_LOGGED: set = set()


def _grouped_mm_failure(device: torch.device, dtype: torch.dtype, widths: Sequence[int]) -> str | None:
    """None if a small forward+backward grouped_mm runs on ``device`` in ``dtype`` and the GEMM
    rows are 16-byte aligned, else why not."""
    key = (str(device), dtype)
    if key not in _PROBED:
        if not hasattr(F, "grouped_mm"):
            _PROBED[key] = f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
        else:
            try:
                a = torch.ones(8, 16, device=device, dtype=dtype, requires_grad=True)
                b = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
                offs = torch.tensor([3, 8], dtype=torch.int32, device=device)
                out = F.grouped_mm(a, b, offs=offs)
                out.backward(torch.ones_like(out))
                _PROBED[key] = None
            except (RuntimeError, NotImplementedError, AssertionError) as err:
                _PROBED[key] = f"grouped_mm does not run on {device} in {dtype}: {str(err).splitlines()[0]}"
    if _PROBED[key] is not None:
        return _PROBED[key]
    element = torch.empty((), dtype=dtype).element_size()
    misaligned = [w for w in widths if (w * element) % 16]
    return f"widths {misaligned} are not multiples of 16 bytes in {dtype}" if misaligned else None


_TE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _te_grouped_failure(device: torch.device, dtype: torch.dtype, widths: Sequence[int]) -> str | None:
    if device.type != "cuda":
        return f"tensors are on {device}, TransformerEngine runs on CUDA"
    if dtype not in _TE_DTYPES:
        return f"{dtype} is not one of {', '.join(map(str, _TE_DTYPES))}"
    return transformer_engine_gemm()[1] or None


# In order of preference: 'auto' takes the first that runs.
EXPERT_BACKENDS: dict[str, ExpertBackend] = {
    "te_grouped": ExpertBackend(te_grouped_experts, _te_grouped_failure),
    "grouped_mm": ExpertBackend(grouped_mm_experts, _grouped_mm_failure),
    "loop": ExpertBackend(loop_experts, lambda device, dtype, widths: None),
}


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype, widths: Sequence[int]) -> str:
    """Resolve ``requested`` ('auto' or a registry name) for tensors on ``device``.

    ``widths`` are the inner dimensions of the GEMMs (H, F1, F). 'auto' takes the first backend of
    ``EXPERT_BACKENDS`` that runs; an explicit backend that cannot run raises ValueError naming the
    reason. The choice is logged once per (backend, device, dtype), with why faster ones were passed over.
    """
    if requested != "auto" and requested not in EXPERT_BACKENDS:
        raise ValueError(f"unknown expert backend {requested!r}; choose from auto, {', '.join(EXPERT_BACKENDS)}")
    passed_over: list[str] = []
    if requested != "auto":
        failure = EXPERT_BACKENDS[requested].unavailable(device, dtype, widths)
        if failure is not None:
            raise ValueError(f"expert backend {requested} unavailable: {failure}")
        chosen = requested
    else:
        for name, backend in EXPERT_BACKENDS.items():
            failure = backend.unavailable(device, dtype, widths)
            if failure is None:
                chosen = name
                break
            passed_over.append(f"{name}: {failure}")
    key = (chosen, str(device), dtype)
    if key not in _LOGGED:
        _LOGGED.add(key)
        why = f" (not {'; '.join(passed_over)})" if passed_over else ""
        logger.info("MicroEP experts: %s backend on %s, %s%s", chosen, device, dtype, why)
    return chosen


def run_experts(
    backend: str,
    x: torch.Tensor,
    tokens_per_slot: Sequence[int],
    probs: torch.Tensor,
    weights: list[ExpertWeights],
    math: ExpertMath,
) -> torch.Tensor:
    return EXPERT_BACKENDS[backend].run(x, tokens_per_slot, probs, weights, math)
