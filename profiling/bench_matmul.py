"""This machine's matrix-product throughput per thread, fp32 and bf16: the yardstick for comparing wall times measured
on different CPUs (an AMX processor multiplies bf16 ~8x faster than fp32; one with AVX512-BF16 but no AMX ~4x).

    python profiling/bench_matmul.py              # [2048 x n] @ [n x n], n = 192 and 1024, 1 thread

The shapes are those of ``../shared/research/cpu-stack.md`` (AMX machine: bf16 1.24-1.33 TFLOP/s, fp32 0.15).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from geoforge.engine.precision import cpu_flags  # noqa: E402


def throughput(n: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """TFLOP/s of ``[2048 x n] @ [n x n]`` in ``dtype``, repeated for about ``seconds``."""
    a, b = torch.randn(2048, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        a @ b
        reps += 1
    return 2 * 2048 * n * n * reps / (time.perf_counter() - began) / 1e12


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sizes", type=int, nargs="+", default=[192, 1024])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    flags = cpu_flags()
    print(f"{args.threads} thread(s); CPU flags: amx_bf16 {'amx_bf16' in flags}, avx512_bf16 {'avx512_bf16' in flags}")
    for n in args.sizes:
        fp32, bf16 = throughput(n, torch.float32), throughput(n, torch.bfloat16)
        print(f"[2048 x {n}] @ [{n} x {n}]: fp32 {fp32:.3f} TFLOP/s, bf16 {bf16:.3f} TFLOP/s, bf16 / fp32 {bf16 / fp32:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
