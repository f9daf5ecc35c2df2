"""Shared benchmark harness of ``profiling/bench_*.py``: time, peak memory, bandwidth, table, CSV, plot.

A benchmark module exposes ``cases(quick, device) -> list[Case]``; ``run_cases`` measures them and
``report`` prints the table (with each provider's ratios against the reference provider measured in
the same run), appends CSV rows and draws the plots.

What is measured, per case:

- **time**: ``warmup`` untimed calls, one memory-measuring call (not timed), then ``repeat`` timed
  calls; p50 / p20 / p80 in ms. ``setup`` (if any) runs before every call, untimed (e.g. dropping
  ``.grad``). CPU: ``time.perf_counter`` around the call. CUDA: CUDA events, with
  ``torch.cuda.synchronize()`` before and after.
- **peak memory**: the most memory the call held above what was allocated before it (its
  intermediates, outputs and gradients; the inputs and parameters are not counted). CUDA:
  ``torch.cuda.max_memory_allocated() - memory_allocated()`` before the call, after
  ``reset_peak_memory_stats``. CPU: the torch profiler's memory accounting (``profile_memory=True``):
  every allocation and free through c10's CPU allocator during the call is an event of +/- bytes; the
  peak of their running sum in time order is the peak. Memory that libraries allocate outside c10
  (oneDNN scratch pads, stack buffers of compiled kernels) is not seen, on either side of a comparison.
- **bandwidth**: ``bytes_moved / time`` in GB/s (1e9 bytes), with the case's ``bytes_formula``;
  ``flops`` (optional) gives GFLOP/s the same way. On CUDA the fraction of the memory-bandwidth roofline
  ``peak_gbps`` is printed.

CSV rows (appended to ``profiling/results/kernels.csv``, header written once): kernel, provider, mode,
metric, unit, x, p50, p20, p80, device, commit; metrics ``time`` (ms), ``peak_memory`` (MB = 2**20
bytes; p20 = p50 = p80), ``bandwidth`` (GB/s; p20 from the p80 time and p80 from the p20 time).
"""
from __future__ import annotations

import contextlib
import csv
import gc
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
# Where benchmarks write by default: an untracked folder (runs/ is ignored), so measuring leaves the checkout
# clean. profiling/results/ holds the committed record; pass --csv profiling/results/<name>.csv to add to it.
RESULTS = ROOT / "runs" / "profiling"
CSV_COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "x", "p50", "p20", "p80", "device", "commit")
MB = float(1 << 20)

# Peak memory bandwidth (GB/s) assumed for the roofline fraction, by device name (override with --peak-gbps).
PEAK_GBPS = (("H200", 4800.0), ("H100", 3350.0), ("A100", 2039.0), ("L40S", 864.0), ("A10", 600.0),
             ("4090", 1008.0))


@dataclass
class Case:
    """One measurement: ``fn()`` (zero arguments) of ``provider`` for ``kernel`` in ``mode`` at size ``x``.

    ``bytes_moved`` / ``bytes_formula``: the algorithmic minimum of bytes read and written, for the
    effective bandwidth. Optional: ``setup`` runs untimed before every call; ``flops`` /
    ``flop_formula`` give GFLOP/s; ``warmup`` / ``repeat`` override the run's defaults; ``reference``
    names the provider the ratios compare against (same kernel, mode and x); ``peak_mem`` replaces
    the memory measurement (a callable taking the case, returning bytes, or None to skip);
    ``measure_memory=False`` skips it; ``note`` is printed under the table.
    """

    kernel: str
    provider: str
    mode: str
    x_name: str
    x: int
    fn: Callable[[], Any]
    bytes_moved: int
    bytes_formula: str
    setup: Callable[[], Any] | None = None
    flops: float | None = None
    flop_formula: str = ""
    warmup: int | None = None
    repeat: int | None = None
    reference: str = "eager"
    peak_mem: Callable[["Case"], int | None] | None = None
    measure_memory: bool = True
    note: str = ""


