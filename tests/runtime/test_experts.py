"""The grouped_mm and te_grouped expert backends against the per-slot loop reference, and backend selection."""

import dataclasses
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
from megatron_microep.runtime.te_reference import general_grouped_gemm

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
    """TransformerEngine's general_grouped_gemm as read from its sources, in torch (runtime.te_reference)."""
    general_grouped_gemm(
        A,
        B,
        out,
        [None] * len(A),
        out[0].dtype,
        layout=layout,
        m_splits=m_splits,
        grad=grad,
        accumulate=accumulate,
        single_output=single_output,
    )


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


te_gemm_2_11 = general_grouped_gemm  # the reference has the 2.11-on signature


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
    # Without TE nothing grouped runs on CUDA here: auto refuses the loop instead of picking it.
    with pytest.raises(ValueError, match="--microep-expert-backend loop"):
        choose_backend("auto", cuda, torch.bfloat16, [16])

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


# --- weights as views of their storage; gradients into main_grad -----------------------------------


def _buffer_weights(gen, slots, hidden, ffn, order, gap=0):
    """Experts carved from one fp32 buffer in ``order`` (slot order[i] at position i), ``gap`` spare
    elements after each, as Megatron's DDP buffer holds parameters."""
    shapes = [(2 * ffn, hidden), (hidden, ffn)]
    per = sum(a * b for a, b in shapes) + gap
    buffer = torch.randn(slots * per, generator=gen)
    weights = [None] * slots
    for position, slot in enumerate(order):
        offset = position * per
        fc1 = buffer.narrow(0, offset, shapes[0][0] * shapes[0][1]).view(shapes[0])
        fc2 = buffer.narrow(0, offset + fc1.numel(), shapes[1][0] * shapes[1][1]).view(shapes[1])
        weights[slot] = ExpertWeights(fc1.requires_grad_(True), fc2.requires_grad_(True))
    return buffer, weights


def test_equally_spaced_runs_and_stacked_views():
    gen = torch.Generator().manual_seed(SEED + 7)
    buffer, weights = _buffer_weights(gen, 4, 8, 8, order=[0, 1, 2, 3])
    fc1 = [w.fc1 for w in weights]
    assert experts.equally_spaced_runs(fc1) == [(0, 4)]
    view = experts.stacked_view(fc1)
    assert view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()  # no copy
    assert all(torch.equal(view[i], fc1[i]) for i in range(4))
    (view * torch.arange(4.0).view(4, 1, 1)).sum().backward()
    assert all(torch.equal(w.fc1.grad, torch.full_like(w.fc1, float(i))) for i, w in enumerate(weights))
    # Reversed in memory (DDP's order): each slot its own run, unless grouped in storage order.
    _, reversed_weights = _buffer_weights(gen, 4, 8, 8, order=[3, 2, 1, 0])
    fc1 = [w.fc1 for w in reversed_weights]
    assert experts.equally_spaced_runs(fc1) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    order = experts.storage_order(fc1)
    assert order == [3, 2, 1, 0] and experts.equally_spaced_runs([fc1[i] for i in order]) == [(0, 4)]
    # Separately allocated tensors, or a gap that changes: one run each.
    separate = [torch.randn(16, 8, generator=gen) for _ in range(3)]
    assert experts.equally_spaced_runs(separate) == [(0, 1), (1, 2), (2, 3)]
    storage = torch.randn(200, generator=gen)
    uneven = [storage.narrow(0, start, 16) for start in (0, 16, 32, 56)]
    assert experts.equally_spaced_runs(uneven) == [(0, 3), (3, 4)]


