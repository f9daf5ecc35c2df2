"""Training-step benchmark: time, tokens/s and peak memory of a recipe's step, broken into phases.

    python profiling/bench_train.py --recipe gf_tiny                  # one configuration, phase table
    python profiling/bench_train.py --recipe gf_tiny --compare        # baseline vs GF live vs GF cache
    python profiling/bench_train.py --recipe gf_tiny --precisions fp32,auto   # the same step in each precision
    python profiling/bench_train.py --recipe gf_small --configs eager compiled:distributed.compile=true
    python profiling/bench_train.py --recipe gf_re10k --model --gpus 8 --gpu h100   # FLOPs / memory model
    python profiling/bench_train.py --recipe gf_re10k_paper --model   # the same for the U-ViT3D, counted on the module
    python profiling/bench_train.py --curves RUN_GF RUN_BASE          # loss curves of two runs -> PNG
    python profiling/bench_train.py --recipe gf_tiny --dump-batch snap.safetensors  # one batch's GF inputs

**What a step is.** The trainer's own step (``engine.trainer.Trainer.train_step`` on the recipe's
``engine.diffusion_task.DiffusionTask``) in one process: DeepSpeed on a single rank with the recipe's ZeRO
stage and precision, fed by the recipe's data loader, i.e. the work of one rank in ``engine/train.py``
without communication. Phases are the trainer's and the task's own ``timer.mark`` points, each timed with
``time.perf_counter`` (CUDA: synchronised at every phase boundary, which serialises the step slightly):

- ``data``: next micro-batch from the loader, copy to the device, per-sample noise;
- ``teacher``: the frozen teacher's features (live VGGT, or rows read from the teacher cache);
- ``dit_fwd``: DiT forward + flow-matching loss (up to the GF head: a forward pre-hook on it);
- ``align``: the GF head's forward. Its fused kernels compute the projector gradients during this
  forward (``kernels/align``), so ``align`` holds almost all of the alignment's cost;
- ``backward``: ``engine.backward`` (DiT backward; the alignment only hands over its gradients);
- ``optimizer``: ``engine.step`` (AdamW, clipping, zero_grad) and the EMA update.

**--compare** builds the recipe three times with the same initial DiT weights - ``baseline``
(``gf.enabled=false``), ``gf-live`` and ``gf-cache`` (a teacher cache of the measured windows, built into
a temporary directory unless ``--cache DIR`` is given) - and runs their steps interleaved (baseline,
live, cache, baseline, ...) so that load from other processes hits all three alike. Reported: the median
(p50) of each phase over the timed steps, and overhead = p50(step) / p50(baseline step) - 1. Peak memory:
CUDA ``max_memory_allocated`` during a step; CPU: the torch profiler's c10 allocator peak of one extra,
untimed step (``profiling/_harness.cpu_peak_bytes``). Rows are appended to ``runs/profiling/train.csv`` (untracked;
``--csv profiling/results/train.csv`` adds them to the committed record).

**--precisions fp32,auto** builds the recipe once per ``distributed.precision`` value (same initial weights,
``engine.precision`` installed around each config's steps) and interleaves their steps the same way; the
speed-up of each over the first is the median over rounds of the first's step time / its own. **--configs**
does the same for any recipe overrides (``LABEL:KEY=VALUE,KEY=VALUE``; ``--precisions P1,P2`` is
``--configs P1:distributed.precision=P1 P2:distributed.precision=P2``); ``torch.compile``
(``distributed.compile``) compiles in the untimed warm-up steps.

**--model** is analytic (no run; ``profiling/train_model.py``): FLOPs per optimizer step and GPU, the step time at an assumed model
FLOP utilisation, and the memory per GPU, with every assumption printed (see :func:`flops_model`); then a
table of per-GPU activation memory, all-to-all traffic and step time with sequence parallelism (``--sp``
sizes, :func:`sp_model`; for VideoGPA recipes with a diffusers policy, of the policy's transformer). For
``model.arch: uvit3d`` (DFoT's U-ViT3D) the backbone's FLOPs and activations are not formulas but counted on
the real module, built on the meta device at the recipe's full size (:func:`uvit3d_counts`; nothing is
allocated, ~5-15 s on one CPU core), and its SP table splits only the transformer levels.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from geoforge.engine.config import Recipe, load_recipe  # noqa: E402
from geoforge.engine.precision import resolve_precision, use_precision  # noqa: E402
from profiling.train_model import GPUS, print_model  # noqa: E402

PHASES = ("data", "teacher", "dit_fwd", "align", "backward", "optimizer")
from profiling._harness import RESULTS  # noqa: E402   (untracked runs/profiling; see _harness)

# ----------------------------------------------------------------------------- measured steps
class PhaseTimer:
    """``mark(phase)`` adds the time since the previous mark to ``phase`` (the trainer's timer protocol)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, float] = {}
        self._last = 0.0

    def start(self) -> None:
        _sync(self.device)
        self.phases = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now


@dataclass
class Config:
    """One benchmarked configuration: the trainer of its recipe and the timer wired into it."""

    name: str
    recipe: Recipe
    trainer: Any
    timer: PhaseTimer
    device: torch.device
    precision: Any = None   # engine.precision.Precision installed around this config's steps
    times: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in (*PHASES, "step")})
    peak_bytes: int | None = None


