"""The metrics of an evaluation: the metric networks of a run (:class:`Networks`, each optional), per-video metrics
(PSNR / SSIM / LPIPS per frame, VGGT reprojection and camera errors, the revisit error), cached per video, their
means and per-frame curves, and the set metrics (FVD, FID)."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from geoforge.engine.atomic import atomic_write_json
from geoforge.engine.eval.frechet import extract_features, frechet_distance_from_features
from geoforge.engine.eval.image_metrics import psnr, ssim
from geoforge.engine.eval.options import EvalOptions
from geoforge.engine.eval.video_files import load_generated, to_unit, video_path

if TYPE_CHECKING:
    from geoforge.engine.eval.geometry import VGGTGeometry


@dataclass
class Networks:
    """The metric networks of a run; None where not given (``skipped`` says why)."""

    fvd: torch.nn.Module | None = None
    fid: torch.nn.Module | None = None
    lpips: torch.nn.Module | None = None
    geometry: VGGTGeometry | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def available(self) -> list[str]:
        """Names of the networks present (per-video metrics cached without one of them are recomputed)."""
        return [name for name in ("fvd", "fid", "lpips", "geometry") if getattr(self, name) is not None]

    @classmethod
    def from_options(cls, opts: EvalOptions, device: torch.device, backend: str = "auto") -> Networks:
        """Networks from the weight options; ``backend`` is the reprojection kernel's (the recipe's ``backend``)."""
        from geoforge.engine.eval.geometry import VGGTGeometry
        from geoforge.engine.eval.i3d import FVDExtractor
        from geoforge.engine.eval.inception import FIDInceptionV3
        from geoforge.engine.eval.lpips import LPIPS

        nets = cls()
        if opts.i3d:
            nets.fvd = FVDExtractor.from_pretrained(opts.i3d, num_frames=None).to(device)
        else:
            nets.skipped["fvd"] = "no I3D weights given (--i3d PATH or hf://OWNER/REPO/i3d_pretrained_400.pt)"
        if opts.inception:
            nets.fid = FIDInceptionV3.from_pretrained(opts.inception).to(device)
        else:
            nets.skipped["fid"] = ("no Inception weights given (--inception PATH or "
                                   "hf://OWNER/REPO/pt_inception-2015-12-05-6726825d.pth)")
        if opts.lpips_backbone and opts.lpips_lin:
            nets.lpips = LPIPS.from_pretrained(opts.lpips_backbone, opts.lpips_lin).to(device)
        else:
            missing = [f for f, v in (("--lpips-backbone", opts.lpips_backbone), ("--lpips-lin", opts.lpips_lin))
                       if not v]
            nets.skipped["lpips"] = f"no LPIPS weights given ({' and '.join(missing)})"
        if opts.vggt:
            nets.geometry = VGGTGeometry.from_pretrained(
                opts.vggt, device=device, resolution=opts.vggt_resolution, max_frames=opts.vggt_frames,
                conf_percentile=opts.conf_percentile, camera_scale=opts.camera_scale, backend=backend)
        else:
            nets.skipped["reproj/camera"] = "no VGGT weights given (--vggt DIR|FILE|facebook/VGGT-1B)"
        return nets


def _nan_list(values: torch.Tensor, context: int) -> list[float | None]:
    return [None if i < context else float(v) for i, v in enumerate(values.tolist())]


def per_video_metrics(record: dict[str, np.ndarray], nets: Networks, context: int) -> dict:
    """One video's metrics: per-frame PSNR / SSIM / LPIPS vs ground truth (context frames are None),
    VGGT reprojection and camera errors (generated and ground truth), revisit error (no ground truth)."""
    gen = to_unit(record["generated"])
    out: dict = {}
    if "gt" in record:
        gt = to_unit(record["gt"])
        if gt.shape != gen.shape:
            raise ValueError(f"generated {tuple(gen.shape)} and ground-truth {tuple(gt.shape)} videos differ in shape")
        out["psnr"] = _nan_list(psnr(gen, gt), context)
        out["ssim"] = _nan_list(ssim(gen, gt), context)
        if nets.lpips is not None:
            device = next(nets.lpips.parameters()).device
            out["lpips"] = _nan_list(nets.lpips(gen.to(device), gt.to(device)).cpu(), context)
    else:
        from geoforge.engine.eval.camera_metrics import revisit_error

        device = next(nets.lpips.parameters()).device if nets.lpips is not None else torch.device("cpu")
        revisit = revisit_error(gen[0].to(device), gen[-1].to(device), nets.lpips)
        out.update({f"revisit_{k}": float(v) for k, v in revisit.items()})
    if nets.geometry is not None:
        ext = torch.from_numpy(record["extrinsics"]).float() if "extrinsics" in record else None
        for name, video in (("gen", record["generated"]), ("gt", record.get("gt"))):
            if video is None:
                continue
            geo = nets.geometry.video_metrics(torch.from_numpy(video), ext)
            out[f"reproj_{name}"] = geo["reproj"]
            suffix = "" if name == "gen" else "_gt"
            for key in ("rot_err", "trans_err", "cammc"):
                if key in geo:
                    out[key + suffix] = geo[key]
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else float("nan")


def aggregate(per_video: list[dict], context: int) -> tuple[dict[str, float], dict[str, list[float | None]]]:
    """Means over videos (frame metrics: over all non-context frames) and per-frame-index curves."""
    metrics: dict[str, float] = {}
    curves: dict[str, list[float | None]] = {}
    for key in ("psnr", "ssim", "lpips"):
        rows = [v[key] for v in per_video if key in v]
        if not rows:
            continue
        arr = np.array([[np.nan if x is None else x for x in row] for row in rows], dtype=float)
        finite = np.where(np.isfinite(arr), arr, np.nan)  # identical frames give PSNR inf: left out of means
        metrics[key] = float(np.nanmean(finite))
        curves[key] = [None if i < context or np.all(np.isnan(finite[:, i])) else float(np.nanmean(finite[:, i]))
                       for i in range(arr.shape[1])]
    scalar_keys = sorted({k for v in per_video for k, x in v.items() if isinstance(x, float)})
    for key in scalar_keys:
        metrics[key] = _mean([v.get(key) for v in per_video])
    if "reproj_gen" in metrics and "reproj_gt" in metrics:
        metrics["reproj_ratio"] = metrics["reproj_gen"] / max(metrics["reproj_gt"], 1e-12)
    return metrics, curves


def set_metrics(load: Callable[[int], dict[str, np.ndarray]], count: int, nets: Networks, context: int,
                skipped: dict[str, str]) -> dict[str, float]:
    """FVD (whole videos), FID (non-context frames) and, without ground truth, the revisit FID.

    ``load(i)`` reads video record i of ``count``; videos are streamed from disk, one at a time.
    """
    out: dict[str, float] = {}
    has_gt = "gt" in load(0)

    def videos(key: str) -> Iterator[torch.Tensor]:
        for i in range(count):
            record = load(i)
            video = to_unit(record[key])[None]
            if key == "generated":
                video[:, :context] = to_unit(record["gt"][:context])  # DFoT: context frames are the GT's
            yield video

    def frames(key: str, pick: slice, chunk: int = 32) -> Iterator[torch.Tensor]:
        for i in range(count):
            yield from to_unit(load(i)[key][pick]).split(chunk)

    if count < 2:
        for name in (("fvd", "fid") if has_gt else ("revisit_fid",)):
            skipped.setdefault(name, "needs at least 2 videos")
        return out
    if has_gt:
        if nets.fvd is not None:
            out["fvd"] = frechet_distance_from_features(extract_features(videos("generated"), nets.fvd),
                                                        extract_features(videos("gt"), nets.fvd))
        if nets.fid is not None:
            rest = slice(context, None)
            out["fid"] = frechet_distance_from_features(extract_features(frames("generated", rest), nets.fid),
                                                        extract_features(frames("gt", rest), nets.fid))
    elif nets.fid is not None:
        out["revisit_fid"] = frechet_distance_from_features(
            extract_features(frames("generated", slice(-1, None)), nets.fid),
            extract_features(frames("generated", slice(0, 1)), nets.fid))
    else:
        skipped["revisit_fid"] = skipped.get("fid", "no Inception weights given (--inception)")
    return out


def video_metrics(out: Path, index: int, nets: Networks, context: int) -> dict:
    """Video ``index``'s metrics, from ``per_video/NNNNN.json`` when it was computed with these networks."""
    path = out / "per_video" / f"{index:05d}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if set(cached.get("networks", [])) >= set(nets.available):
            return cached
    metrics = {**per_video_metrics(load_generated(video_path(out, index)), nets, context), "networks": nets.available}
    atomic_write_json(path, metrics)
    return metrics