@pytest.mark.skipif(not _grouped_mm_runs(), reason="torch.nn.functional.grouped_mm does not run on this CPU torch")
@pytest.mark.parametrize("layout", ["one buffer", "reversed buffer in storage order", "separate", "gaps"])
def test_grouped_mm_over_weight_views_matches_loop(layout):
    """Also with a broadcast output gradient (a plain ``sum``), which grouped_mm's backward rejects
    unless it is made contiguous."""
    gen = torch.Generator().manual_seed(SEED + 8)
    slots, hidden, ffn = 4, 16, 16
    if layout == "separate":
        _, _, _, weights = _case(gen, slots, hidden, ffn, gated=True, bias=False)
        weights = [ExpertWeights(w.fc1.float().requires_grad_(), w.fc2.float().requires_grad_()) for w in weights]
    else:
        order = {"one buffer": [0, 1, 2, 3], "gaps": [0, 1, 2, 3]}.get(layout, [3, 2, 1, 0])
        _, weights = _buffer_weights(gen, slots, hidden, ffn, order, gap=4 if layout == "gaps" else 0)
        if layout.startswith("reversed"):
            weights = [weights[i] for i in experts.storage_order([w.fc1 for w in weights])]
    counts = [3, 0, 5, 4]
    x = torch.randn(sum(counts), hidden, generator=gen, requires_grad=True)
    probs = torch.rand(sum(counts), generator=gen, requires_grad=True)
    results = []
    for fn in (loop_experts, grouped_mm_experts):
        out = fn(x, counts, probs, weights, MATHS["swiglu"])
        out.sum().backward()
        tensors = [x, probs] + [t for w in weights for t in (w.fc1, w.fc2)]
        results.append((out.detach(), [t.grad.clone() for t in tensors]))
        for t in tensors:
            t.grad = None
    (ref, ref_grads), (out, grads) = results
    _assert_close(out.double(), ref.double(), [g.double() for g in grads], [g.double() for g in ref_grads], 1e-5)


def test_te_grouped_accumulates_weight_gradients_into_main_grad(monkeypatch):
    """gradient_accumulation_fusion: TE adds dW to main_grad (fp32) for parameters that have one;
    autograd gets Megatron's placeholder (grad_added_to_main_grad set), or a zero gradient for an
    expert that also feeds replicas; weights without main_grad (replicas) get plain gradients."""
    monkeypatch.setattr(experts, "transformer_engine_gemm", lambda: te_gemm_adapter(general_grouped_gemm, None))
    gen = torch.Generator().manual_seed(SEED + 9)
    _, _, _, weights = _case(gen, slots=4, hidden=16, ffn=16, gated=True, bias=False)
    counts = [3, 0, 5, 4]  # fixed rows (the random case may have fewer than 12)
    x, probs = torch.randn(sum(counts), 16, generator=gen), torch.rand(sum(counts), generator=gen)
    upstream = torch.randn(sum(counts), 16, generator=gen)
    ref_out, ref_grads = _grads(loop_experts, x, counts, probs, weights, MATHS["swiglu"], upstream, torch.float32)
    ws = [
        ExpertWeights(w.fc1.float().requires_grad_(), w.fc2.float().requires_grad_(), feeds_replicas=(i == 2))
        for i, w in enumerate(weights)
    ]
    for w in ws[:3]:  # slots 0-2 are home parameters under Megatron's DDP; slot 3 a replica
        for t in (w.fc1, w.fc2):
            t.main_grad = torch.ones_like(t)  # accumulated into, not overwritten
            t.grad_added_to_main_grad = False
    math = dataclasses.replace(MATHS["swiglu"], accumulate_into_main_grad=True)
    out = te_grouped_experts(x, counts, probs, ws, math)
    out.backward(upstream)
    assert (out.double() - ref_out).abs().max() <= 1e-5 * ref_out.abs().max()
    expected = [g for g in ref_grads[2:]]  # fc1, fc2 per slot, loop's
    for i, w in enumerate(ws):
        for j, t in enumerate((w.fc1, w.fc2)):
            ref = expected[2 * i + j]
            if i < 3:
                assert torch.allclose(t.main_grad.double(), 1.0 + ref, rtol=1e-5, atol=1e-5), (i, j)
            if i in (0, 1):
                assert t.grad_added_to_main_grad  # placeholder gradient, ignored by DDP
            elif i == 2:
                assert not t.grad_added_to_main_grad and torch.equal(t.grad, torch.zeros_like(t))
            else:
                assert torch.allclose(t.grad.double(), ref, rtol=1e-5, atol=1e-5)
