"""Does a recipe learn the task? Train named variants of it and judge each on held-out scenes against the trivial
baselines - the documented sweep behind the small and tiny recipes.

    python profiling/sweep.py --recipe gf_tiny --config "c64: data.synthetic_clips=64 schedule.steps=800" \\
        --config "c128: data.synthetic_clips=128 schedule.steps=800" --seeds 0 --videos 16
    python profiling/sweep.py --recipe gf_small --config "shipped:" --seeds 0 1 2      # the recipe as it ships

Each ``--config "NAME: KEY=VALUE KEY=VALUE"`` is trained per seed with ``engine/train.py`` into ``OUT/NAME_s<seed>``
(a finished run is reused; a config that renders another synthetic set than the recipe's gets its own data root,
:func:`data_root`). Then
``geoforge-eval``'s short16 protocol samples ``--videos`` held-out clips (split ``test``: scenes rendered from
seed + 1, never trained on) from one clean context frame and the cameras, ``--frames`` frames, conditional, the
EMA weights; from the stored videos (``videos/*.npz``: generated, gt) this computes, over the generated frames:
PSNR and SSIM of the model, of the flat frame (the clip's mean colour) and of the repeated context frame, and
the high-frequency energy of the samples over the ground truth's (~1: sharp; << 1: blur; >> 1: noise).

Writes ``OUT/results.json`` and ``OUT/table.md`` (per config: mean ± sd over seeds, the margins over both
baselines, training time) and prints the plan with an estimate first (``OUT`` defaults to ``runs/sweep_<recipe>``,
untracked).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from geoforge.engine.atomic import atomic_write_text  # noqa: E402
from geoforge.engine.config import load_recipe  # noqa: E402
from geoforge.engine.eval.baselines import flat_frames, high_frequency_energy, repeated_context  # noqa: E402
from geoforge.engine.eval.image_metrics import psnr, ssim  # noqa: E402
from profiling._experiment import logged, mean_sd, train_run  # noqa: E402

METRICS = [("psnr", "model PSNR (dB)"), ("margin_flat", "model - flat frame (dB)"),
           ("margin_repeat", "model - repeated context (dB)"), ("ssim", "model SSIM"),
           ("hf_ratio", "high-freq. energy / GT's"), ("train_minutes", "training minutes")]


def parse_config(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition(":")
    if not name.strip() or " " in name.strip():
        raise SystemExit(f"--config {text!r}: expected 'NAME: KEY=VALUE ...'")
    return name.strip(), sets.split()


def heldout_scores(eval_dir: Path, videos: int, context: int = 1) -> dict[str, float]:
    """PSNR / SSIM of the model and the two baselines over the generated frames, and the sample's sharpness."""
    from geoforge.engine.eval.video_files import load_generated

    gen, gt = [], []
    for i in range(videos):
        record = load_generated(eval_dir / "videos" / f"{i:05d}.npz")
        gen.append(torch.from_numpy(record["generated"]).float() / 255)
        gt.append(torch.from_numpy(record["gt"]).float() / 255)
    gen, gt = torch.stack(gen), torch.stack(gt)   # [N, T, 3, H, W] in [0, 1]
    target = gt[:, context:]
    flat, repeat = flat_frames(gt, context), repeated_context(gt, context)
    out = {"psnr": float(psnr(gen[:, context:], target).mean()), "ssim": float(ssim(gen[:, context:], target).mean()),
           "flat_psnr": float(psnr(flat, target).mean()), "repeat_psnr": float(psnr(repeat, target).mean()),
           "hf_ratio": high_frequency_energy(gen[:, context:]) / high_frequency_energy(target)}
    out["margin_flat"] = out["psnr"] - out["flat_psnr"]
    out["margin_repeat"] = out["psnr"] - out["repeat_psnr"]
    return out


