"""The report a finished training run leaves in its directory: ``report.md`` and its pictures.

``write_run_report(recipe, run_dir, world)`` (called once at the end of ``train()``, main rank only; it
reads everything from the run directory) writes

- ``report/loss.png``: the logged loss parts (``metrics.jsonl``) against the step;
- ``report/frames_<split>.png``: per clip a ground-truth row above the EMA model's sample (frame 0 is the
  clean context frame, the rest generated);
- ``report.md``: PSNR / SSIM over the generated frames and their high-frequency energy relative to the
  ground truth's (:func:`engine.eval.baselines.high_frequency_energy`; ~1 for a sharp sample, >> 1 for
  noise, < 1 for a blurred one), for the EMA and the raw weights of the newest checkpoint beside the two
  trivial predictions (flat frame of the clip's mean colour, repeated context frame), on the first
  ``logging.report_videos`` training clips and on as many held-out clips.

Samples are drawn as validation draws them (:func:`engine.eval.validate.validate`: the first
``max(1, objective.context_frames)`` frames as clean context, the clip's cameras, ``logging.sample_steps``
Euler steps - for DFoT's U-ViT3D on DFoT's DDIM grid, i.e. DFoT's DDIM - noise from ``recipe.seed``).
Held-out clips: for synthetic data the split ``heldout_<N>`` (N = the clips used) rendered from the training
scenes' seed + 1 (``data.synthetic_seed``, else ``recipe.seed``: the seed ``engine.eval`` renders its ``test``
split from, so its clip n is the eval's clip n); otherwise the dataset's ``test`` split when it exists.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from geoforge.engine import pixels
from geoforge.engine.eval.baselines import flat_frames, high_frequency_energy, repeated_context
from geoforge.engine.eval.image_metrics import psnr, ssim
from geoforge.engine.eval.report import atomic_write_bytes, frame_grid, write_png
from geoforge.engine.eval.validate import ValidationResult, validate, validation_batch

HELDOUT_SPLIT = "heldout"


def heldout_recipe(recipe, videos: int):
    """The recipe reading held-out clips (module docstring), or None when there are none."""
    data = recipe.data
    if data.kind == "synthetic":
        return replace(recipe, seed=recipe.seed + 1,   # one split per count: a root's split has one clip count
                       data=replace(data, split=f"{HELDOUT_SPLIT}_{videos}", synthetic_clips=videos,
                                    synthetic_seed=data.scene_seed(recipe.seed) + 1))
    if (Path(data.root) / "test").is_dir():
        return replace(recipe, data=replace(data, split="test"))
    return None


def score(generated: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """PSNR, SSIM (means over frames and clips) and the high-frequency energy ratio of ``generated`` vs ``gt``
    (both ``[N, T, C, H, W]`` in [0, 1])."""
    return {"psnr": float(psnr(generated, gt).mean()), "ssim": float(ssim(generated, gt).mean()),
            "hf_ratio": high_frequency_energy(generated) / max(high_frequency_energy(gt), 1e-12)}


def compare(samples: dict[str, ValidationResult]) -> dict[str, dict[str, float]]:
    """Scores of each sampled model and of the flat-frame and repeated-context predictions of the same clips."""
    first = next(iter(samples.values()))
    k, gt = first.context, first.ground_truth
    rows = {name: score(result.samples[:, k:], gt[:, k:]) for name, result in samples.items()}
    rows["flat frame"] = score(flat_frames(gt, k), gt[:, k:])
    rows["repeated context"] = score(repeated_context(gt, k), gt[:, k:])
    return rows


def loss_curves(metrics_path: Path, out: Path) -> list[str]:
    """Plot every logged loss part of ``metrics.jsonl`` against the step into ``out``; returns the parts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    parts = [k for k in rows[0] if k == "loss" or k == "fm" or k.startswith("gf")] if rows else []
    fig, axes = plt.subplots(1, max(1, len(parts)), figsize=(4 * max(1, len(parts)), 3), squeeze=False)
    for ax, part in zip(axes[0], parts):
        steps = np.array([r["step"] for r in rows if part in r])
        values = np.array([r[part] for r in rows if part in r], dtype=float)
        ax.plot(steps, values, lw=0.6, alpha=0.4)
        window = max(1, len(values) // 20)
        if window > 1:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, lw=1.5)
        ax.set_title(part)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    tmp.replace(out)
    return parts


