"""Expert MLPs over the local physical experts (home + replicas) of one rank, functionally.

The weights are passed in per slot, so home experts (Megatron's own parameters) and replicas
(copies fetched from their home ranks) run in one grouped GEMM and autograd routes each gradient
to the tensor it came from. The math is Megatron's expert MLP (``TEGroupedMLP``): ``fc1`` (+ bias
per expert), the activation weighted by the routing probability (Megatron's fused weighted
SwiGLU / quick-GEGLU / squared-ReLU where the model enables them, ``ExpertMath.weighted_activation``;
else the gated linear unit with optional clamp and linear offset, times the probability, cast back
to the activation dtype), ``fc2``, plus ``fc2`` bias scaled by the probability; or, with
``probs_on_input``, the probability scales the input instead.

Rows arrive grouped by slot (``RowGroups``): host counts for split sizes and TE's ``m_splits``,
and the cumulative group ends on the device, built once per micro-batch with the index maps.

Backends (a registry in order of preference; ``choose_backend`` picks one per device and dtype,
logged once; with CUDA tensors ``auto`` refuses to fall back to the per-expert loop):
- ``te_grouped``: TransformerEngine's functional grouped GEMM (``general_grouped_gemm``, TE 2.0 on)
  inside an autograd function; weights go in as TE's list of per-expert tensors (no copy). With
  ``ExpertMath.accumulate_into_main_grad`` (Megatron's ``gradient_accumulation_fusion``) the
  weight gradients of parameters with a ``main_grad`` are accumulated into it (``accumulate=True``,
  fp32 under Megatron's DDP), as TE's ``GroupedLinear`` does; used when TE imports and the
  tensors are on CUDA.
- ``grouped_mm``: ``torch.nn.functional.grouped_mm``. Its weight operand is a strided view of the
  experts' own storage, never a copy: consecutive slots whose tensors are equally spaced in one
  storage (Megatron's DDP buffer, FSEP's gathered copies, the replica buffer) form one run and one
  GEMM; slots whose weights lie elsewhere run as further GEMMs (without DDP every parameter has
  its own storage, so each expert is its own run). Used where the device and dtype run it (CPU
  from torch 2.13, Hopper-class GPUs) and rows are 16-byte aligned.
- ``loop``: one ``matmul`` pair per slot; runs everywhere and is the exact reference.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from megatron_microep.runtime.device import copy_to_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertMath:
    """The activation stage of Megatron's expert MLP for one model configuration, and how weight
    gradients are delivered."""

    activation: Callable[[torch.Tensor], torch.Tensor]
    gated: bool = False
    clamp: float | None = None
    glu_offset: float = 0.0
    probs_on_input: bool = False
    # Megatron's fused probability-weighted activation: (h [N, F1], probs [N, 1]) -> [N, F] in h's
    # dtype, replacing activation, gating, clamp and the probability product. None: unfused.
    weighted_activation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # Megatron's gradient_accumulation_fusion: te_grouped adds weight gradients to ``main_grad``.
    accumulate_into_main_grad: bool = False


@dataclass(frozen=True)
class ExpertWeights:
    """One physical expert: fc1 [F1, H] (F1 = 2F when gated), fc2 [H, F], optional biases.

    ``feeds_replicas``: these tensors also get gradient through another path (copies of this
    expert run as replicas elsewhere), so a gradient accumulated into ``main_grad`` directly must
    leave autograd a real (zero) gradient to add the other path to, not Megatron's placeholder.
    """

    fc1: torch.Tensor
    fc2: torch.Tensor
    fc1_bias: torch.Tensor | None = None
    fc2_bias: torch.Tensor | None = None
    feeds_replicas: bool = False


@dataclass(frozen=True)
class RowGroups:
    """Rows of the experts' input grouped by slot: ``counts`` [L] host ints and ``ends`` int32 [L]
    on the device (cumulative counts, the grouped GEMM offsets)."""

    counts: list[int]
    ends: torch.Tensor

    @classmethod
    def build(cls, counts: Sequence[int], device: torch.device) -> RowGroups:
        """From host counts (one non-blocking copy); the token path gets them with its index maps."""
        counts = [int(c) for c in counts]
        return cls(counts, copy_to_device(np.cumsum(counts, dtype=np.int32), device))


def _row_groups(rows: RowGroups | Sequence[int], device: torch.device) -> RowGroups:
    return rows if isinstance(rows, RowGroups) else RowGroups.build(rows, device)


def _scale_input(x: torch.Tensor, probs: torch.Tensor, math: ExpertMath) -> tuple[torch.Tensor, torch.Tensor]:
    if not math.probs_on_input:
        return x, probs
    return (probs.unsqueeze(-1) * x).to(x.dtype), torch.ones_like(probs)


def _activate(h: torch.Tensor, probs: torch.Tensor, math: ExpertMath) -> torch.Tensor:
    if math.weighted_activation is not None:
        return math.weighted_activation(h, probs.unsqueeze(-1))
    if math.gated:
        gate, linear = torch.chunk(h, 2, dim=-1)
        if math.clamp is not None:
            gate = gate.clamp(min=None, max=math.clamp)
            linear = linear.clamp(min=-math.clamp, max=math.clamp)
        out = math.activation(gate) * (linear + math.glu_offset)
    else:
        out = math.activation(h)
    return (out * probs.unsqueeze(-1)).to(out.dtype)


def _add_bias(
    y: torch.Tensor, counts: list[int], biases: Sequence[torch.Tensor], probs: torch.Tensor | None = None
) -> torch.Tensor:
    """Each group's bias (times the probability, for fc2) added to its rows, as Megatron's
    ``TEGroupedMLP`` applies the fc2 bias: per group, then concatenated; computed in the promoted
    dtype, stored in ``y``'s. No stacked copy of the biases; gradients are per-group sums."""
    if probs is None:
        parts = [t + b for t, b in zip(torch.split(y, counts), biases)]
    else:
        parts = [t + b * p.unsqueeze(-1) for t, b, p in zip(torch.split(y, counts), biases, torch.split(probs, counts))]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(y.dtype)


