"""Geometry Forcing's effect, measured the way the paper argues it (issue 22 item 3): GF, a control teacher with no
geometry and the alignment forms side by side against the no-alignment baseline - same recipe, same steps, same
data, several seeds - on a CPU.

    python profiling/gf_vs_baseline.py                                    # gf_small: baseline gf control x seeds 0 1 2
    python profiling/gf_vs_baseline.py --steps 5000 --variants baseline gf control released irepa --seeds 0 1 2
    python profiling/gf_vs_baseline.py --recipe gf_tiny --steps 200 --seeds 0 1 --videos 4   # a reduced run

**Variants** (``--variants``, any of these; ``baseline`` always, it is what the others are paired with). For each
seed s, ``engine/train.py --recipe RECIPE --set seed=s ...`` trains ``OUT/<variant>_s<s>`` (its log beside it,
``OUT/<variant>_s<s>.log``); a finished run (its final checkpoint written) is reused, and so is its evaluation
(``OUT/<variant>_s<s>/experiment_eval.json``, while the evaluation settings match):

- ``baseline``: ``gf.enabled=false`` (the recipe's no-alignment twin; for gf_small that is dfot_small);
- ``gf``: the recipe's per-token alignment (DESIGN §4) with the teacher of ``--teacher``;
- ``control``: ``gf`` with ``teacher.kind: random`` (:mod:`engine.teacher.random_features`): fixed random
  features of the oracle's shape, a function of (clip, frame, token) only - a second loss with a fixed target
  and no geometry, so that an effect of ``gf`` beyond it can be attributed to geometry;
- ``released``: ``gf.alignment_form: as_released`` (GF's published form, :mod:`engine.objectives.gf_released`;
  its S x S target plane ``gf.released_size`` = ``data.resolution``, GF's 128-channel ConvProjector);
- ``irepa``: ``gf.alignment_form: irepa`` (:mod:`engine.objectives.gf_irepa`: a 3x3 conv projector and the
  target spatially normalised per frame, as iREPA, arXiv 2512.10794).

``--teacher oracle`` (default) aligns to :mod:`engine.teacher.oracle` (features of the true depth and cameras) on
a teacher grid equal to the DiT's token grid: ``teacher.layers=[0]``, ``teacher.resolution = 14 * (data.resolution
/ model.patch_size)`` (gf_small: 112, an 8 x 8 grid); ``control`` gets the same grid and layers.
``--teacher recipe`` keeps the recipe's teacher (gf_tiny: a tiny random VGGT, which carries no geometry).
Synthetic data is rendered once into ``OUT/data`` when the recipe fixes its scenes (``data.synthetic_seed``,
gf_small: every seed trains on the same 512 scenes, the seed varies the initial weights, the noise and the
order), else per seed into ``OUT/data_s<s>`` (the seed varies the scenes too). Every run keeps all its
checkpoints (``logging.keep_checkpoints=0``), one every ``steps / --curve-points`` steps.

**Measured per run**, with its EMA weights, on ``--videos`` held-out clips (``engine.eval.run_report``'s held-out
split: scenes never trained on), sampled from one clean context frame and the cameras (the recipe's sampler):

- ``fm_train``: the mean logged flow-matching loss over the last 10% of the steps;
- ``fm_heldout``: the flow-matching loss on the held-out clips with fixed noise (4 draws per clip), at every
  checkpoint (``heldout_curve``; the last point is ``fm_heldout``);
- ``psnr`` / ``ssim`` of the generated frames, and their margins over the two trivial predictions of the same
  clips (:mod:`engine.eval.baselines`): ``*_margin_flat`` (a flat frame of the clip's mean colour) and
  ``*_margin_repeat`` (the context frame repeated); positive = better than the trivial prediction;
- ``consistency``: :func:`engine.eval.consistency.warp_consistency_error` of the generated video with the clips'
  true depth and cameras (x1e3, lower is better), beside the ground truth's own (``consistency_gt``, the floor);
- ``probe_depth_t<t>`` / ``probe_world_t<t>``: the held-out R^2 of a closed-form ridge probe
  (:mod:`engine.eval.probe`) from the tokens of block ``--probe-block`` (default: the recipe's ``gf.dit_block``, the
  aligned block, for every variant) to each token's log depth and world point (the mean R^2 of x, y, z), fitted on
  ``--probe-clips`` training clips, scored on the held-out clips, at flow times ``--probe-times`` (frame 0 clean).

**Statistics** (``OUT/table.md``, and ``summary`` in ``OUT/results.json``): per variant and metric the mean and the
sample standard deviation over seeds; per seed the paired difference variant - baseline (same seed: same data,
same initial DiT weights, same held-out clips and noise) with its mean and sample sd; and the **convergence
step**: per seed, the first checkpoint step at which the variant's held-out flow-matching loss is at most the
baseline's final one ("not reached" otherwise; resolved to the checkpoint grid).

**Steps and mode**: ``--steps`` defaults to the recipe's (gf_small: 4,000); every run is eager
(``distributed.compile=false``, whatever the recipe says: the table's first runs were, and compile changes only
rounding). The runs of docs/results.md are ``--steps 5000``: pass it to extend or re-run that table; a run
directory trained for other steps is named, not resumed.

**Cost**: the plan line printed first estimates it (training + evaluation of the runs not yet done) from a model
calibrated on gf_small (~0.44 s per eager step on this idle 2-core AMD EPYC with bf16: the median logged step of
a 5,000-step seed-1 run, 37 minutes of steps; scaled by the DiT's 6 x parameters x tokens per step). At
``--steps 5000``, 3 variants x 3 seeds = 9 runs are ~5.6 hours of training plus ~1 minute of evaluation per run on
the idle machine, every further variant ~1.9 hours (3 seeds); at the default 4,000 steps, 4/5 of that. The
evaluation of one run is ~1,000 clip forwards: the held-out loss at 5 checkpoints x 4 noise draws x 16 clips, 32
sampler steps x 16 clips, and the probe's 3 x (32 + 16).

Writes ``OUT/results.json`` (arguments, every run's numbers and curves, the summary), ``OUT/table.md`` and
``OUT/gf_vs_baseline.png`` (the loss curves, then each metric per variant: seeds as dots, mean ± sd in black).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from geoforge.engine.checkpoint import checkpoint_dirs  # noqa: E402
from geoforge.engine.config import load_recipe  # noqa: E402
from geoforge.engine.data.builder import build_dataset  # noqa: E402
from geoforge.engine.distributed import World  # noqa: E402
from geoforge.engine.eval.baselines import flat_frames, repeated_context  # noqa: E402
from geoforge.engine.eval.consistency import warp_consistency_error  # noqa: E402
from geoforge.engine.eval.image_metrics import psnr, ssim  # noqa: E402
from geoforge.engine.eval.probe import probe_geometry  # noqa: E402
from geoforge.engine.eval.load import load_model  # noqa: E402
from geoforge.engine.eval.run_report import heldout_recipe  # noqa: E402
from geoforge.engine.eval.validate import validate  # noqa: E402
from geoforge.engine.objectives.flow_matching import draw_noise, flow_matching_loss  # noqa: E402
from profiling._experiment import finished, logged, smooth, tail_mean, train_run  # noqa: E402

VARIANTS = {
    "baseline": "no alignment (gf.enabled=false)",
    "gf": "GF, per-token form, the --teacher teacher",
    "control": "GF with teacher.kind random (no geometry)",
    "released": "GF's published form (gf.alignment_form as_released)",
    "irepa": "iREPA-style form (conv projector, spatially normalised target)",
}
DEFAULT_VARIANTS = ("baseline", "gf", "control")
CPU = World(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cpu"))
EVAL_FILE = "experiment_eval.json"
EVAL_VERSION = 1             # bump when evaluate() changes what it measures: cached evaluations are then redone
# the cost model's calibration: gf_small's step on the idle 2-core CPU (bf16), recipes/gf_small.yaml
REFERENCE_RECIPE, REFERENCE_STEP_SECONDS = "gf_small", 0.44
RUN_OVERHEAD_S = 20.0        # a training process: start-up, DeepSpeed, data, checkpoints
FM_DRAWS = 4


def metrics(times: list[float]) -> list[tuple[str, str, str]]:
    """(key, name, better) of every reported number, the probe's per flow time."""
    rows = [("fm_train", "flow-matching loss (train, last 10%)", "lower"),
            ("fm_heldout", "flow-matching loss (held-out, fixed noise)", "lower"),
            ("psnr", "held-out PSNR (dB)", "higher"),
            ("psnr_margin_flat", "PSNR - flat frame (dB)", "higher"),
            ("psnr_margin_repeat", "PSNR - repeated context frame (dB)", "higher"),
            ("ssim", "held-out SSIM", "higher"),
            ("ssim_margin_flat", "SSIM - flat frame", "higher"),
            ("ssim_margin_repeat", "SSIM - repeated context frame", "higher"),
            ("consistency", "3D-consistency error (x1e3)", "lower")]
    for t in times:
        rows.append((f"probe_depth_t{t:g}", f"probe R² log depth, t={t:g}", "higher"))
        rows.append((f"probe_world_t{t:g}", f"probe R² world point (mean of x y z), t={t:g}", "higher"))
    return rows


