"""The grouped_mm and te_grouped expert backends against the per-slot loop reference, and backend selection."""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_microep.runtime import experts
from megatron_microep.runtime.experts import (
    ExpertMath,
    ExpertWeights,
    choose_backend,
    grouped_mm_experts,
    loop_experts,
    te_gemm_adapter,
    te_grouped_experts,
)

SEED = int(os.environ.get("MICROEP_TEST_SEED", torch.seed() % 2**31))

MATHS = {
    "gelu": ExpertMath(activation=F.gelu),
    "swiglu": ExpertMath(activation=F.silu, gated=True),
    "swiglu_clamp_offset": ExpertMath(activation=F.silu, gated=True, clamp=0.5, glu_offset=1.0),
    "probs_on_input": ExpertMath(activation=F.relu, probs_on_input=True),
}


def _grouped_mm_runs() -> bool:
    """Whether this torch runs grouped_mm on CPU, asked of torch itself (not of ``choose_backend``,
    whose probe is under test: a broken probe must fail these tests, not skip them)."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        a, b = torch.ones(8, 16, requires_grad=True), torch.ones(2, 16, 16, requires_grad=True)
        out = F.grouped_mm(a, b, offs=torch.tensor([3, 8], dtype=torch.int32))
        out.backward(torch.ones_like(out))  # a dense upstream: expanded ones (``.sum()``) are refused
    except (RuntimeError, NotImplementedError):
        return False
    return True


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


def _leaves(x, probs, weights, dtype, device="cpu"):
    x = x.to(device, dtype).requires_grad_(True)
    probs = probs.to(device, dtype).requires_grad_(True)
    ws = [
        ExpertWeights(
            *(
                t.to(device, dtype).requires_grad_(True) if t is not None else None
                for t in (w.fc1, w.fc2, w.fc1_bias, w.fc2_bias)
            )
        )
        for w in weights
    ]
    return x, probs, ws


def _grads(fn, x, counts, probs, weights, math, upstream, dtype, device="cpu"):
    x, probs, ws = _leaves(x, probs, weights, dtype, device)
    out = fn(x, counts, probs, ws, math)
    out.backward(upstream.to(device, dtype))
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
    # Aligned widths: auto picks grouped_mm exactly when torch itself runs it here.
    assert choose_backend("auto", cpu, torch.float32, [16, 32]) == ("grouped_mm" if _grouped_mm_runs() else "loop")
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
    ref = loop_experts(
        x.to(torch.bfloat16).double(),
        counts,
        probs.double(),
        [ExpertWeights(*(t.double() for t in (w.fc1, w.fc2, w.fc1_bias, w.fc2_bias))) for w in weights],
        MATHS["swiglu"],
    )
    assert (out.double() - ref).abs().max() <= 0.05 * ref.abs().max()


# --- te_grouped ---------------------------------------------------------------------------------
def _gemm_contract(A, B, out, layout, m_splits, single_output, grad, accumulate):
    """TransformerEngine's general_grouped_gemm as read from its sources, in torch: "TN" out_i =
    B_i A_i^T, "NN" out_i = B_i A_i, "NT" out_i = B_i^T A_i; single_output splits out[0] by rows."""
    assert not accumulate
    outs = list(torch.split(out[0], m_splits)) if single_output else out
    assert len(A) == len(B) == len(outs) == len(m_splits)
    for a, b, o in zip(A, B, outs):
        o.copy_({"TN": lambda: b @ a.t(), "NN": lambda: b @ a, "NT": lambda: b.t() @ a}[layout]())


WORKSPACES = [torch.empty(1)]


def te_gemm_2_0(
    A,
    B,
    out,
    out_dtype,
    workspaces,
    layout="TN",
    m_splits=None,
    gelu=False,
    grad=False,
    accumulate=False,
    bias=None,
    use_bias=False,
    use_split_accumulator=False,
    D_dtype=None,
    single_output=False,
):
    assert workspaces is WORKSPACES and out_dtype == out[0].dtype and not use_bias
    _gemm_contract(A, B, out, layout, m_splits, single_output, grad, accumulate)


def te_gemm_2_10(
    A,
    B,
    out,
    out_dtype,
    layout="TN",
    m_splits=None,
    gelu=False,
    grad=False,
    accumulate=False,
    bias=None,
    use_bias=False,
    use_split_accumulator=False,
    D_dtype=None,
    single_output=False,
):
    assert out_dtype == out[0].dtype and not use_bias
    _gemm_contract(A, B, out, layout, m_splits, single_output, grad, accumulate)


def te_gemm_2_11(
    A,
    B,
    out,
    quantization_params,
    out_dtype,
    layout="TN",
    m_splits=None,
    gelu=False,
    grad=False,
    accumulate=False,
    bias=None,
    use_bias=False,
    use_split_accumulator=False,
    D_dtype=None,
    single_output=False,
):
    assert quantization_params == [None] * len(A) and out_dtype == out[0].dtype and not use_bias
    _gemm_contract(A, B, out, layout, m_splits, single_output, grad, accumulate)


@pytest.mark.parametrize("gemm", [te_gemm_2_0, te_gemm_2_10, te_gemm_2_11], ids=lambda f: f.__name__)
@pytest.mark.parametrize("bias", [False, True])
def test_te_grouped_autograd_matches_loop_through_te_contract(monkeypatch, gemm, bias):
    """te_grouped's autograd function and signature adapters, on CPU, over a torch model of TE's
    grouped GEMM contract (the real TE runs in test_te_grouped_matches_loop_on_cuda)."""
    print(f"experts test seed: {SEED} (rerun with MICROEP_TEST_SEED={SEED})")
    monkeypatch.setattr(experts, "transformer_engine_gemm", lambda: te_gemm_adapter(gemm, lambda: WORKSPACES))
    gen = torch.Generator().manual_seed(SEED + 4)
    math = MATHS["swiglu_clamp_offset"]
    x, counts, probs, weights = _case(gen, slots=5, hidden=16, ffn=24, gated=True, bias=bias)
    upstream = torch.randn(x.shape[0], 16, generator=gen, dtype=torch.float64)
    ref_out, ref_grads = _grads(loop_experts, x, counts, probs, weights, math, upstream, torch.float32)
    out, grads = _grads(te_grouped_experts, x, counts, probs, weights, math, upstream, torch.float32)
    _assert_close(out, ref_out, grads, ref_grads, 1e-5)


def test_te_grouped_without_tokens_gives_zero_weight_gradients(monkeypatch):
    monkeypatch.setattr(experts, "transformer_engine_gemm", lambda: te_gemm_adapter(te_gemm_2_11, None))
    gen = torch.Generator().manual_seed(SEED + 5)
    x, _, probs, weights = _case(gen, slots=3, hidden=8, ffn=4, gated=False, bias=False)
    out, grads = _grads(
        te_grouped_experts, x[:0], [0, 0, 0], probs[:0], weights, MATHS["gelu"], torch.ones(0, 8), torch.float32
    )
    assert out.shape == (0, 8)
    assert all(g is not None and g.abs().sum() == 0 for g in grads[2:])


def _assert_close(out, ref_out, grads, ref_grads, rel):
    assert (out - ref_out).abs().max() <= rel * ref_out.abs().max(), "output"
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert (g is None) == (r is None), f"tensor {i}"
        if r is not None:
            assert (g - r).abs().max() <= rel * max(r.abs().max().item(), 1.0), f"gradient {i}"


def test_te_signature_adapter_refuses_unknown_signatures():
    def te_1_grouped_gemm(A, B, out, dtype, workspaces, gelu=False):  # TE 1.x's name and order
        return None

    def renamed(A, B, out, quantizers, out_dtype, layout="TN"):
        return None

    for gemm in (te_1_grouped_gemm, renamed):
        call, why = te_gemm_adapter(gemm, lambda: WORKSPACES)
        assert call is None and "signature MicroEP does not know" in why, gemm.__name__


def test_te_grouped_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(ValueError, match="te_grouped unavailable: tensors are on cpu, TransformerEngine runs on CUDA"):
        choose_backend("te_grouped", cpu, torch.bfloat16, [16])
    assert choose_backend("auto", cpu, torch.float32, [6]) == "loop"

    missing = (None, "TransformerEngine not usable (ModuleNotFoundError: No module named 'transformer_engine')")
    monkeypatch.setattr(experts, "transformer_engine_gemm", lambda: missing)
    with pytest.raises(ValueError, match="te_grouped unavailable: TransformerEngine not usable"):
        choose_backend("te_grouped", cuda, torch.bfloat16, [16])
    assert choose_backend("auto", cuda, torch.bfloat16, [16]) != "te_grouped"

    monkeypatch.setattr(experts, "transformer_engine_gemm", lambda: te_gemm_adapter(te_gemm_2_11, None))
    assert choose_backend("auto", cuda, torch.bfloat16, [16]) == "te_grouped"
    assert choose_backend("auto", cuda, torch.float32, [6]) == "te_grouped"  # no 16-byte rule for TE
    assert choose_backend("auto", cpu, torch.bfloat16, [16]) != "te_grouped"
    with pytest.raises(ValueError, match="te_grouped unavailable: torch.float64 is not one of"):
        choose_backend("te_grouped", cuda, torch.float64, [16])


def test_choice_is_logged_once_with_the_reasons(caplog):
    caplog.set_level("INFO", logger=experts.logger.name)
    experts._LOGGED.clear()
    for _ in range(3):
        choose_backend("auto", torch.device("cpu"), torch.float32, [6])
    lines = [r.getMessage() for r in caplog.records if "MicroEP experts" in r.getMessage()]
    assert len(lines) == 1
    assert "loop backend" in lines[0] and "te_grouped: tensors are on cpu" in lines[0] and "16 bytes" in lines[0]


def _real_te_reason():
    """Why the real-TE test cannot run here, from the machine alone (a CUDA device, an installed
    transformer_engine), never from ``experts.transformer_engine_gemm``: if TE is installed and that
    lookup breaks, the test must fail."""
    if not torch.cuda.is_available():
        return "needs a CUDA device (te_grouped runs TransformerEngine's grouped GEMM on CUDA)"
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer_engine is not installed"
    return None


@pytest.mark.skipif(_real_te_reason() is not None, reason=f"real TransformerEngine: {_real_te_reason()}")
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("math_name", sorted(MATHS))
@pytest.mark.parametrize("bias", [False, True])
def test_te_grouped_matches_loop_on_cuda(dtype, rel, math_name, bias):
    """The real TE grouped GEMM against the loop on the same device and dtype: outputs and every
    weight, input and probability gradient; one slot has no rows. fp32 allows TF32-level error."""
    print(f"experts test seed: {SEED} (rerun with MICROEP_TEST_SEED={SEED})")
    gen = torch.Generator().manual_seed(SEED + 6)
    math = MATHS[math_name]
    x, counts, probs, weights = _case(gen, slots=6, hidden=64, ffn=96, gated=math.gated, bias=bias)
    assert 0 in counts
    upstream = torch.randn(x.shape[0], 64, generator=gen, dtype=torch.float64)
    ref_out, ref_grads = _grads(loop_experts, x, counts, probs, weights, math, upstream, dtype, "cuda")
    out, grads = _grads(te_grouped_experts, x, counts, probs, weights, math, upstream, dtype, "cuda")
    _assert_close(out, ref_out, grads, ref_grads, rel)