def _device(recipe: Recipe) -> torch.device:
    if recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _world(device: torch.device):
    from geoforge.engine.distributed import init_world

    return init_world(device.type)   # a single-rank process group (DeepSpeed wants one)


def build_config(name: str, recipe: Recipe, device: torch.device) -> Config:
    """The trainer (same initial weights as engine/train.py) of ``recipe`` with a phase timer."""
    from geoforge.engine.diffusion_task import DiffusionTask
    from geoforge.engine.trainer import Trainer

    world = _world(device)
    precision = resolve_precision(recipe.distributed.precision, device)
    use_precision(precision)   # the task's teacher and the trainer read it (engine/train.py installs it likewise)
    timer = PhaseTimer(device)
    task = DiffusionTask(recipe, world)
    if task.module.gf is not None:   # end of the DiT forward = start of the GF head's forward
        task.module.gf.register_forward_pre_hook(lambda module, args: timer.mark("dit_fwd"))
    run_dir = Path(tempfile.mkdtemp(prefix=f"geoforge-bench-{name}-"))
    return Config(name, recipe, Trainer(recipe, task, run_dir, world, timer=timer), timer, device, precision)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step(cfg: Config, record: bool = True) -> dict[str, float]:
    """One ``Trainer.train_step`` of ``cfg``; returns (and records) seconds per phase."""
    use_precision(cfg.precision)
    cfg.timer.start()
    began = time.perf_counter()
    cfg.trainer.train_step()
    cfg.timer.mark("optimizer")   # the EMA update after the last engine.step
    total = time.perf_counter() - began
    raw = cfg.timer.phases
    gf = "dit_fwd" in raw
    phases = {"data": raw.get("data", 0.0), "teacher": raw.get("teacher", 0.0),
              "dit_fwd": raw["dit_fwd"] if gf else raw.get("forward", 0.0),
              "align": raw.get("forward", 0.0) if gf else 0.0,
              "backward": raw.get("backward", 0.0), "optimizer": raw.get("optimizer", 0.0), "step": total}
    if record:
        for k, v in phases.items():
            cfg.times[k].append(v)
    return phases


def measure_peak(cfg: Config) -> None:
    """Peak memory of one untimed step (CUDA allocator peak, or the CPU allocator peak via the profiler)."""
    if cfg.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(cfg.device)
        base = torch.cuda.memory_allocated(cfg.device)
        run_step(cfg, record=False)
        cfg.peak_bytes = torch.cuda.max_memory_allocated(cfg.device) - base
    else:
        from profiling._harness import cpu_peak_bytes

        cfg.peak_bytes = cpu_peak_bytes(lambda: run_step(cfg, record=False))


