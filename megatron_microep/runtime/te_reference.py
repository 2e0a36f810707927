"""TransformerEngine's grouped GEMM contract in torch: the reference ``te_grouped`` is tested against
where TransformerEngine cannot run (no CUDA here).

Read from TransformerEngine's sources (``transformer_engine/pytorch/cpp_extensions/gemm.py``,
``general_grouped_gemm``, v2.11 to v2.18 signature): layout "TN" gives out_i = B_i A_i^T, "NN"
out_i = B_i A_i, "NT" out_i = B_i^T A_i; with ``single_output`` the outputs are the row blocks
(``m_splits``) of ``out[0]``; with ``accumulate`` each product is added to out_i in out_i's dtype
(TE's ``beta = 1``: how ``GroupedLinear`` accumulates weight gradients into fp32 ``main_grad``).
Products of 16-bit inputs accumulate in fp32, as cuBLAS does.
"""

from __future__ import annotations

import torch


def general_grouped_gemm(
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
    if quantization_params != [None] * len(A) or gelu or use_bias:
        raise NotImplementedError("the reference covers unquantised GEMMs without fused bias or GELU")
    if out_dtype != out[0].dtype:
        raise ValueError(f"out_dtype {out_dtype} differs from out's {out[0].dtype}")
    outs = list(torch.split(out[0], m_splits)) if single_output else out
    if not len(A) == len(B) == len(outs) == len(m_splits):
        raise ValueError("A, B, out and m_splits must have one entry per GEMM")
    if accumulate and single_output:
        raise ValueError("accumulate applies to separate outputs")
    for a, b, o in zip(A, B, outs):
        wide = torch.float32 if o.dtype in (torch.bfloat16, torch.float16) or accumulate else o.dtype
        a, b = a.to(max(wide, a.dtype, key=_width)), b.to(max(wide, b.dtype, key=_width))
        product = {"TN": lambda: b @ a.t(), "NN": lambda: b @ a, "NT": lambda: b.t() @ a}[layout]()
        if accumulate:
            o.add_(product.to(o.dtype))
        else:
            o.copy_(product)
    return out, [None] * len(A), None


def _width(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits
