"""Expert MLPs over the local physical experts (home + replicas) of one rank, functionally.

The weights are passed in per slot, so home experts (Megatron's own parameters) and replicas
(copies fetched from their home ranks) run in one grouped GEMM and autograd routes each gradient
to the tensor it came from. The math mirrors Megatron's expert MLP: ``fc1`` (+ bias), activation or
gated linear unit (optional clamp and linear offset), multiplied by the routing probability and cast
back to the activation dtype, ``fc2``, plus ``fc2`` bias scaled by the probability; or, with
``probs_on_input``, the probability scales the input instead.

Backends (a registry; ``choose_backend`` picks one per device and dtype, logged once):
- ``grouped_mm``: ``torch.nn.functional.grouped_mm`` over weights stacked per slot; used where the
  device and dtype run it (CPU from torch 2.13, Hopper-class GPUs) and rows are 16-byte aligned.
- ``loop``: one ``matmul`` pair per slot; runs everywhere and is the exact reference.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertMath:
    """The activation stage of Megatron's expert MLP for one model configuration."""

    activation: Callable[[torch.Tensor], torch.Tensor]
    gated: bool = False
    clamp: Optional[float] = None
    glu_offset: float = 0.0
    probs_on_input: bool = False


@dataclass(frozen=True)
class ExpertWeights:
    """One physical expert: fc1 [F1, H] (F1 = 2F when gated), fc2 [H, F], optional biases."""

    fc1: torch.Tensor
    fc2: torch.Tensor
    fc1_bias: Optional[torch.Tensor] = None
    fc2_bias: Optional[torch.Tensor] = None


def _scale_input(x: torch.Tensor, probs: torch.Tensor, math: ExpertMath) -> Tuple[torch.Tensor, torch.Tensor]:
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
    x: torch.Tensor, tokens_per_slot: Sequence[int], probs: torch.Tensor, weights: Sequence[ExpertWeights], math: ExpertMath
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


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(a, b, offs=offs)


def grouped_mm_experts(
    x: torch.Tensor, tokens_per_slot: Sequence[int], probs: torch.Tensor, weights: Sequence[ExpertWeights], math: ExpertMath
) -> torch.Tensor:
    """Same contract as ``loop_experts``; two grouped GEMMs over weights stacked per slot."""
    x, probs = _scale_input(x, probs, math)
    counts = torch.tensor(list(tokens_per_slot), dtype=torch.int64, device=x.device)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    fc1 = torch.stack([w.fc1 for w in weights]).transpose(1, 2)  # [S, H, F1]
    fc2 = torch.stack([w.fc2 for w in weights]).transpose(1, 2)  # [S, F, H]
    h = _grouped_mm(x, fc1, offs)
    if weights[0].fc1_bias is not None:
        h = h + torch.repeat_interleave(torch.stack([w.fc1_bias for w in weights]), counts, dim=0)
    y = _grouped_mm(_activate(h, probs, math).contiguous(), fc2, offs)
    if weights[0].fc2_bias is not None:
        bias = torch.repeat_interleave(torch.stack([w.fc2_bias for w in weights]), counts, dim=0)
        y = (y + bias * probs.unsqueeze(-1)).to(y.dtype)
    return y


ExpertsFn = Callable[[torch.Tensor, Sequence[int], torch.Tensor, Sequence[ExpertWeights], ExpertMath], torch.Tensor]

EXPERT_BACKENDS: Dict[str, ExpertsFn] = {
    "grouped_mm": grouped_mm_experts,
    "loop": loop_experts,
}

_PROBED: Dict[Tuple[str, torch.dtype], Optional[str]] = {}
_LOGGED: set = set()


def _grouped_mm_failure(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if a small forward+backward grouped_mm runs on ``device`` in ``dtype``, else why not."""
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
            except (RuntimeError, NotImplementedError) as err:
                _PROBED[key] = f"grouped_mm does not run on {device} in {dtype}: {str(err).splitlines()[0]}"
    return _PROBED[key]


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype, widths: Sequence[int]) -> str:
    """Resolve ``requested`` ('auto' or a registry name) for tensors on ``device``.

    ``widths`` are the inner dimensions of the GEMMs (H, F1, F): grouped_mm needs rows aligned to
    16 bytes. An explicit ``grouped_mm`` that cannot run raises ValueError naming the reason.
    """
    if requested != "auto" and requested not in EXPERT_BACKENDS:
        raise ValueError(f"unknown expert backend {requested!r}; choose from auto, {', '.join(EXPERT_BACKENDS)}")
    failure = _grouped_mm_failure(device, dtype)
    element = torch.empty((), dtype=dtype).element_size()
    misaligned = [w for w in widths if (w * element) % 16]
    if failure is None and misaligned:
        failure = f"widths {misaligned} are not multiples of 16 bytes in {dtype}"
    if requested == "grouped_mm" and failure is not None:
        raise ValueError(f"expert backend grouped_mm unavailable: {failure}")
    chosen = requested if requested != "auto" else ("grouped_mm" if failure is None else "loop")
    key = (chosen, str(device), dtype)
    if key not in _LOGGED:
        _LOGGED.add(key)
        why = "" if chosen == "grouped_mm" or failure is None else f" ({failure})"
        logger.info("MicroEP experts: %s backend on %s, %s%s", chosen, device, dtype, why)
    return chosen


def run_experts(
    backend: str, x: torch.Tensor, tokens_per_slot: Sequence[int], probs: torch.Tensor,
    weights: List[ExpertWeights], math: ExpertMath,
) -> torch.Tensor:
    return EXPERT_BACKENDS[backend](x, tokens_per_slot, probs, weights, math)