def frame_strip(result: ValidationResult, videos: int) -> np.ndarray:
    """uint8 image: per clip its ground-truth row above its sample row (all frames, small ones enlarged)."""
    rows = []
    for gt, sample in zip(result.ground_truth[:videos], result.samples[:videos]):
        rows += [pixels.to_uint8(video).cpu().numpy() for video in (gt, sample)]
    return frame_grid(rows, columns=result.samples.shape[1], min_size=64)


def _table(rows: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| prediction | PSNR (dB) | SSIM | high-freq. energy / GT's |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['hf_ratio']:.2f} |" for name, r in rows.items()]
    return lines


def sampler_name(recipe) -> str:
    """How validation samples ``recipe``'s backbone (module docstring of ``engine.eval.validate``)."""
    return "DFoT DDIM" if recipe.model.arch == "uvit3d" else "Euler"


def write_run_report(recipe, run_dir: Path, world) -> Path | None:
    """Write ``report.md`` for the newest checkpoint of ``run_dir`` (module docstring); main rank only.
    Returns its path (None on other ranks, with ``logging.report_videos: 0`` or without a checkpoint)."""
    from geoforge.engine.checkpoint import latest_checkpoint
    from geoforge.engine.data.builder import clip_names
    from geoforge.engine.eval.load import load_model

    from geoforge.engine.distributed import World
    from geoforge.engine.precision import current_precision

    videos = recipe.logging.report_videos
    checkpoint = latest_checkpoint(Path(run_dir)) if world.is_main and videos else None
    if checkpoint is None:
        return None
    run_dir = Path(run_dir)
    step = int(checkpoint.name.split("_")[-1])
    weights = ["ema", "model"] if recipe.ema.enabled else ["model"]
    dits = {f"model ({'EMA' if w == 'ema' else 'raw'} weights)": load_model(recipe, checkpoint, w, world.device)
            for w in weights}
    lines = [f"# Run report: {recipe.name}, step {step}", "",
             f"Checkpoint `{checkpoint.relative_to(run_dir)}`. Samples: {max(1, recipe.objective.context_frames)} "
             f"clean context frame(s), {recipe.logging.sample_steps} {sampler_name(recipe)} steps, conditional; "
             f"metrics over the generated frames. Flat frame: the clip's mean colour; repeated context: the last "
             f"context frame.", "", f"Precision (training and these samples): {current_precision().describe()}.",
             ""]
    parts = loss_curves(run_dir / "metrics.jsonl", run_dir / "report" / "loss.png")
    if parts:
        lines += ["## Loss", "", "![loss curves](report/loss.png)", ""]
    splits = [("training clips", recipe, "training")]
    held = heldout_recipe(recipe, videos)
    if held is not None:
        splits.append(("held-out clips", held, "heldout"))
    summary = {}
    alone = World(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cpu"))   # the other ranks are done
    for title, split_recipe, tag in splits:
        count = min(videos, len(clip_names(split_recipe.data))) if tag == "training" else videos
        batch = validation_batch(split_recipe, count, alone)
        results = {name: validate(dit, batch, recipe, step) for name, dit in dits.items()}
        rows = compare(results)
        summary[tag] = rows
        write_png(run_dir / "report" / f"frames_{tag}.png", frame_strip(next(iter(results.values())), videos))
        lines += [f"## {title} ({len(batch['frames'])})", "", *_table(rows), "",
                  f"Ground truth above, {next(iter(results))} below; frame 0 is the context.", "",
                  f"![{tag} frames](report/frames_{tag}.png)", ""]
    summary["precision"] = current_precision().describe()
    atomic_write_bytes(run_dir / "report" / "metrics.json", (json.dumps(summary, indent=1) + "\n").encode())
    path = run_dir / "report.md"
    atomic_write_bytes(path, ("\n".join(lines)).encode())
    print(f"run report: {path}", flush=True)
    return path


__all__ = ["write_run_report", "compare", "score", "heldout_recipe", "loss_curves", "frame_strip"]