# ----------------------------------------------------------------------------- runs
def checkpoint_every(steps: int, points: int) -> int:
    return max(1, steps // max(1, points))


def run_overrides(args: argparse.Namespace, recipe, variant: str, seed: int, out: Path) -> list[str]:
    """The ``--set`` list of one run (module docstring)."""
    sets = [f"seed={seed}", f"schedule.steps={args.steps}", "logging.report_videos=0",
            f"logging.checkpoint_every={checkpoint_every(args.steps, args.curve_points)}", "logging.keep_checkpoints=0",
            "distributed.compile=false"]   # eager, as the table's first runs were (compile changes only rounding)
    if recipe.data.kind == "synthetic":
        sets.append(f"data.root={out / ('data' if recipe.data.synthetic_seed is not None else f'data_s{seed}')}")
    sets += args.set
    if variant == "baseline":
        return sets + ["gf.enabled=false"]
    sets.append("gf.enabled=true")
    if args.teacher == "oracle":
        grid = recipe.data.resolution // recipe.model.patch_size
        sets += [f"teacher.kind={'random' if variant == 'control' else 'oracle'}", "teacher.layers=[0]",
                 f"teacher.resolution={14 * grid}"]
    elif variant == "control":
        sets.append("teacher.kind=random")
    if variant == "released":
        sets += ["gf.alignment_form=as_released", f"gf.released_size={recipe.data.resolution}"]
    elif variant == "irepa":
        sets.append("gf.alignment_form=irepa")
    return sets


def stack(items: list[dict], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in keys if k in items[0]}


def heldout_batch(recipe, videos: int) -> dict[str, torch.Tensor]:
    """The first ``videos`` held-out clips (no flip): frames, cameras, and depth where the data has it."""
    held = heldout_recipe(recipe, videos)
    if held is None:
        raise SystemExit(f"{recipe.name}: the data has no held-out split (synthetic data, or a root with test/)")
    dataset = build_dataset(replace(held.data, hflip_prob=0.0), CPU, held.seed)
    return stack([dataset[i] for i in range(videos)], ("frames", "depth", "intrinsics", "extrinsics"))


def training_batch(recipe, clips: int) -> dict[str, torch.Tensor]:
    """The first ``clips`` training clips (no flip), as the probe's fitting set."""
    dataset = build_dataset(replace(recipe.data, hflip_prob=0.0), CPU, recipe.seed)
    return stack([dataset[i] for i in range(min(clips, len(dataset)))], ("frames", "depth", "intrinsics", "extrinsics"))


@torch.no_grad()
def heldout_fm(dit, recipe, batch: dict[str, torch.Tensor], draws: int = FM_DRAWS) -> float:
    x0 = batch["frames"] * 2 - 1
    cond = {"intrinsics": batch["intrinsics"], "extrinsics": batch["extrinsics"]} if dit.cfg.camera != "none" else {}
    losses = []
    for d in range(draws):
        noise = draw_noise(x0.shape, recipe.objective, torch.Generator().manual_seed(1000 + d))
        losses.append(float(flow_matching_loss(dit, x0, recipe.objective, cond=cond, noise=noise)["mse"]))
    return sum(losses) / len(losses)


def logged_steps(run_dir: Path, key: str) -> list[list[float]]:
    """``[[step, value], ...]`` of every logged ``key`` in the run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [[r["step"], r[key]] for r in rows if key in r]


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("_")[-1])


def eval_key(args: argparse.Namespace, run_dir: Path, block: int) -> dict:
    return {"version": EVAL_VERSION, "videos": args.videos, "probe_clips": args.probe_clips, "probe_times": list(args.probe_times),
            "probe_block": block, "checkpoints": [step_of(c) for c in checkpoint_dirs(run_dir)]}


def evaluate(run_dir: Path, args: argparse.Namespace, block: int) -> dict:
    """Every number of one finished run (module docstring); reused from ``EVAL_FILE`` while its settings match."""
    key = eval_key(args, run_dir, block)
    cached = run_dir / EVAL_FILE
    if cached.is_file():
        saved = json.loads(cached.read_text())
        if saved.get("key") == key:
            return saved["metrics"]
    recipe = load_recipe(str(run_dir / "recipe.yaml"))
    weights = "ema" if recipe.ema.enabled else "model"
    batch = heldout_batch(recipe, args.videos)
    curve, dit = [], None
    for ckpt in checkpoint_dirs(run_dir):
        dit = load_model(recipe, ckpt, weights)
        curve.append([step_of(ckpt), heldout_fm(dit, recipe, batch)])
    result = validate(dit, batch, recipe, recipe.schedule.steps)
    k = result.context
    video = result.ground_truth
    gen, gt = result.samples[:, k:], video[:, k:]
    trivial = {"flat": flat_frames(video, k), "repeat": repeated_context(video, k)}
    out = {"fm_train": tail_mean(logged(run_dir, "fm")), "fm_heldout": curve[-1][1],
           "psnr": float(psnr(gen, gt).mean()), "ssim": float(ssim(gen, gt).mean())}
    for name, pred in trivial.items():
        out[f"psnr_{name}"] = float(psnr(pred, gt).mean())
        out[f"ssim_{name}"] = float(ssim(pred, gt).mean())
        out[f"psnr_margin_{name}"] = out["psnr"] - out[f"psnr_{name}"]
        out[f"ssim_margin_{name}"] = out["ssim"] - out[f"ssim_{name}"]
    if "depth" in batch:
        geometry = (batch["depth"], batch["intrinsics"], batch["extrinsics"])
        out["consistency"] = 1e3 * float(warp_consistency_error(result.samples, *geometry).mean())
        out["consistency_gt"] = 1e3 * float(warp_consistency_error(video, *geometry).mean())
        probe = probe_geometry(dit, training_batch(recipe, args.probe_clips), batch, block, args.probe_times,
                               seed=recipe.seed, context=k)
        for t, r in probe.items():
            out[f"probe_depth_t{t}"], out[f"probe_world_t{t}"] = r["depth"], r["world"]
        out["probe"] = probe
    out["heldout_curve"] = curve
    out["fm_curve"] = logged_steps(run_dir, "fm")
    cached.write_text(json.dumps({"key": key, "metrics": out}))
    return out


# ----------------------------------------------------------------------------- statistics
def summary(values: list[float]) -> dict[str, float]:
    """``mean``, sample ``sd`` (nan for one value) and ``n``."""
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else math.nan,
            "n": len(values)}


def paired_differences(results: dict, variant: str, key: str, seeds: list[int]) -> list[float]:
    """Per seed, ``variant - baseline`` of ``key`` (the runs of one seed share data, initial weights and noise)."""
    return [results[f"{variant}_s{s}"][key] - results[f"baseline_s{s}"][key] for s in seeds]


def convergence_step(curve: list[list[float]], target: float) -> int | None:
    """The first step of ``curve`` (``[[step, loss], ...]``) whose loss is at most ``target``; None if none is."""
    for step, loss in curve:
        if loss <= target:
            return int(step)
    return None


def aggregate(results: dict, variants: list[str], seeds: list[int], rows: list[tuple[str, str, str]]) -> dict:
    """``{"metrics": {key: {variant: summary}}, "differences": {key: {variant: {"per_seed", **summary}}},
    "convergence": {"target": {seed: baseline's final held-out loss}, variant: {seed: step or None}}}``; metrics
    a run lacks (no depth: no probe, no consistency) are left out."""
    out: dict = {"metrics": {}, "differences": {}, "convergence": {"target": {}}}
    for key, _, _ in rows + [("consistency_gt", "", "")]:
        if not all(key in results[f"{v}_s{s}"] for v in variants for s in seeds):
            continue
        out["metrics"][key] = {v: summary([results[f"{v}_s{s}"][key] for s in seeds]) for v in variants}
        out["differences"][key] = {}
        for v in variants:
            if v != "baseline":
                d = paired_differences(results, v, key, seeds)
                out["differences"][key][v] = {"per_seed": d, **summary(d)}
    for s in seeds:
        out["convergence"]["target"][s] = results[f"baseline_s{s}"]["fm_heldout"]
    for v in variants:
        out["convergence"][v] = {s: convergence_step(results[f"{v}_s{s}"]["heldout_curve"],
                                                     out["convergence"]["target"][s]) for s in seeds}
    return out


def table(agg: dict, variants: list[str], seeds: list[int], rows: list[tuple[str, str, str]]) -> str:
    rows = [r for r in rows if r[0] in agg["metrics"]]
    others = [v for v in variants if v != "baseline"]
    lines = ["### Mean ± sample standard deviation over seeds", "",
             "| metric | better | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for key, name, better in rows:
        cells = [fmt_summary(agg["metrics"][key][v]) for v in variants]
        lines.append(f"| {name} | {better} | " + " | ".join(cells) + " |")
    if "consistency_gt" in agg["metrics"]:
        floor = agg["metrics"]["consistency_gt"]["baseline"]
        lines.append("| 3D-consistency error of the ground truth (x1e3, the floor) | lower | "
                     + " | ".join([fmt_summary(floor)] + [""] * (len(variants) - 1)) + " |")
    seed_names = ", ".join(f"s{s}" for s in seeds)
    lines += ["", f"### Paired differences, variant - baseline (per seed {seed_names}; mean ± sample sd)", "",
              "The margins over the trivial predictions differ between variants as PSNR / SSIM do (the trivial "
              "predictions are the same clips'), so they are not repeated here.", "",
              "| metric | better | " + " | ".join(f"{v} - baseline" for v in others) + " |",
              "|---|---|" + "---|" * len(others)]
    for key, name, better in rows:
        if "_margin_" in key:
            continue
        cells = []
        for v in others:
            d = agg["differences"][key][v]
            per_seed = ", ".join(f"{x:+.3g}" for x in d["per_seed"])
            cells.append(per_seed if d["n"] == 1 else f"{per_seed} ({fmt_summary(d, signed=True)})")
        lines.append(f"| {name} | {better} | " + " | ".join(cells) + " |")
    conv = agg["convergence"]
    lines += ["", "### Convergence: the first checkpoint step at which the held-out flow-matching loss reaches the "
              "baseline's final one (same seed)", "",
              "| | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds),
              "| baseline's final held-out loss | " + " | ".join(f"{conv['target'][s]:.4g}" for s in seeds) + " |"]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join("not reached" if conv[v][s] is None else str(conv[v][s])
                                             for s in seeds) + " |")
    return "\n".join(lines)


def fmt_summary(s: dict, signed: bool = False) -> str:
    mean = f"{s['mean']:+.4g}" if signed else f"{s['mean']:.4g}"
    return f"{mean} (1 seed)" if s["n"] == 1 else f"{mean} ± {s['sd']:.2g}"


# ----------------------------------------------------------------------------- plot
def plot(results: dict, variants: list[str], seeds: list[int], rows: list[tuple[str, str, str]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if all(r[0] in results[f"{v}_s{s}"] for v in variants for s in seeds)]
    colours = {v: f"C{i}" for i, v in enumerate(variants)}
    panels = 2 + len(rows)
    cols = 4
    fig, axes = plt.subplots(math.ceil(panels / cols), cols, figsize=(3.4 * cols, 2.9 * math.ceil(panels / cols)),
                             squeeze=False)
    axes = axes.ravel()
    for v in variants:
        for s in seeds:
            r = results[f"{v}_s{s}"]
            steps, values = zip(*r["fm_curve"])
            w = max(1, len(values) // 20)
            label = v if s == seeds[0] else None
            axes[0].plot(steps[w - 1:], smooth(list(values), w), color=colours[v], lw=1, alpha=0.7, label=label,
                         marker="o" if len(values) < 3 else None, ms=3)
            steps, losses = zip(*r["heldout_curve"])
            axes[1].plot(steps, losses, "o-", color=colours[v], lw=1, ms=3, alpha=0.7, label=label)
    axes[0].set_title("flow-matching loss (train, logged, smoothed)", fontsize=8)
    axes[0].set_xlabel("step")
    axes[1].set_title("flow-matching loss (held-out, EMA)", fontsize=8)
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=7)
    for ax, (key, name, better) in zip(axes[2:], rows):
        for x, v in enumerate(variants):
            values = [results[f"{v}_s{s}"][key] for s in seeds]
            ax.scatter([x] * len(values), values, color=colours[v], s=14)
            ax.errorbar([x + 0.2], [statistics.mean(values)],
                        yerr=[statistics.stdev(values) if len(values) > 1 else 0], fmt="o", color="k", ms=3)
        ax.set_xticks(range(len(variants)), variants, fontsize=7)
        ax.set_title(f"{name}\n({better} is better)", fontsize=8)
    for ax in axes[panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- cost
def step_flops(recipe) -> float:
    """Training FLOPs of one step of the recipe's DiT: 6 x parameters x tokens per step (forward and backward)."""
    from geoforge.engine.models.arch import build_model

    model = build_model(recipe.model)
    params = sum(p.numel() for p in model.parameters())
    m = model.cfg
    tokens = (recipe.data.frames // getattr(m, "temporal_patch_size", 1)) * (recipe.data.resolution // m.patch_size) ** 2
    return 6.0 * params * tokens * recipe.data.batch_size * recipe.distributed.grad_accum


def estimate(recipe, args: argparse.Namespace, to_train: int, to_evaluate: int) -> tuple[float, float, float]:
    """(seconds per step, training seconds, evaluation seconds) of the planned work on the idle 2-core CPU: gf_small's
    measured step time scaled by :func:`step_flops`, a fixed start-up per run, and the evaluation's clip forwards
    (fp32, no gradient) each at a training step's per-clip cost - at gf_small's size a forward is dominated by
    small-matrix overheads, and fp32 runs it about as fast as bf16 does (measured side by side on this CPU)."""
    per_step = REFERENCE_STEP_SECONDS * step_flops(recipe) / step_flops(load_recipe(REFERENCE_RECIPE))
    per_clip_forward = per_step / recipe.data.batch_size
    forwards = (args.curve_points * FM_DRAWS * args.videos + recipe.logging.sample_steps * args.videos
                + len(args.probe_times) * (args.probe_clips + args.videos))
    return (per_step, to_train * (args.steps * per_step + RUN_OVERHEAD_S),
            to_evaluate * (forwards * per_clip_forward + 10.0))


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="gf_small")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the recipe's)")
    p.add_argument("--teacher", choices=("oracle", "recipe"), default="oracle")
    p.add_argument("--videos", type=int, default=16, help="held-out clips per run")
    p.add_argument("--curve-points", type=int, default=5, help="checkpoints (held-out loss evaluations) per run")
    p.add_argument("--probe-clips", type=int, default=32, help="training clips the probe is fitted on")
    p.add_argument("--probe-times", type=float, nargs="+", default=[0.0, 0.5, 0.8], help="flow times of the probe")
    p.add_argument("--probe-block", type=int, default=None, help="DiT block probed (1-based; default gf.dit_block)")
    p.add_argument("--out", default="runs/gf_vs_baseline")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run")
    args = p.parse_args(argv)
    variants = list(dict.fromkeys(args.variants))
    if "baseline" not in variants:
        p.error("--variants: include baseline (every variant is paired with it)")
    variants = ["baseline"] + [v for v in variants if v != "baseline"]
    recipe = load_recipe(args.recipe, args.set)
    if recipe.model.arch != "dit":
        p.error(f"--recipe: {args.recipe} trains a {recipe.model.arch}; this experiment probes the video DiT (arch: dit)")
    args.steps = args.steps or recipe.schedule.steps
    depth = recipe.model.resolved().depth
    block = args.probe_block or recipe.gf.dit_block
    if not 1 <= block <= depth:
        p.error(f"--probe-block: {block} is not a block of the {depth}-block DiT (1-based)")
    out = Path(args.out).resolve()
    runs = [(v, s, out / f"{v}_s{s}") for s in args.seeds for v in variants]
    to_train = sum(not finished(d, args.steps) for _, _, d in runs)
    to_eval = sum(not (d / EVAL_FILE).is_file() for _, _, d in runs)
    per_step, train_s, eval_s = estimate(recipe, args, to_train, to_eval)
    print(f"plan: {len(runs)} runs ({' '.join(variants)} x seeds {args.seeds}) of {args.steps} steps of {args.recipe}, "
          f"{to_train} to train, {len(runs) - to_train} reused -> {out}; estimated cost on the idle 2-core CPU: "
          f"~{train_s / 60:.0f} min training (~{per_step:.3g} s/step) + ~{eval_s / 60:.0f} min evaluation "
          f"(held-out loss at {args.curve_points} checkpoints, sampling, probe at t={args.probe_times})", flush=True)
    results = {}
    for variant, seed, run_dir in runs:
        start = time.perf_counter()
        train_run(args.recipe, run_dir, run_overrides(args, recipe, variant, seed, out), args.steps)
        results[run_dir.name] = evaluate(run_dir, args, block)
        shown = {k: round(v, 4) for k, v in results[run_dir.name].items() if isinstance(v, float)}
        print(f"{run_dir.name} ({time.perf_counter() - start:.0f} s): {shown}", flush=True)
    rows = metrics(args.probe_times)
    agg = aggregate(results, variants, args.seeds, rows)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "variants": variants, "probe_block": block,
                                                  "runs": results, "summary": agg}, indent=1))
    head = (f"{args.recipe}, {args.steps} steps, teacher {args.teacher}, variants {' '.join(variants)}, seeds "
            f"{args.seeds}; {args.videos} held-out clips per run (EMA weights, 1 context frame); probe: ridge on block "
            f"{block}'s tokens, fitted on {args.probe_clips} training clips, R² on the held-out clips")
    text = head + "\n\n" + table(agg, variants, args.seeds, rows)
    (out / "table.md").write_text(text + "\n")
    plot(results, variants, args.seeds, rows, out / "gf_vs_baseline.png")
    print(text)
    print(f"plot: {out / 'gf_vs_baseline.png'}")
    return 0


__all__ = ["main", "run_overrides", "evaluate", "summary", "paired_differences", "convergence_step", "aggregate",
           "table", "estimate", "VARIANTS"]

if __name__ == "__main__":
    raise SystemExit(main())