@dataclass
class Result:
    case: Case
    times_ms: list[float]
    peak_bytes: int | None
    device: str
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def p50(self) -> float:
        return _quantile(self.times_ms, 0.5)

    @property
    def p20(self) -> float:
        return _quantile(self.times_ms, 0.2)

    @property
    def p80(self) -> float:
        return _quantile(self.times_ms, 0.8)

    def gbps(self, t_ms: float | None = None) -> float:
        t = self.p50 if t_ms is None else t_ms
        return self.case.bytes_moved / (t * 1e-3) / 1e9 if t and t > 0 else float("nan")


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(case: Case, device: torch.device) -> float:
    """Milliseconds of one call (setup not timed)."""
    if case.setup is not None:
        case.setup()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = case.fn()
        end.record()
        torch.cuda.synchronize(device)
        del out
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    out = case.fn()
    t1 = time.perf_counter()
    del out
    return (t1 - t0) * 1e3


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 (Kineto prints a line at every profiler start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes held above the starting level during ``fn()`` on the c10 CPU allocator (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        out = fn()
        del out
    finally:
        with _quiet_stderr():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    del out
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _peak_once(case: Case, device: torch.device) -> int | None:
    if not case.measure_memory:
        return None
    if case.setup is not None:
        case.setup()
    gc.collect()
    if case.peak_mem is not None:
        return case.peak_mem(case)
    if device.type == "cuda":
        return cuda_peak_bytes(case.fn, device)
    if device.type == "cpu":
        return cpu_peak_bytes(case.fn)
    return None


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{cpu} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def assumed_peak_gbps(device: torch.device, override: float | None = None) -> float | None:
    """Memory bandwidth peak (GB/s) for the roofline fraction: ``override``, else by CUDA device name."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, gbps in PEAK_GBPS:
        if key in name:
            return gbps
    return 3350.0


def run_case(case: Case, device: torch.device, *, warmup: int = 1, repeat: int = 5, budget_s: float = 10.0,
             verbose: bool = True, progress: str = "") -> Result:
    """Measure one case: warmup, one memory call, then timed calls (``repeat`` at most, fewer when one call is
    slow: as many as fit in ``budget_s`` but at least 3)."""
    label = device_label(device)
    wall = time.perf_counter()
    try:
        first = None
        for _ in range(case.warmup if case.warmup is not None else warmup):
            t = _time_once(case, device)
            first = t if first is None else min(first, t)
        peak = _peak_once(case, device)
        n = case.repeat if case.repeat is not None else repeat
        if case.repeat is None and first is not None and first > 0:
            n = max(3, min(n, int(budget_s * 1e3 / first)))
        times = [_time_once(case, device) for _ in range(n)]
        result = Result(case, times, peak, label)
    except Exception as err:  # one failing provider must not lose the others' results
        result = Result(case, [], None, label, error=f"{type(err).__name__}: {err}")
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if verbose:
        msg = (f"{result.p50:10.3f} ms" if result.error is None else f"FAILED {result.error}")
        mem = "" if result.peak_bytes is None else f"  peak {result.peak_bytes / MB:9.1f} MB"
        print(f"  {progress}{case.kernel:<11} {case.mode:<8} {case.x_name}={case.x:<8} {case.provider:<8} {msg}{mem}"
              f"  ({time.perf_counter() - wall:.1f} s with warm-up)", flush=True)
    return result


def run_cases(cases: Iterable[Case], device: torch.device, done: int = 0, total: int | None = None,
              **kw) -> list[Result]:
    """:func:`run_case` of each case, its line prefixed with the progress ``[i/total]`` (``done`` before these)."""
    cases = list(cases)
    total = total or done + len(cases)
    return [run_case(c, device, progress=f"[{done + i}/{total}] ", **kw) for i, c in enumerate(cases, 1)]


def allow_static_recompiles(cases: int) -> None:
    """Each benchmarked size compiles its own static-shape graph (what a run with one shape gets): raise dynamo's
    per-function recompile limit above the number of cases, so no size silently falls back to eager (with a
    ``recompile_limit`` warning) partway through a sweep."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):   # the name changed across torch releases
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), cases + 8))


# ----------------------------------------------------------------------------- reporting
def _ratios(results: Sequence[Result]) -> dict[int, tuple[float | None, float | None]]:
    """id(result) -> (speed-up, memory ratio) against the case's reference provider in the same run."""
    refs = {(r.case.kernel, r.case.mode, r.case.x_name, r.case.x, r.case.provider): r
            for r in results if r.error is None}
    out = {}
    for r in results:
        ref = refs.get((r.case.kernel, r.case.mode, r.case.x_name, r.case.x, r.case.reference))
        if r.error is not None or ref is None:
            out[id(r)] = (None, None)
            continue
        speed = ref.p50 / r.p50 if r.p50 > 0 else None
        mem = (ref.peak_bytes / r.peak_bytes if ref.peak_bytes is not None and r.peak_bytes else None)
        out[id(r)] = (speed, mem)
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _fmt_ratio(v: float | None, ref_tag: str, floor: float | None = None) -> str:
    """``v`` as "1.23x"; with ``floor`` (a ratio bound) shown as ">{floor}x" instead when v exceeds it."""
    if v is None or math.isnan(v):
        return "-"
    if floor is not None and v > floor:
        return f">{floor:.0f}x" + ref_tag
    return (f"{v:.2f}x" if v < 100 else f"{v:.0f}x") + ref_tag


