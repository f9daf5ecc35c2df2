"""Benchmark the fused kernels against the PyTorch eager reference and torch.compile, side by side.

    python profiling/bench_kernels.py [--quick | --full] [--kernels align,reproject,film_norm] [--device cpu|cuda]
                                      [--peak-gbps GB/s] [--threads N] [--no-plot] [--csv PATH]

The sweep that fits the device runs by default: ``--quick`` on a CPU (a few minutes on 2 cores), ``--full`` on
CUDA; either can be asked for. The plan (cases per kernel) and an upper estimate of the time print first, then a
``[i/N]`` line per case.

Each kernel's cases come from ``profiling/bench_<kernel>.py`` (``cases(quick, device)``); the harness
(``profiling/_harness.py``) times them (p50/p20/p80), measures peak memory (CUDA: max_memory_allocated;
CPU: the torch profiler's memory accounting), prints one table with every provider's speed-up and memory
saving against the eager reference of the same run (and, for a kernel module with a ``summary()``, its own lines,
e.g. film_norm's process CPU times), the bytes formulas, appends CSV rows to
``runs/profiling/kernels.csv`` and draws ``runs/profiling/<kernel>.png`` (untracked: measuring leaves the checkout
clean; ``--csv profiling/results/kernels.csv`` adds the rows to the committed record).

On CUDA the table has the achieved fraction of the memory-bandwidth roofline, against an assumed peak
(by device name: H100 3350 GB/s, H200 4800 GB/s, A100 2039 GB/s; ``--peak-gbps`` overrides).
``--quick``: small sweeps (alignment N = 1024 and 4096 at full dims, its loss tail at N = 4096,
reprojection S=10 at 256x256, RMSNorm + FiLM at the U-ViT3D's two transformer widths); a couple of minutes on
2 CPU cores. ``--full``: the whole sweep (on 2 CPU cores well over 15 minutes). Each size is compiled as its own
static-shape graph (``_harness.allow_static_recompiles``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: `python profiling/bench_kernels.py`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from profiling import _harness  # noqa: E402

KERNELS = ("align", "reproject", "film_norm")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sweep = ap.add_mutually_exclusive_group()
    sweep.add_argument("--quick", action="store_true", default=None,
                       help="small sweeps (a couple of minutes on 2 CPU cores; the default on a CPU)")
    sweep.add_argument("--full", dest="quick", action="store_false",
                       help="the whole sweep (the default on CUDA; well over 15 minutes on 2 CPU cores)")
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"],
                    help="default: cuda when available, else cpu")
    ap.add_argument("--peak-gbps", type=float, default=None,
                    help="peak memory bandwidth for the roofline fraction (default by CUDA device name; none on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls per case (default 5, quick 3)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    ap.add_argument("--csv", default=None, help="CSV to append to (default runs/profiling/kernels.csv, untracked)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_kernels: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        print(f"bench_kernels: unknown kernel(s) {unknown}; choose from {KERNELS}", file=sys.stderr)
        return 2
    peak = _harness.assumed_peak_gbps(device, args.peak_gbps)
    quick = args.quick if args.quick is not None else device.type == "cpu"
    budget = 4.0 if quick else 20.0
    modules = [importlib.import_module(f"profiling.bench_{kernel}") for kernel in kernels]
    plan = [(kernel, module.cases(quick, device.type)) for kernel, module in zip(kernels, modules)]
    total = sum(len(cases) for _, cases in plan)
    _harness.allow_static_recompiles(total)
    print(f"bench_kernels: {'quick' if quick else 'full'} sweep on {_harness.device_label(device)}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}: "
          + ", ".join(f"{kernel} {len(cases)} cases" for kernel, cases in plan)
          + f"; at most ~{total * (budget + 2) / 60:.0f} min (each case: warm-up, a memory call and <= {budget:.0f} s "
          f"of timing; compiling adds ~10-60 s per compiled case on a CPU)"
          + ("" if args.quick is not None else f" [{'--full' if quick else '--quick'} for the "
             f"{'whole' if quick else 'small'} sweep]"), flush=True)
    start = time.perf_counter()
    results, done = [], 0
    for kernel, cases in plan:
        results += _harness.run_cases(cases, device, done=done, total=total, warmup=1,
                                      repeat=args.repeat or (3 if quick else 5), budget_s=budget)
        done += len(cases)
    _harness.report(results, device, peak_gbps=peak, csv_path=args.csv, draw=not args.no_plot)
    for module in modules:
        text = module.summary() if hasattr(module, "summary") else ""
        if text:
            print(text)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