def loop_experts(
    x: torch.Tensor,
    rows: RowGroups | Sequence[int],
    probs: torch.Tensor,
    weights: Sequence[ExpertWeights],
    math: ExpertMath,
) -> torch.Tensor:
    """x [N, H], probs [N] -> [N, H]; rows of slot i are the i-th group of ``rows``.

    Every slot runs, also with zero rows, so every weight takes part in autograd.
    """
    counts = rows.counts if isinstance(rows, RowGroups) else [int(c) for c in rows]
    x, probs = _scale_input(x, probs, math)
    outs = []
    for part, p, w in zip(torch.split(x, counts), torch.split(probs, counts), weights):
        h = torch.matmul(part, w.fc1.t())
        if w.fc1_bias is not None:
            h = h + w.fc1_bias
        y = torch.matmul(_activate(h, p, math), w.fc2.t())
        if w.fc2_bias is not None:
            # Megatron adds in place: computed in the promoted dtype, stored in the output's.
            y = (y + w.fc2_bias.unsqueeze(0) * p.unsqueeze(-1)).to(y.dtype)
        outs.append(y)
    return torch.cat(outs)


# (x [rows, K], row groups, weights per group [M, K]) -> [rows, M]: row block i times weight i transposed.
GroupedLinearFn = Callable[[torch.Tensor, RowGroups, list[torch.Tensor]], torch.Tensor]


def _two_gemm_experts(
    x: torch.Tensor,
    groups: RowGroups,
    probs: torch.Tensor,
    weights: Sequence[ExpertWeights],
    math: ExpertMath,
    linear: GroupedLinearFn,
) -> torch.Tensor:
    """``loop_experts``' contract with fc1 and fc2 each one grouped GEMM ``linear``; biases,
    activation and probabilities in torch around them."""
    x, probs = _scale_input(x, probs, math)
    counts = groups.counts
    h = linear(x, groups, [w.fc1 for w in weights])
    if weights[0].fc1_bias is not None:
        h = _add_bias(h, counts, [w.fc1_bias for w in weights])
    y = linear(_activate(h, probs, math).contiguous(), groups, [w.fc2 for w in weights])
    if weights[0].fc2_bias is not None:
        y = _add_bias(y, counts, [w.fc2_bias for w in weights], probs)
    return y


