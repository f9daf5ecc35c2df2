"""bf16 mixed precision against fp32 on the tiny recipes: does ``distributed.precision: auto`` train the same model?

    python profiling/precision_equivalence.py                               # gf_tiny and dfot_tiny, seeds 0 1 2
    python profiling/precision_equivalence.py --recipes gf_tiny --seeds 0 1 --set schedule.steps=100   # reduced

For each recipe, seed s and precision p in (fp32, auto), ``engine/train.py --recipe R --set seed=s --set
distributed.precision=p`` trains into ``OUT/R/p_s<s>`` (a finished run is reused; both precisions of a seed read
the same rendered clips, ``OUT/data_s<s>``: the seed varies the data, the initial weights and the noise). Per
run: the flow-matching loss over the last 10% of the steps, the training speed (median logged step time), and
the run report's numbers (``report/metrics.json``: EMA weights, training and held-out clips, PSNR / SSIM /
high-frequency energy against the ground truth's). A precision's effect is judged against the seed-to-seed
spread: the table gives mean ± sample standard deviation over seeds for each precision, the per-seed paired
differences auto - fp32, and whether the mean difference lies within one seed standard deviation.

Writes ``OUT/results.json``, ``OUT/table.md`` and ``OUT/loss_curves.png`` (``OUT`` defaults to
``runs/precision_equivalence``, outside the tracked tree). Cost: 12 runs of ~2-4 minutes on the 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from geoforge.engine.config import load_recipe  # noqa: E402
from profiling._experiment import logged, mean_sd, smooth, tail_mean, train_run  # noqa: E402

PRECISIONS = ("fp32", "auto")
METRICS = [("fm_last10", "flow-matching loss, last 10% of steps"), ("steps_per_s", "training steps / s"),
           ("train_psnr", "training clips PSNR (dB)"), ("train_ssim", "training clips SSIM"),
           ("train_hf", "training clips high-freq. energy / GT's"), ("held_psnr", "held-out PSNR (dB)"),
           ("held_ssim", "held-out SSIM"), ("held_hf", "held-out high-freq. energy / GT's")]


def read_run(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report" / "metrics.json").read_text())
    ema = {split: report[split]["model (EMA weights)"] for split in ("training", "heldout")}
    fm = logged(run_dir, "fm")
    step = statistics.median(logged(run_dir, "step_seconds")[5:] or logged(run_dir, "step_seconds"))
    return {"fm_last10": tail_mean(fm), "steps_per_s": 1.0 / step,
            "train_psnr": ema["training"]["psnr"], "train_ssim": ema["training"]["ssim"],
            "train_hf": ema["training"]["hf_ratio"], "held_psnr": ema["heldout"]["psnr"],
            "held_ssim": ema["heldout"]["ssim"], "held_hf": ema["heldout"]["hf_ratio"],
            "precision": report.get("precision", "?"), "fm_curve": fm}


def table(results: dict, recipe: str, seeds: list[int]) -> str:
    lines = [f"### {recipe}", "", f"precision auto ran as: {results[f'{recipe}/auto_s{seeds[0]}']['precision']}", "",
             "| metric | fp32 | auto | auto - fp32 (per seed) | mean difference within 1 seed sd? |",
             "|---|---|---|---|---|"]
    for key, name in METRICS:
        fp32 = [results[f"{recipe}/fp32_s{s}"][key] for s in seeds]
        auto = [results[f"{recipe}/auto_s{s}"][key] for s in seeds]
        diffs = [a - f for a, f in zip(auto, fp32)]
        spread = max(statistics.stdev(fp32), statistics.stdev(auto)) if len(seeds) > 1 else float("nan")
        within = "-" if key == "steps_per_s" or spread != spread else (
            "yes" if abs(statistics.mean(diffs)) <= spread else "**no**")
        lines.append(f"| {name} | {mean_sd(fp32)} | {mean_sd(auto)} | "
                     f"{', '.join(f'{d:+.3g}' for d in diffs)} | {within} |")
    return "\n".join(lines)


def plot(results: dict, recipes: list[str], seeds: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(recipes), figsize=(5 * len(recipes), 3.4), squeeze=False)
    for ax, recipe in zip(axes[0], recipes):
        for precision, colour in zip(PRECISIONS, ("C0", "C3")):
            for s in seeds:
                curve = results[f"{recipe}/{precision}_s{s}"]["fm_curve"]
                w = max(1, len(curve) // 25)
                ax.plot(range(w, len(curve) + 1), smooth(curve, w), color=colour, lw=1, alpha=0.8,
                        label=precision if s == seeds[0] else None)
        ax.set_yscale("log")
        ax.set_title(f"{recipe}: flow-matching loss (seeds {', '.join(map(str, seeds))})", fontsize=9)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["gf_tiny", "dfot_tiny"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/precision_equivalence")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    runs = [(r, s, p) for r in args.recipes for s in args.seeds for p in PRECISIONS]
    print(f"plan: {len(runs)} runs ({', '.join(args.recipes)} x seeds {args.seeds} x {'/'.join(PRECISIONS)}), "
          f"finished ones reused; ~2-4 minutes each on 2 cores -> {out}", flush=True)
    results = {}
    for i, (recipe, seed, precision) in enumerate(runs, 1):
        steps = load_recipe(recipe, args.set).schedule.steps
        run_dir = out / recipe / f"{precision}_s{seed}"
        print(f"[{i}/{len(runs)}] {recipe} seed {seed} {precision}", flush=True)
        sets = [f"seed={seed}", f"distributed.precision={precision}", f"data.root={out / f'data_{recipe}_s{seed}'}",
                *args.set]
        train_run(recipe, run_dir, sets, steps)
        results[f"{recipe}/{precision}_s{seed}"] = read_run(run_dir)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=1))
    text = "\n\n".join(table(results, r, args.seeds) for r in args.recipes)
    (out / "table.md").write_text(text + "\n")
    plot(results, args.recipes, args.seeds, out / "loss_curves.png")
    print(text)
    print(f"plot: {out / 'loss_curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
