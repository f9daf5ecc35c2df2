"""The evaluation report: ``metrics.json``, ``report.md``, per-frame plots and a grid of sample frames.

Every file is written to a temporary name and renamed into place, so a killed run never leaves a
half-written report. Plots use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from geoforge.engine.atomic import atomic_save, atomic_write_bytes, atomic_write_json

# Geometry Forcing's table (RealEstate10K 256x256, methods.md section 1), for orientation only.
PUBLISHED = {
    "short16": [("DFoT", {"fvd": 252, "lpips": 0.40, "ssim": 0.50, "psnr": 14.40}),
                ("GF", {"fvd": 193, "lpips": 0.32, "ssim": 0.58, "psnr": 14.70})],
    "long256": [("DFoT", {"fvd": 364, "lpips": 0.55, "ssim": 0.36, "psnr": 11.40}),
                ("GF", {"fvd": 243, "lpips": 0.51, "ssim": 0.38, "psnr": 11.87})],
}
LOWER_IS_BETTER = {"fvd", "fid", "lpips", "reproj_gen", "reproj_gt", "reproj_ratio", "rot_err", "trans_err",
                   "cammc", "rot_err_gt", "trans_err_gt", "cammc_gt", "revisit_lpips", "revisit_fid"}


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.4g}"


def describe_sampler(sampler: dict, levels: dict | None = None) -> str:
    """One line for the report from ``asdict(SamplerConfig)``; ``levels``: the guidance as the user gave it
    (``{"prediction": asdict(GuidanceSpec), "interpolation": ...}``), whose noise levels (DFoT's units) are
    shown next to the sampler's flow times."""
    def guidance(g: dict, spec: dict | None) -> str:
        def level(key: str, t: float) -> str:
            return f"{spec[key]:g} (flow time {t:.3g})" if spec else f"at flow time {t:.3g}"

        text = g["history"] + (f" {g['scale']:g}" if g["history"] in ("vanilla", "fractional") else "")
        text += f" (freq_scale {level('freq_scale', g.get('fraction', 0.5))})" if g["history"] == "fractional" else ""
        if g["history"] == "temporal":
            text += " (" + "; ".join(f"frames {list(s)} x {w:g}" for s, w in
                                     zip(g.get("subsets", ()), g.get("subset_weights", ()))) + ")"
        if g["stabilization"]:
            text += f", stabilization level {level('stabilization_level', g['stabilization'])}"
        return text + (f", camera/action CFG {g['cond_scale']:g}" if g["cond_scale"] != 1 else "")

    levels = levels or {}
    text = (f"{sampler['method']} ({sampler['steps']} steps, {sampler['schedule']}), window {sampler['window']}, "
            f"history guidance {guidance(sampler['guidance'], levels.get('prediction'))}")
    if sampler.get("keyframe_density"):
        text += (f"; keyframes at density {sampler['keyframe_density']:g}, interpolation guidance "
                 f"{guidance(sampler['interpolation_guidance'], levels.get('interpolation'))}")
    return text


def plot_per_frame(path: Path, curves: dict[str, Sequence[float | None]], title: str) -> None:
    """One panel per metric: its mean over videos against the frame index (None: context frame)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k, v in curves.items() if any(x is not None for x in v)]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.5 * max(1, len(names)), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        ys = np.array([np.nan if y is None else y for y in curves[name]], dtype=float)
        ax.plot(np.arange(len(ys)), ys, lw=1.2)
        ax.set_xlabel("frame index")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def frame_grid(rows: Sequence[np.ndarray], columns: int = 8, gap: int = 2, min_size: int = 96) -> np.ndarray:
    """A uint8 image [H', W', 3]: each row a video (uint8 [T, 3, H, W]) at ``columns`` evenly spaced frames,
    frames smaller than ``min_size`` enlarged by an integer factor."""
    if not rows:
        raise ValueError("frame_grid: no videos")
    h, w = rows[0].shape[-2:]
    zoom = max(1, -(-min_size // min(h, w)))  # nearest-neighbour upscaling of small frames
    out_rows = []
    for video in rows:
        if video.shape[-2:] != (h, w):
            raise ValueError(f"frame_grid: videos of different sizes {video.shape[-2:]} vs {(h, w)}")
        picks = np.unique(np.linspace(0, video.shape[0] - 1, min(columns, video.shape[0])).round().astype(int))
        tiles = [np.pad(video[i].transpose(1, 2, 0).repeat(zoom, 0).repeat(zoom, 1), ((0, gap), (0, gap), (0, 0)),
                        constant_values=255) for i in picks]
        tiles += [np.full_like(tiles[0], 255)] * (columns - len(tiles))
        out_rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(out_rows, axis=0)


def write_png(path: Path, image: np.ndarray) -> None:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_report(out: Path, summary: dict, curves: dict[str, list[float | None]] | None,
                 grid: np.ndarray | None) -> Path:
    """``metrics.json`` (= ``summary`` + curves), optional plots / grid PNGs, and ``report.md``; returns the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", {**summary, "per_frame": curves or {}})
    lines = [f"# Evaluation: {summary['protocol']}", "",
             f"- recipe: `{summary['recipe']}`, checkpoint: `{summary['checkpoint']}` ({summary['weights']} weights)",
             f"- videos: {summary['num_videos']}, frames: {summary['frames']}, context frames: {summary['context']}",
             f"- sampler: {describe_sampler(summary['sampler'], summary.get('guidance'))}", "",
             "| metric | value | better |", "|---|---|---|"]
    for name, value in summary["metrics"].items():
        lines.append(f"| {name} | {_fmt(value)} | {'lower' if name in LOWER_IS_BETTER else 'higher'} |")
    if summary.get("skipped"):
        lines += ["", "## Skipped metrics", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in summary["skipped"].items()]
    published = PUBLISHED.get(summary["protocol"])
    if published:
        keys = list(published[0][1])
        lines += ["", "## Published (Geometry Forcing, RealEstate10K 256x256; for orientation)", "",
                  "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(str(v[k]) for k in keys) + " |" for m, v in published]
    if curves and any(any(x is not None for x in v) for v in curves.values()):
        plot_per_frame(out / "per_frame.png", curves, f"{summary['protocol']}: metrics vs frame index")
        lines += ["", "## Metrics vs frame index", "", "![per-frame metrics](per_frame.png)"]
    if grid is not None:
        write_png(out / "samples.png", grid)
        lines += ["", "## Samples", "", summary.get("grid_caption", ""), "", "![sample frames](samples.png)"]
    report = out / "report.md"
    atomic_write_bytes(report, ("\n".join(lines) + "\n").encode())
    return report
