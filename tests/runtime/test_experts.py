"""The grouped_mm expert backend against the per-slot loop reference, and backend selection."""
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_microep.runtime.experts import (
    ExpertMath,
    ExpertWeights,
    choose_backend,
    grouped_mm_experts,
    loop_experts,
)

SEED = int(os.environ.get("MICROEP_TEST_SEED", torch.seed() % 2**31))

MATHS = {
    "gelu": ExpertMath(activation=F.gelu),
    "swiglu": ExpertMath(activation=F.silu, gated=True),
    "swiglu_clamp_offset": ExpertMath(activation=F.silu, gated=True, clamp=0.5, glu_offset=1.0),
    "probs_on_input": ExpertMath(activation=F.relu, probs_on_input=True),
}


def _grouped_mm_runs() -> bool:
    try:
        return choose_backend("auto", torch.device("cpu"), torch.float32, [16]) == "grouped_mm"
    except ValueError:
        return False


def _case(gen, slots, hidden, ffn, gated, bias):
    counts = torch.randint(0, 9, (slots,), generator=gen)
    counts[torch.randint(0, slots, (1,), generator=gen)] = 0  # an empty slot
    rows = int(counts.sum())
    fc1_out = 2 * ffn if gated else ffn
    weights = [
        ExpertWeights(
            fc1=torch.randn(fc1_out, hidden, generator=gen, dtype=torch.float64),
            fc2=torch.randn(hidden, ffn, generator=gen, dtype=torch.float64),
            fc1_bias=torch.randn(fc1_out, generator=gen, dtype=torch.float64) if bias else None,
            fc2_bias=torch.randn(hidden, generator=gen, dtype=torch.float64) if bias else None,
        )
        for _ in range(slots)
    ]
    x = torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
    probs = torch.rand(rows, generator=gen, dtype=torch.float64)
    return x, counts.tolist(), probs, weights


def _leaves(x, probs, weights, dtype):
    x = x.to(dtype).requires_grad_(True)
    probs = probs.to(dtype).requires_grad_(True)
    ws = [
        ExpertWeights(*(t.to(dtype).requires_grad_(True) if t is not None else None
                        for t in (w.fc1, w.fc2, w.fc1_bias, w.fc2_bias)))
        for w in weights
    ]
    return x, probs, ws


def _grads(fn, x, counts, probs, weights, math, upstream, dtype):
    x, probs, ws = _leaves(x, probs, weights, dtype)
    out = fn(x, counts, probs, ws, math)
    out.backward(upstream.to(dtype))
    tensors = [x, probs] + [t for w in ws for t in (w.fc1, w.fc2, w.fc1_bias, w.fc2_bias) if t is not None]
    return out.detach().double(), [t.grad.double() if t.grad is not None else None for t in tensors]


@pytest.mark.skipif(not _grouped_mm_runs(), reason="torch.nn.functional.grouped_mm does not run on this CPU torch")
@pytest.mark.parametrize("math_name", sorted(MATHS))
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mm_matches_loop(math_name, bias):
    print(f"experts test seed: {SEED} (rerun with MICROEP_TEST_SEED={SEED})")
    gen = torch.Generator().manual_seed(SEED)
    math = MATHS[math_name]
    x, counts, probs, weights = _case(gen, slots=5, hidden=16, ffn=24, gated=math.gated, bias=bias)
    upstream = torch.randn(x.shape[0], 16, generator=gen, dtype=torch.float64)
    ref_out, ref_grads = _grads(loop_experts, x, counts, probs, weights, math, upstream, torch.float32)
    out, grads = _grads(grouped_mm_experts, x, counts, probs, weights, math, upstream, torch.float32)
    assert (out - ref_out).abs().max() <= 1e-5 * ref_out.abs().max()
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert (g is None) == (r is None), f"tensor {i}"
        if r is not None:
            assert (g - r).abs().max() <= 1e-5 * max(r.abs().max().item(), 1.0), f"gradient {i}"


def test_loop_matches_dense_per_token_formula():
    """The loop reference itself, against the MLP written out token by token in float64."""
    gen = torch.Generator().manual_seed(SEED + 1)
    math = MATHS["swiglu_clamp_offset"]
    x, counts, probs, weights = _case(gen, slots=3, hidden=8, ffn=4, gated=True, bias=True)
    out = loop_experts(x, counts, probs, weights, math)
    slot_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    for i in range(x.shape[0]):
        w = weights[slot_of_row[i]]
        h = w.fc1 @ x[i] + w.fc1_bias
        gate, lin = h[:4].clamp(max=0.5), h[4:].clamp(-0.5, 0.5)
        a = F.silu(gate) * (lin + 1.0) * probs[i]
        y = w.fc2 @ a + w.fc2_bias * probs[i]
        torch.testing.assert_close(out[i], y, rtol=1e-12, atol=1e-12)


def test_every_weight_gets_a_gradient_even_without_rows():
    gen = torch.Generator().manual_seed(SEED + 2)
    x, counts, probs, weights = _case(gen, slots=3, hidden=8, ffn=4, gated=False, bias=False)
    counts = [0, x.shape[0], 0]
    _, grads = _grads(loop_experts, x, counts, probs, weights, MATHS["gelu"], torch.ones(x.shape[0], 8), torch.float64)
    assert all(g is not None for g in grads[2:])
    assert grads[2].abs().sum() == 0  # slot 0 had no rows: zero, but present


def test_backend_choice():
    cpu = torch.device("cpu")
    assert choose_backend("loop", cpu, torch.float32, [16, 32]) == "loop"
    # 6 float32 = 24 bytes: grouped_mm needs 16-byte aligned rows, so auto falls back to the loop.
    assert choose_backend("auto", cpu, torch.float32, [6]) == "loop"
    with pytest.raises(ValueError, match="grouped_mm unavailable"):
        choose_backend("grouped_mm", cpu, torch.float32, [6])
    with pytest.raises(ValueError, match="unknown expert backend"):
        choose_backend("te", cpu, torch.float32, [16])


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_bf16_tokens_with_fp32_probabilities_stay_bf16(backend):
    """Megatron's router may keep probabilities in fp32; expert outputs keep the token dtype."""
    if backend == "grouped_mm" and not _grouped_mm_runs():
        pytest.skip("grouped_mm does not run on this CPU torch")
    gen = torch.Generator().manual_seed(SEED + 3)
    x, counts, probs, weights = _case(gen, slots=3, hidden=16, ffn=16, gated=True, bias=True)
    weights = [ExpertWeights(*(t.to(torch.bfloat16) for t in (w.fc1, w.fc2, w.fc1_bias, w.fc2_bias))) for w in weights]
    fn = grouped_mm_experts if backend == "grouped_mm" else loop_experts
    out = fn(x.to(torch.bfloat16), counts, probs.float(), weights, MATHS["swiglu"])
    assert out.dtype == torch.bfloat16
    ref = loop_experts(x.to(torch.bfloat16).double(), counts, probs.double(),
                       [ExpertWeights(*(t.double() for t in (w.fc1, w.fc2, w.fc1_bias, w.fc2_bias))) for w in weights],
                       MATHS["swiglu"])
    assert (out.double() - ref).abs().max() <= 0.05 * ref.abs().max()