# --- grouped_mm over views of the weights' own storage ------------------------------------------------


def _step(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Elements from ``a`` to ``b`` if ``b`` continues an equally shaped run in ``a``'s storage."""
    if (
        a.untyped_storage()._cdata != b.untyped_storage()._cdata
        or a.shape != b.shape
        or a.stride() != b.stride()
        or a.dtype != b.dtype
        or (b.storage_offset() - a.storage_offset()) * a.element_size() % 16
    ):
        return None
    step = b.storage_offset() - a.storage_offset()
    return step if step >= a.numel() else None  # positive and not overlapping


def equally_spaced_runs(tensors: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """Maximal [i, j) of consecutive tensors that one strided view stacks without a copy: same
    storage, shape, strides and dtype, each ``step`` elements (16-byte aligned, positive) after the
    previous one."""
    runs, start, step = [], 0, None
    for i in range(1, len(tensors)):
        here = _step(tensors[i - 1], tensors[i])
        if here is None or (step is not None and here != step):
            runs.append((start, i))
            start, step = i, None
        else:
            step = here
    if tensors:
        runs.append((start, len(tensors)))
    return runs


class _StackedView(torch.autograd.Function):
    """Tensors of one equally spaced run -> the view [n, *shape] over their storage (no copy); each
    tensor's gradient is its slice of the stacked gradient."""

    @staticmethod
    def forward(ctx, *tensors):
        first = tensors[0]
        step = tensors[1].storage_offset() - first.storage_offset()
        return first.detach().as_strided((len(tensors), *first.shape), (step, *first.stride()), first.storage_offset())

    @staticmethod
    def backward(ctx, grad):
        return tuple(grad.unbind(0))


def stacked_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[n, *shape] over an equally spaced run (``equally_spaced_runs``), differentiable, no copy."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else _StackedView.apply(*tensors)


def storage_order(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Indices of ``tensors`` in the order they lie in memory when they share one storage (e.g.
    Megatron's DDP buffer, which holds a module's parameters in reverse), else in the given order.
    Grouping rows in this order lets ``grouped_mm`` take the weights as one view."""
    order = list(range(len(tensors)))
    if len({t.untyped_storage()._cdata for t in tensors}) == 1:
        order.sort(key=lambda i: tensors[i].storage_offset())
    return order


def _weight_runs(weights: Sequence[ExpertWeights]) -> list[tuple[int, int]]:
    """Slot ranges in which fc1 and fc2 both form equally spaced runs."""
    cuts = set()
    for tensors in ([w.fc1 for w in weights], [w.fc2 for w in weights]):
        cuts.update(j for _, j in equally_spaced_runs(tensors))
    bounds = [0, *sorted(cuts)]
    return list(zip(bounds[:-1], bounds[1:]))


def _torch_grouped_linear(x: torch.Tensor, groups: RowGroups, weights: list[torch.Tensor]) -> torch.Tensor:
    out = F.grouped_mm(x, stacked_view(weights).transpose(1, 2), offs=groups.ends)
    if out.requires_grad:
        out.register_hook(_dense_gradient)
    return out


def _dense_gradient(grad: torch.Tensor) -> torch.Tensor:
    """grouped_mm's backward rejects broadcast gradients (zero strides, e.g. from a sum), also empty ones."""
    return grad.contiguous() if grad.numel() else grad.new_zeros(grad.shape)


def grouped_mm_experts(
    x: torch.Tensor,
    rows: RowGroups | Sequence[int],
    probs: torch.Tensor,
    weights: Sequence[ExpertWeights],
    math: ExpertMath,
) -> torch.Tensor:
    """Same contract as ``loop_experts``; per run of equally spaced weights (``_weight_runs``) two
    ``torch.nn.functional.grouped_mm`` over views of the weights, outputs concatenated."""
    groups = _row_groups(rows, x.device)
    runs = _weight_runs(weights)
    if len(runs) == 1:
        return _two_gemm_experts(x, groups, probs, weights, math, _torch_grouped_linear)
    outs = []
    for i, j in runs:
        first = sum(groups.counts[:i])
        last = first + sum(groups.counts[i:j])
        part = RowGroups(groups.counts[i:j], groups.ends[i:j] - first)
        outs.append(
            _two_gemm_experts(x[first:last], part, probs[first:last], weights[i:j], math, _torch_grouped_linear)
        )
    return torch.cat(outs)


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

# Adapted call: (A, B, out, layout, m_splits, single_output, grad, accumulate) with TE's meaning:
# layout "TN" gives out_i = B_i A_i^T, "NN" out_i = B_i A_i, "NT" out_i = B_i^T A_i; with
# ``single_output``, ``out`` is one tensor whose row blocks (``m_splits``) are the outputs; with
# ``accumulate``, out_i += the product (in out_i's dtype, e.g. an fp32 main_grad).
TEGemmCall = Callable[
    [list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], str, list[int], bool, bool, bool], None
]


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

    def call(A, B, out, layout, m_splits, single_output, grad, accumulate=False):
        gemm(
            A,
            B,
            out,
            out_dtype=out[0].dtype,
            layout=layout,
            m_splits=m_splits,
            single_output=single_output,
            grad=grad,
            accumulate=accumulate,
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

    Backward: dx = dy_i W_i per row block; dW_i = dy_i^T x_i, zero for slots without rows. With
    ``fuse`` (gradient_accumulation_fusion), a weight that has a ``main_grad`` gets dW_i added to it
    by TE (``accumulate=True``) and autograd gets what Megatron's own layers give: a placeholder,
    with ``grad_added_to_main_grad`` set for Megatron's DDP, where the weight has that attribute;
    a zero gradient where the weight also feeds replicas (their gradients come home through
    autograd and DDP must add them); None otherwise.
    """

    @staticmethod
    def forward(ctx, gemm, fuse, feeds_replicas, x, counts, *weights):
        ctx.gemm, ctx.counts, ctx.feeds_replicas = gemm, counts, feeds_replicas
        ctx.save_for_backward(x, *weights)
        ctx.main_grads = [getattr(w, "main_grad", None) if fuse else None for w in weights]
        ctx.params = [w if main is not None else None for w, main in zip(weights, ctx.main_grads)]
        out = torch.empty(x.shape[0], weights[0].shape[0], dtype=x.dtype, device=x.device)
        if x.shape[0]:
            gemm(list(weights), list(torch.split(x, counts)), [out], "TN", counts, True, False)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, *weights = ctx.saved_tensors
        counts = ctx.counts
        dy = dy.contiguous()
        dys = list(torch.split(dy, counts))
        dx = None
        if ctx.needs_input_grad[3]:
            dx = torch.empty_like(x)
            if x.shape[0]:
                ctx.gemm(weights, dys, [dx], "NN", counts, True, True)
        needs = ctx.needs_input_grad[5:]
        dws: list[torch.Tensor | None] = [None] * len(weights)
        xs = list(torch.split(x, counts))
        # Accumulated into main_grad: only slots with rows (nothing to add otherwise).
        fused = [i for i, need in enumerate(needs) if need and ctx.main_grads[i] is not None and counts[i]]
        if fused:
            ctx.gemm(
                [xs[i] for i in fused],
                [dys[i] for i in fused],
                [ctx.main_grads[i] for i in fused],
                "NT",
                [counts[i] for i in fused],
                False,
                True,
                True,
            )
        plain = [i for i, need in enumerate(needs) if need and ctx.main_grads[i] is None]
        if plain:
            # Zero-initialised: a slot without rows has a zero gradient whether or not TE writes it.
            fresh = [torch.zeros_like(weights[i]) for i in plain]
            if x.shape[0]:
                ctx.gemm(
                    [xs[i] for i in plain],
                    [dys[i] for i in plain],
                    fresh,
                    "NT",
                    [counts[i] for i in plain],
                    False,
                    True,
                )
            for i, grad in zip(plain, fresh):
                dws[i] = grad
        for i, need in enumerate(needs):
            if need and ctx.main_grads[i] is not None:
                dws[i] = _main_grad_placeholder(ctx.params[i], ctx.feeds_replicas[i])
        return (None, None, None, dx, None, *dws)


def _main_grad_placeholder(param: torch.Tensor, feeds_replicas: bool) -> torch.Tensor | None:
    """What autograd gets for a weight whose gradient went into ``main_grad`` (see _TEGroupedLinear)."""
    if feeds_replicas:
        return torch.zeros_like(param)
    if not hasattr(param, "grad_added_to_main_grad"):
        return None
    param.grad_added_to_main_grad = True
    if getattr(param, "zero_out_wgrad", False):
        return torch.zeros_like(param)
    return torch.empty_like(param)


def te_grouped_experts(
    x: torch.Tensor,
    rows: RowGroups | Sequence[int],
    probs: torch.Tensor,
    weights: Sequence[ExpertWeights],
    math: ExpertMath,
) -> torch.Tensor:
    """Same contract as ``loop_experts``; fc1 and fc2 each one TransformerEngine grouped GEMM.

    Home weights (Megatron's parameters) and replica weights (plain tensors) go into the same GEMM
    as TE's list of weights (no copy); the autograd function hands each its own gradient, into
    ``main_grad`` under ``math.accumulate_into_main_grad``. Weights must be plain (not FP8) tensors.
    """
    gemm, why = transformer_engine_gemm()
    if gemm is None:
        raise RuntimeError(f"expert backend te_grouped: {why}")
    groups = _row_groups(rows, x.device)
    feeds_replicas = [w.feeds_replicas for w in weights]

    def linear(a: torch.Tensor, groups: RowGroups, ws: list[torch.Tensor]) -> torch.Tensor:
        for w in ws:
            if w.dtype != a.dtype or type(w).__module__.startswith("transformer_engine"):
                raise TypeError(
                    f"te_grouped needs plain {a.dtype} weights like its input, got {type(w).__name__} {w.dtype}"
                )
        return _TEGroupedLinear.apply(
            gemm, math.accumulate_into_main_grad, feeds_replicas, a.contiguous(), groups.counts, *ws
        )

    return _two_gemm_experts(x, groups, probs, weights, math, linear)


ExpertsFn = Callable[
    [torch.Tensor, RowGroups | Sequence[int], torch.Tensor, Sequence[ExpertWeights], ExpertMath], torch.Tensor
]
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
    ``EXPERT_BACKENDS`` that runs, except that on CUDA it never falls back to the per-expert loop
    (one GEMM pair per expert is far slower there): it raises ValueError with the reasons and the
    flag that selects the loop deliberately. An explicit backend that cannot run raises ValueError
    naming the reason. The choice is logged once per (backend, device, dtype), with why faster ones
    were passed over.
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
        if chosen == "loop" and device.type == "cuda":
            raise ValueError(
                f"no grouped expert backend runs on {device} in {dtype} ({'; '.join(passed_over)}); the "
                "per-expert loop launches two GEMMs per expert: select it deliberately with "
                "--microep-expert-backend loop, or install TransformerEngine 2.0+"
            )
    key = (chosen, str(device), dtype)
    if key not in _LOGGED:
        _LOGGED.add(key)
        why = f" (not {'; '.join(passed_over)})" if passed_over else ""
        logger.info("MicroEP experts: %s backend on %s, %s%s", chosen, device, dtype, why)
    return chosen


def run_experts(
    backend: str,
    x: torch.Tensor,
    rows: RowGroups | Sequence[int],
    probs: torch.Tensor,
    weights: Sequence[ExpertWeights],
    math: ExpertMath,
) -> torch.Tensor:
    """The experts of ``backend``; ``rows``: row groups, or host counts per slot (their device
    offsets are then built here)."""
    return EXPERT_BACKENDS[backend].run(x, rows, probs, weights, math)