def tokens_per_step(recipe: Recipe) -> int:
    m, d = recipe.model.resolved(), recipe.data
    return d.batch_size * (d.frames // m.temporal_patch_size) * (d.resolution // m.patch_size) ** 2


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratio(cfg: Config, base: Config) -> float:
    """Median over rounds of cfg's step time / the baseline's in the same round (robust to load drift)."""
    return statistics.median(a / b for a, b in zip(cfg.times["step"], base.times["step"]))


def data_wait(cfg: Config) -> float:
    """Median over steps of the ``data`` phase's share of the step: the time the step waits for its batch."""
    return statistics.median(d / s for d, s in zip(cfg.times["data"], cfg.times["step"]))


def report(configs: list[Config], csv_path: Path | None = None) -> str:
    from profiling._harness import MB, device_label, git_commit

    base = configs[0]
    head = ["config", *[f"{p} ms" for p in PHASES], "step ms", "data wait", "tokens/s", "peak MB", "overhead"]
    rows = []
    for c in configs:
        step = _p50(c.times["step"])
        over = "" if c is base else f"{100 * (paired_ratio(c, base) - 1):+.1f}%"
        rows.append([c.name, *[f"{1e3 * _p50(c.times[p]):.1f}" for p in PHASES], f"{1e3 * step:.1f}",
                     f"{100 * data_wait(c):.1f}%",
                     f"{tokens_per_step(c.recipe) / step:.0f}",
                     "-" if c.peak_bytes is None else f"{c.peak_bytes / MB:.1f}", over])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))
             for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n = len(base.times["step"])
    text = (f"device: {device_label(base.device)}   commit: {git_commit()}   torch {torch.__version__}\n"
            f"recipe {base.recipe.name}: micro-batch {base.recipe.data.batch_size}, {tokens_per_step(base.recipe)} DiT "
            f"tokens/step; p50 over {n} timed steps per config (interleaved); overhead = median over rounds of "
            f"step / baseline step of the same round, minus 1; data wait = median of data / step, target < 5% "
            f"(data.num_workers={base.recipe.data.num_workers})\n" + "\n".join(lines))
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        new = not csv_path.exists() or csv_path.stat().st_size == 0
        with csv_path.open("a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(("recipe", "config", "phase", "unit", "p50", "p20", "p80", "steps", "device", "commit"))
            for c in configs:
                for p in (*PHASES, "step"):
                    v = sorted(c.times[p])
                    q = (lambda f: 1e3 * v[min(len(v) - 1, int(f * (len(v) - 1) + 0.5))]) if v else (lambda f: float("nan"))
                    w.writerow((c.recipe.name, c.name, p, "ms", f"{q(.5):.4g}", f"{q(.2):.4g}", f"{q(.8):.4g}", len(v),
                                device_label(c.device), git_commit()))
                wait = f"{100 * data_wait(c):.4g}"
                w.writerow((c.recipe.name, c.name, "data_wait", "%", wait, wait, wait, len(c.times["step"]),
                            device_label(c.device), git_commit()))
                if c.peak_bytes is not None:
                    mb = f"{c.peak_bytes / MB:.4g}"
                    w.writerow((c.recipe.name, c.name, "peak_memory", "MB", mb, mb, mb, 1, device_label(c.device),
                                git_commit()))
    return text


def _cache_for(recipe: Recipe, steps: int, directory: Path) -> Path:
    """A teacher cache holding every window the first ``steps`` micro-batches of ``recipe`` draw."""
    from geoforge.engine.data.builder import build_dataset
    from geoforge.engine.teacher.cache import build_cache
    from geoforge.engine.distributed import World

    n = len(build_dataset(recipe.data, World(0, 0, 1, 1, torch.device("cpu")), recipe.seed))
    epochs = math.ceil(steps / max(1, n // recipe.data.batch_size))
    build_cache(recipe, directory, epochs=epochs, device=str(_device(recipe)), overwrite=True,
                log=lambda s: print(s, flush=True))
    return directory


def compare(recipe_arg: str, overrides: list[str], warmup: int, steps: int, cache: str | None,
            csv_path: Path | None) -> list[Config]:
    """Baseline, GF with the live teacher and GF with the teacher cache, steps interleaved (module docstring)."""
    recipe = load_recipe(recipe_arg, overrides)
    device = _device(recipe)
    names = [("baseline", ["gf.enabled=false", "teacher.cache=null", "gf.dino=null", "teacher.dino=null"])]
    if recipe.gf.enabled:
        names.append(("gf-live", ["teacher.cache=null"]))
    tmp = None
    if recipe.gf.enabled:
        if cache is None:
            tmp = Path(tempfile.mkdtemp(prefix="geoforge-bench-cache-"))
            live = load_recipe(recipe_arg, [*overrides, "teacher.cache=null"])
            cache = str(_cache_for(live, warmup + steps + 2, tmp))
        names.append(("gf-cache", [f"teacher.cache={cache}"]))
    try:
        configs = [build_config(n, load_recipe(recipe_arg, [*overrides, *extra]), device) for n, extra in names]
        for _ in range(warmup):
            for c in configs:
                run_step(c, record=False)
        for i in range(steps):
            for c in configs:
                phases = run_step(c)
                print(f"  step {i + 1}/{steps} {c.name:<9} {1e3 * phases['step']:8.1f} ms", flush=True)
        for c in configs:
            measure_peak(c)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report(configs, csv_path))
    if len(configs) > 1:
        ratios = {c.name: paired_ratio(c, configs[0]) for c in configs[1:]}
        targets = {"gf-live": 1.35, "gf-cache": 1.10}
        print("GF overhead over the baseline step: " + ", ".join(
            f"{k} {100 * (v - 1):+.1f}% (target <= {100 * (targets[k] - 1):.0f}%)" for k, v in ratios.items()))
    return configs


def parse_configs(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``LABEL:KEY=VALUE[,KEY=VALUE...]`` -> (label, overrides); a bare ``LABEL`` has no overrides."""
    out = []
    for spec in specs:
        label, _, sets = spec.partition(":")
        if not label:
            raise SystemExit(f"--configs {spec!r}: give LABEL or LABEL:KEY=VALUE[,KEY=VALUE]")
        out.append((label, [kv for kv in re.split(r",(?=[\w.]+=)", sets) if kv]))   # a value may hold commas
    return out


def compare_configs(recipe_arg: str, overrides: list[str], configs_spec: list[tuple[str, list[str]]], warmup: int,
                    steps: int, csv_path: Path | None) -> list[Config]:
    """The recipe's step under each (label, overrides) (same initial weights), steps interleaved."""
    device = _device(load_recipe(recipe_arg, overrides))
    configs = []
    for label, sets in configs_spec:
        configs.append(build_config(label, load_recipe(recipe_arg, [*overrides, *sets]), device))
    for _ in range(warmup):   # untimed: also where torch.compile (distributed.compile) compiles
        for c in configs:
            run_step(c, record=False)
    for i in range(steps):
        for c in configs:
            phases = run_step(c)
            print(f"  step {i + 1}/{steps} {c.name:<8} {1e3 * phases['step']:8.1f} ms", flush=True)
    for c in configs:
        measure_peak(c)
    print(report(configs, csv_path))
    for c in configs:
        print(f"{c.name}: {c.precision.describe()}{' | torch.compile: blocks' if c.recipe.distributed.compile else ''}")
    for c in configs[1:]:
        print(f"speed-up of {c.name} over {configs[0].name}: {1 / paired_ratio(c, configs[0]):.2f}x "
              f"(median over {steps} rounds of the paired step-time ratio)")
    return configs


# ----------------------------------------------------------------------------- curves and dumps
def _metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run directory (no metrics.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(gf_run: Path, base_run: Path, out: Path | None = None, window: int = 20) -> Path:
    """Flow-matching loss of both runs and the GF run's alignment losses against the step -> PNG (thin: the
    logged values, bold: their ``window``-row moving average). Prints the last-50-step means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gf_rows, base_rows = _metrics(gf_run), _metrics(base_run)
    fig, (ax_fm, ax_al) = plt.subplots(1, 2, figsize=(12, 4.5))

    def draw(ax, rows, key, label, colour):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if not pts:
            return
        xs, ys = zip(*pts)
        ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(xs, _smooth(list(ys), window), color=colour, linewidth=2, label=label)

    draw(ax_fm, base_rows, "fm", f"baseline ({Path(base_run).name})", "tab:blue")
    draw(ax_fm, gf_rows, "fm", f"GF ({Path(gf_run).name})", "tab:orange")
    for key, colour in (("gf_angular", "tab:green"), ("gf_scale", "tab:red"), ("dino_angular", "tab:purple"),
                        ("dino_scale", "tab:brown")):
        draw(ax_al, gf_rows, key, key, colour)
    ax_fm.set_title(f"flow-matching loss (bold: {window}-point moving average)")
    ax_al.set_title("GF alignment losses (unweighted)")
    for ax in (ax_fm, ax_al):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_al.set_yscale("log")
    fig.tight_layout()
    out = Path(out or Path(gf_run) / "gf_vs_baseline.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)

    def mean(rows: list[dict], key: str, lo: int, hi: int) -> float:
        vals = [r[key] for r in rows if key in r and lo <= r["step"] <= hi]
        return sum(vals) / len(vals) if vals else float("nan")

    last = max(r["step"] for r in gf_rows)
    print(f"curves: {out}")
    for lo in range(1, last + 1, 50):
        hi = min(last, lo + 49)
        print(f"  steps {lo:4d}-{hi:4d} mean: fm GF {mean(gf_rows, 'fm', lo, hi):.4f} baseline "
              f"{mean(base_rows, 'fm', lo, hi):.4f} | gf_angular {mean(gf_rows, 'gf_angular', lo, hi):.4f} "
              f"gf_scale {mean(gf_rows, 'gf_scale', lo, hi):.4f}")
    return out


def dump_batch(recipe: Recipe, path: Path) -> Path:
    """One batch through the recipe's module: save what recomputes its GF losses (``alignment_snapshot``)."""
    from safetensors.torch import save_file

    from geoforge.engine.diffusion_task import DiffusionTask
    from geoforge.engine.objectives.geometry_forcing import alignment_snapshot

    if not recipe.gf.enabled:
        raise ValueError("--dump-batch needs a recipe with gf.enabled: true")
    device = _device(recipe)
    task = DiffusionTask(recipe, _world(device))
    module = task.module.to(device)
    batch, noise = task.prepare(next(task.micro_batches(0)), 0, PhaseTimer(device)).args
    out = module.flow_matching(batch, noise)
    parts = module.gf(out["features"], batch)
    save_file(alignment_snapshot(module.gf, out["features"], batch, parts), str(path),
              metadata={"recipe": recipe.name, "dit_block": str(recipe.gf.dit_block),
                        "teacher_layers": json.dumps(recipe.teacher.layers),
                        "temporal_patch_size": str(recipe.model.temporal_patch_size),
                        "angular_weight,scale_weight": json.dumps(recipe.gf.weights())})
    print(f"dump: {path} (GF term {float(parts['loss'].detach()):.6g}, "
          + ", ".join(f"{k} {float(v):.6g}" for k, v in parts.items() if k != "loss") + ")")
    return path


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="gf_tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--compare", action="store_true", help="baseline vs GF live vs GF cache, interleaved")
    p.add_argument("--cache", default=None, help="teacher cache for --compare (default: built in a temp dir)")
    p.add_argument("--precisions", default=None, metavar="P1,P2",
                   help="compare the step in these distributed.precision values (e.g. fp32,auto), interleaved")
    p.add_argument("--configs", nargs="+", default=None, metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
                   help="compare the step under these overrides (e.g. eager compiled:distributed.compile=true), "
                        "interleaved")
    p.add_argument("--steps", type=int, default=16, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    p.add_argument("--csv", default=str(RESULTS / "train.csv"), help="CSV to append to ('' to skip)")
    p.add_argument("--model", action="store_true", help="analytic FLOPs / time / memory model, no run")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation for --model")
    p.add_argument("--sp", default="1,2,4,8", help="--model: sequence-parallel sizes of the SP table")
    p.add_argument("--curves", nargs=2, metavar=("GF_RUN", "BASE_RUN"), help="plot two runs' loss curves")
    p.add_argument("--dump-batch", default=None, metavar="PATH", help="save one batch's GF inputs and losses")
    args = p.parse_args(argv)
    if args.curves:
        plot_curves(Path(args.curves[0]), Path(args.curves[1]))
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if args.model:
        print_model(args.recipe, args.overrides, args.gpus, args.gpu, args.mfu, [int(v) for v in args.sp.split(",")])
        return 0
    recipe = load_recipe(args.recipe, args.overrides)
    if args.dump_batch:
        dump_batch(recipe, Path(args.dump_batch))
        return 0
    csv_path = Path(args.csv) if args.csv else None
    started = time.perf_counter()
    if args.precisions or args.configs:
        specs = ([(p, [f"distributed.precision={p}"]) for p in args.precisions.split(",")] if args.precisions
                 else parse_configs(args.configs))
        compare_configs(args.recipe, args.overrides, specs, args.warmup, args.steps, csv_path)
    elif args.compare:
        compare(args.recipe, args.overrides, args.warmup, args.steps, args.cache, csv_path)
    else:
        cfg = build_config(recipe.name, recipe, _device(recipe))
        for _ in range(args.warmup):
            run_step(cfg, record=False)
        for _ in range(args.steps):
            run_step(cfg)
        measure_peak(cfg)
        print(report([cfg], csv_path))
    print(f"bench_train: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    from geoforge.engine.distributed import shutdown

    code = 0
    try:
        with contextlib.suppress(BrokenPipeError):
            code = main()
    finally:
        shutdown()   # the process group build_config started: no gloo thread outlives the interpreter
    raise SystemExit(code)