def format_table(results: Sequence[Result], peak_gbps: float | None = None) -> str:
    """The results as a plain-text table; ratios are reference / provider (>1: faster, less memory)."""
    ratios = _ratios(results)
    head = ["kernel", "mode", "x", "provider", "p50 ms", "p20 ms", "p80 ms", "peak MB", "GB/s", "GFLOP/s"]
    if peak_gbps:
        head.append("roofline")
    head += ["speedup", "mem saving"]
    rows = []
    for r in results:
        c = r.case
        if r.error is not None:
            rows.append([c.kernel, c.mode, f"{c.x_name}={c.x}", c.provider, "FAILED", r.error[:60]]
                        + [""] * (len(head) - 6))
            continue
        speed, mem = ratios[id(r)]
        gflops = c.flops / (r.p50 * 1e-3) / 1e9 if c.flops else None
        row = [c.kernel, c.mode, f"{c.x_name}={c.x}", c.provider, _fmt(r.p50, ".3f"), _fmt(r.p20, ".3f"),
               _fmt(r.p80, ".3f"), _fmt(None if r.peak_bytes is None else r.peak_bytes / MB, ".1f"),
               _fmt(r.gbps(), ".2f"), _fmt(gflops, ".1f")]
        if peak_gbps:
            row.append(_fmt(100 * r.gbps() / peak_gbps, ".1f") + "%")
        ref_tag = "" if c.provider == c.reference else f" vs {c.reference}"
        # a provider peak under 1 MB makes the ratio meaningless: print the bound ref peak / 1 MB instead
        ref_peak = None if mem is None else mem * r.peak_bytes
        floor = ref_peak / MB if ref_peak is not None and r.peak_bytes < MB else None
        row += [_fmt_ratio(speed, ref_tag), _fmt_ratio(mem, ref_tag, floor)]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).rjust(w) if i >= 4 else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))
             for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def formulas(results: Sequence[Result]) -> str:
    seen: dict[str, str] = {}
    notes: list[str] = []
    for r in results:
        c = r.case
        seen.setdefault(f"{c.kernel} {c.mode}", f"bytes = {c.bytes_formula}"
                        + (f"; flops = {c.flop_formula}" if c.flop_formula else ""))
        if c.note and c.note not in notes:
            notes.append(c.note)
    return "\n".join([f"  {k}: {v}" for k, v in seen.items()] + [f"  note: {n}" for n in notes])


def append_csv(results: Sequence[Result], path: Path | None = None, commit: str | None = None) -> Path:
    path = Path(path or RESULTS / "kernels.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    commit = commit or git_commit()
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(CSV_COLUMNS)
        for r in results:
            if r.error is not None:
                continue
            c = r.case
            base = (c.kernel, c.provider, c.mode)
            w.writerow((*base, "time", "ms", c.x, f"{r.p50:.6g}", f"{r.p20:.6g}", f"{r.p80:.6g}", r.device, commit))
            if r.peak_bytes is not None:
                mb = f"{r.peak_bytes / MB:.6g}"
                w.writerow((*base, "peak_memory", "MB", c.x, mb, mb, mb, r.device, commit))
            w.writerow((*base, "bandwidth", "GB/s", c.x, f"{r.gbps(r.p50):.6g}", f"{r.gbps(r.p80):.6g}",
                        f"{r.gbps(r.p20):.6g}", r.device, commit))
    return path


def plot(results: Sequence[Result], out_dir: Path | None = None) -> list[Path]:
    """One PNG per kernel: time (left) and peak memory (right) against x, a line per provider and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kernel in dict.fromkeys(r.case.kernel for r in results):
        rs = [r for r in results if r.case.kernel == kernel and r.error is None]
        if not rs:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
        for key in dict.fromkeys((r.case.provider, r.case.mode) for r in rs):
            sel = sorted((r for r in rs if (r.case.provider, r.case.mode) == key), key=lambda r: r.case.x)
            xs = [r.case.x for r in sel]
            style = "-o" if key[1] == "fwd" else "--s"
            ax_t.plot(xs, [r.p50 for r in sel], style, label=f"{key[0]} {key[1]}")
            mem = [(r.case.x, r.peak_bytes / MB) for r in sel if r.peak_bytes is not None]
            if mem:
                ax_m.plot(*zip(*mem), style, label=f"{key[0]} {key[1]}")
        x_name = rs[0].case.x_name
        for ax, ylabel in ((ax_t, "time p50 (ms)"), (ax_m, "peak memory (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(x_name)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{kernel} on {rs[0].device}")
        fig.tight_layout()
        path = out_dir / f"{kernel}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def report(results: Sequence[Result], device: torch.device, *, peak_gbps: float | None = None,
           csv_path: Path | None = None, draw: bool = True) -> str:
    """Print the table, the formulas and the roofline assumption; append CSV; draw plots. Returns the table."""
    table = format_table(results, peak_gbps)
    print()
    print(f"device: {device_label(device)}   commit: {git_commit()}   torch {torch.__version__}")
    if peak_gbps:
        print(f"roofline: achieved GB/s over an assumed peak memory bandwidth of {peak_gbps:.0f} GB/s "
              f"(--peak-gbps to change)")
    print(table)
    print("speedup = reference p50 / provider p50; mem saving = reference peak / provider peak "
          "(same kernel, mode and x, this run)")
    print("formulas:")
    print(formulas(results))
    path = append_csv(results, csv_path)
    print(f"csv: appended to {path}")
    if draw:
        try:
            for p in plot(results):
                print(f"plot: {p}")
        except Exception as err:  # matplotlib missing or broken: the table and CSV are the results
            print(f"plot: skipped ({type(err).__name__}: {err})")
    return table
