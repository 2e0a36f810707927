"""Write the default expert-GEMM efficiency table (megatron_microep/data/gemm_efficiency_h100.csv).

No GPU was available to measure it, so it is derived from public H100 SXM5 figures with a roofline
plus tile-padding model of one expert's forward pass (fc1 [n, h] x [h, 2f], fc2 [n, f] x [f, h]):
for each GEMM, n rows are padded to the MMA tile (64 rows up to 64 tokens, else 128); time is the
larger of padded FLOPs at ``sustained`` x peak and HBM bytes (inputs, weights, outputs) at the HBM
bandwidth. Efficiency = useful FLOPs / (peak x time). Replace the table with a measured one
(columns ``tokens,efficiency``) through ``microep simulate --gemm-table``.

Usage: python scripts/gemm_roofline_table.py [--hidden 7168 --ffn 2048 --out PATH]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

PEAK_TFLOPS = 989.4  # H100 SXM5 dense BF16 (NVIDIA H100 datasheet)
HBM_TBPS = 3.35  # H100 SXM5 HBM3 bandwidth (datasheet)
SUSTAINED = 0.75  # large BF16 GEMMs reach ~740 TFLOPS on H100 SXM5 (public cuBLAS/TE figures)
BYTES = 2  # bf16


def gemm_seconds(n: int, k: int, m: int) -> float:
    tile = 64 if n <= 64 else 128
    padded = math.ceil(n / tile) * tile
    compute = 2.0 * padded * k * m / (PEAK_TFLOPS * 1e12 * SUSTAINED)
    memory = BYTES * (n * k + k * m + n * m) / (HBM_TBPS * 1e12)
    return max(compute, memory)


def efficiency(n: int, hidden: int, ffn: int) -> float:
    seconds = gemm_seconds(n, hidden, 2 * ffn) + gemm_seconds(n, ffn, hidden)
    useful = 2.0 * n * hidden * 2 * ffn + 2.0 * n * ffn * hidden
    return useful / (PEAK_TFLOPS * 1e12 * seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=7168, help="hidden size (default: DeepSeek-V3's 7168)")
    parser.add_argument("--ffn", type=int, default=2048, help="expert FFN size (default: DeepSeek-V3's 2048)")
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "megatron_microep/data/gemm_efficiency_h100.csv")
    )
    args = parser.parse_args()
    sizes = sorted({int(round(2 ** (i / 2))) for i in range(0, 33)})  # 1 .. 65536, half-octave steps
    lines = [
        "# Expert grouped-GEMM efficiency (fraction of peak BF16 FLOPs) vs tokens per expert, H100 SXM5.",
        "# DERIVED, not measured: roofline + tile-padding model of scripts/gemm_roofline_table.py from public",
        f"# H100 SXM5 datasheet figures (peak {PEAK_TFLOPS} TFLOPS dense BF16, HBM3 {HBM_TBPS} TB/s) and a",
        f"# sustained large-GEMM fraction of {SUSTAINED}; expert shape hidden={args.hidden}, ffn={args.ffn} (SwiGLU).",
        f"# peak_tflops={PEAK_TFLOPS}",
        "tokens,efficiency",
    ]
    lines += [f"{n},{efficiency(n, args.hidden, args.ffn):.5f}" for n in sizes]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({len(sizes)} rows)")


if __name__ == "__main__":
    main()
