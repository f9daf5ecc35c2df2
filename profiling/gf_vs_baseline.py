"""Geometry Forcing against its no-alignment twin on CPU: same recipe, same steps, several seeds.

    python profiling/gf_vs_baseline.py                                  # gf_tiny, oracle teacher, seeds 0 1 2
    python profiling/gf_vs_baseline.py --teacher recipe --seeds 0 1 2 3 --steps 600 --out runs/gf_vs_baseline
    python profiling/gf_vs_baseline.py --steps 100 --seeds 0 1 --videos 4   # a reduced run

For each seed s, ``engine/train.py --recipe RECIPE --set seed=s`` trains the GF variant and the baseline
(``gf.enabled=false``) into ``OUT/{gf,baseline}_s<s>`` (a finished run is reused; each seed renders its own
synthetic clips into ``OUT/data_s<s>``, so the seed varies the data, the initial weights and the noise).
``--teacher oracle`` (default) aligns to :mod:`engine.teacher.oracle` (features of the true depth and
cameras, on a teacher grid equal to the DiT's token grid): the mechanism with a teacher that carries
geometry; ``--teacher recipe`` keeps the recipe's (gf_tiny: a tiny random VGGT, which carries none).

Per run, with its EMA weights, on ``--videos`` held-out clips (seed s + 1, ``engine.eval.run_report``'s
held-out split) sampled from one context frame (the recipe's sampler, as validation):

- ``fm_train``: the mean logged flow-matching loss over the last 10% of the steps;
- ``fm_heldout``: the flow-matching loss on the held-out clips with fixed noise (4 draws per clip);
- ``psnr`` / ``ssim`` of the generated frames against the clips;
- ``consistency``: :func:`engine.eval.consistency.warp_consistency_error` of the generated video with the
  clips' true depth and cameras (consecutive frames warped onto each other; lower is better), beside the
  ground truth's own (``consistency_gt``, the floor).

Writes ``OUT/results.json`` (every run), ``OUT/table.md`` (mean ± sample standard deviation over seeds,
and the per-seed difference GF - baseline) and ``OUT/gf_vs_baseline.png``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from geoforge.engine.checkpoint import latest_checkpoint  # noqa: E402
from geoforge.engine.config import load_recipe  # noqa: E402
from geoforge.engine.data.builder import build_dataset  # noqa: E402
from geoforge.engine.distributed import World  # noqa: E402
from geoforge.engine.eval.consistency import warp_consistency_error  # noqa: E402
from geoforge.engine.eval.image_metrics import psnr, ssim  # noqa: E402
from geoforge.engine.eval.run import load_model  # noqa: E402
from geoforge.engine.eval.run_report import heldout_recipe  # noqa: E402
from geoforge.engine.eval.validate import validate  # noqa: E402
from geoforge.engine.objectives.flow_matching import draw_noise, flow_matching_loss  # noqa: E402
from profiling._experiment import logged, mean_sd, smooth, tail_mean, train_run  # noqa: E402

METRICS = [("fm_train", "flow-matching loss (train, last 10%)", "lower"),
           ("fm_heldout", "flow-matching loss (held-out, fixed noise)", "lower"),
           ("psnr", "held-out PSNR (dB)", "higher"), ("ssim", "held-out SSIM", "higher"),
           ("consistency", "3D-consistency error (x1e3)", "lower")]
VARIANTS = ("gf", "baseline")
CPU = World(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cpu"))


def run_overrides(args: argparse.Namespace, recipe, variant: str, seed: int, out: Path) -> list[str]:
    sets = [f"seed={seed}", f"schedule.steps={args.steps}", f"data.root={out / f'data_s{seed}'}",
            "logging.report_videos=0", f"logging.checkpoint_every={args.steps}", *args.set]
    if variant == "baseline":
        sets.append("gf.enabled=false")
    elif args.teacher == "oracle":
        grid = recipe.data.resolution // recipe.model.patch_size
        sets += ["teacher.kind=oracle", "teacher.layers=[0]", f"teacher.resolution={14 * grid}"]
    return sets


def heldout_batch(recipe, videos: int) -> dict[str, torch.Tensor]:
    held = heldout_recipe(recipe, videos)
    dataset = build_dataset(replace(held.data, hflip_prob=0.0), CPU, held.seed)
    items = [dataset[i] for i in range(videos)]
    return {k: torch.stack([it[k] for it in items]) for k in ("frames", "depth", "intrinsics", "extrinsics")}


@torch.no_grad()
def heldout_fm(dit, recipe, batch: dict[str, torch.Tensor], draws: int = 4) -> float:
    x0 = batch["frames"] * 2 - 1
    cond = {"intrinsics": batch["intrinsics"], "extrinsics": batch["extrinsics"]} if dit.cfg.camera != "none" else {}
    losses = []
    for d in range(draws):
        noise = draw_noise(x0.shape, recipe.objective, torch.Generator().manual_seed(1000 + d))
        losses.append(float(flow_matching_loss(dit, x0, recipe.objective, cond=cond, noise=noise)["mse"]))
    return sum(losses) / len(losses)


def evaluate(run_dir: Path, videos: int) -> dict[str, float]:
    recipe = load_recipe(str(run_dir / "recipe.yaml"))
    dit = load_model(recipe, latest_checkpoint(run_dir), "ema" if recipe.ema.enabled else "model")
    fm = logged(run_dir, "fm")
    batch = heldout_batch(recipe, videos)
    result = validate(dit, batch, recipe, recipe.schedule.steps)
    k = result.context
    gen, gt = result.samples[:, k:], result.ground_truth[:, k:]
    geometry = (batch["depth"], batch["intrinsics"], batch["extrinsics"])
    return {"fm_train": tail_mean(fm),
            "fm_heldout": heldout_fm(dit, recipe, batch),
            "psnr": float(psnr(gen, gt).mean()), "ssim": float(ssim(gen, gt).mean()),
            "consistency": 1e3 * float(warp_consistency_error(result.samples, *geometry).mean()),
            "consistency_gt": 1e3 * float(warp_consistency_error(result.ground_truth, *geometry).mean()),
            "fm_curve": fm}


def table(results: dict, seeds: list[int]) -> str:
    lines = ["| metric | better | GF | baseline | GF - baseline (per seed) |", "|---|---|---|---|---|"]
    for key, name, better in METRICS:
        gf = [results[f"gf_s{s}"][key] for s in seeds]
        base = [results[f"baseline_s{s}"][key] for s in seeds]
        diff = ", ".join(f"{g - b:+.3g}" for g, b in zip(gf, base))
        lines.append(f"| {name} | {better} | {mean_sd(gf)} | {mean_sd(base)} | {diff} |")
    floor = [results[f"baseline_s{s}"]["consistency_gt"] for s in seeds]
    lines.append(f"| 3D-consistency error of the ground truth (x1e3, floor) | | {mean_sd(floor)} | | |")
    return "\n".join(lines)


def plot(results: dict, seeds: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(3.2 * (len(METRICS) + 1), 3))
    for variant, colour in zip(VARIANTS, ("C0", "C1")):
        for s in seeds:
            curve = results[f"{variant}_s{s}"]["fm_curve"]
            w = max(1, len(curve) // 20)
            axes[0].plot(range(w, len(curve) + 1), smooth(curve, w), color=colour, lw=1, alpha=0.7,
                         label=variant if s == seeds[0] else None)
    axes[0].set_title("flow-matching loss")
    axes[0].set_xlabel("step")
    axes[0].legend()
    for ax, (key, name, better) in zip(axes[1:], METRICS):
        for x, (variant, colour) in enumerate(zip(VARIANTS, ("C0", "C1"))):
            values = [results[f"{variant}_s{s}"][key] for s in seeds]
            ax.scatter([x] * len(values), values, color=colour, s=14)
            ax.errorbar([x + 0.15], [statistics.mean(values)],
                        yerr=[statistics.stdev(values) if len(values) > 1 else 0], fmt="o", color="k", ms=3)
        ax.set_xticks([0, 1], VARIANTS)
        ax.set_title(f"{name}\n({better} is better)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="gf_tiny")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the recipe's)")
    p.add_argument("--teacher", choices=("oracle", "recipe"), default="oracle")
    p.add_argument("--videos", type=int, default=8, help="held-out clips per run")
    p.add_argument("--out", default="runs/gf_vs_baseline")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run")
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe, args.set)
    args.steps = args.steps or recipe.schedule.steps
    out = Path(args.out).resolve()
    print(f"plan: {2 * len(args.seeds)} runs (GF and baseline x seeds {args.seeds}) of {args.steps} steps, finished ones "
          f"reused -> {out}; gf_tiny's 400 steps take ~2-3 min per run on 2 cores, plus the held-out evaluation",
          flush=True)
    results = {}
    for seed in args.seeds:
        for variant in VARIANTS:
            run_dir = out / f"{variant}_s{seed}"
            train_run(args.recipe, run_dir, run_overrides(args, recipe, variant, seed, out), args.steps)
            results[run_dir.name] = evaluate(run_dir, args.videos)
            print(run_dir.name, {k: round(v, 4) for k, v in results[run_dir.name].items() if k != "fm_curve"},
                  flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=1))
    text = (f"{args.recipe}, {args.steps} steps, teacher {args.teacher}, seeds {args.seeds}, {args.videos} held-out "
            f"clips per run (EMA weights, 1 context frame)\n\n" + table(results, args.seeds))
    (out / "table.md").write_text(text + "\n")
    plot(results, args.seeds, out / "gf_vs_baseline.png")
    print(text)
    print(f"plot: {out / 'gf_vs_baseline.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