def data_root(base, recipe, sets: list[str]) -> list[str]:
    """A ``data.root`` override when a config renders other scenes than the recipe's root holds (a root holds one
    set): ``data/synthetic_<res>_c<clips>_f<frames>_s<scene seed>``, shared by every sweep and seed that asks for
    the same set. None when the config names its root or renders the recipe's own set."""
    d, b = recipe.data, base.data
    key = (d.synthetic_clips, d.synthetic_frames, d.resolution, d.scene_seed(recipe.seed))
    if any(s.startswith("data.root=") for s in sets) or key == (b.synthetic_clips, b.synthetic_frames, b.resolution,
                                                                 b.scene_seed(base.seed)):
        return []
    return [f"data.root=data/synthetic_{d.resolution}_c{d.synthetic_clips}_f{d.synthetic_frames}_s{key[3]}"]


def evaluate(run_dir: Path, videos: int, frames: int, steps: int) -> dict[str, float]:
    from geoforge.engine.eval.options import parse_args
    from geoforge.engine.eval.run import run

    eval_dir = run_dir / "eval_heldout"
    asked = {"videos": videos, "frames": frames, "steps": steps}
    marker = eval_dir / "sweep_eval.json"
    if marker.is_file() and json.loads(marker.read_text()) == asked:
        print(f"reusing {eval_dir}", flush=True)
        return heldout_scores(eval_dir, videos)
    run(parse_args(["--recipe", str(run_dir / "recipe.yaml"), "--checkpoint", str(run_dir), "--protocol", "short16",
                    "--frames", str(frames), "--num-videos", str(videos), "--guidance", "conditional", "--steps",
                    str(steps), "--split", "test", "--out", str(eval_dir), "--no-progress"]))
    atomic_write_text(marker, json.dumps(asked))   # written last: an interrupted evaluation runs again
    return heldout_scores(eval_dir, videos)


def table(results: dict, configs: list[str], seeds: list[int]) -> str:
    lines = ["| config | " + " | ".join(name for _, name in METRICS) + " | flat / repeated context (dB) |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for c in configs:
        rows = [results[f"{c}_s{s}"] for s in seeds]
        cells = [mean_sd([r[k] for r in rows], 3) for k, _ in METRICS]
        base = f"{statistics.mean(r['flat_psnr'] for r in rows):.2f} / {statistics.mean(r['repeat_psnr'] for r in rows):.2f}"
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {base} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True)
    p.add_argument("--config", action="append", required=True, metavar="'NAME: KEY=VALUE ...'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--videos", type=int, default=16, help="held-out clips per run")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=32, help="sampler steps of the evaluation")
    p.add_argument("--out", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config")
    args = p.parse_args(argv)
    out = Path(args.out or f"runs/sweep_{args.recipe}").resolve()
    configs = [parse_config(c) for c in args.config]
    steps = {n: load_recipe(args.recipe, [*args.set, *sets]).schedule.steps for n, sets in configs}
    print(f"plan: {len(configs)} config(s) x seeds {args.seeds} = {len(configs) * len(args.seeds)} runs of "
          f"{args.recipe} ({', '.join(f'{n} {steps[n]} steps' for n, _ in configs)}), each judged on {args.videos} "
          f"held-out clips; finished runs reused -> {out}", flush=True)
    base = load_recipe(args.recipe, args.set)
    results = {}
    for name, sets in configs:
        for seed in args.seeds:
            recipe = load_recipe(args.recipe, [*args.set, *sets, f"seed={seed}"])
            run_dir = out / f"{name}_s{seed}"
            extra = data_root(base, recipe, [*args.set, *sets])
            began = time.perf_counter()
            train_run(args.recipe, run_dir, [*args.set, *sets, f"seed={seed}", *extra], steps[name])
            row = evaluate(run_dir, args.videos, args.frames, args.steps)
            row["train_minutes"] = statistics.median(logged(run_dir, "step_seconds")) * steps[name] / 60
            results[run_dir.name] = row
            print(f"{run_dir.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()) +
                  f" ({time.perf_counter() - began:.0f} s)", flush=True)
    atomic_write_text(out / "results.json", json.dumps({"args": vars(args), "configs": dict(configs), "runs": results},
                                                          indent=1))
    text = (f"{args.recipe}: {args.videos} held-out clips per run, {args.frames} frames from 1 context frame, "
            f"{args.steps} sampler steps, conditional, EMA weights; mean ± sd over seeds {args.seeds}\n\n"
            + table(results, [n for n, _ in configs], args.seeds))
    atomic_write_text(out / "table.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
