"""Geometry metrics of generated videos with the VGGT teacher: reprojection consistency, camera accuracy.

Both run VGGT (``engine.models.vggt.VGGT``, any configuration with camera and depth heads) on the frames
of one video as one multi-view sequence, after the official preprocessing (``preprocess_images``,
``crop`` mode: width -> ``resolution``, height by aspect ratio, multiples of 14). With ``max_frames``
the frames are first subsampled uniformly, ``round(linspace(0, T - 1, max_frames))`` (VideoGPA: 10).

**Reprojection consistency** (our stand-in for Geometry Forcing's DROID-SLAM reprojection error, RPE):
VGGT's cameras and depth -> every pixel whose depth confidence passes the threshold becomes a point
coloured by its frame -> the fused cloud is z-buffer splatted into every frame
(``kernels.reproject.reprojection_error``) -> per-frame MSE against the frame (empty pixels count as
0, in [0, 1]); the video's score is the mean over frames (lower = more 3D-consistent). The
threshold is the ``conf_percentile``-th percentile of the video's confidences (VideoGPA's
``conf_thres``; 0 keeps every pixel). As in GF, it is reported for generated and ground-truth
videos and as their ratio (generated / ground truth, ~1 for a video as consistent as real ones).

**Camera accuracy**: VGGT's camera-from-world extrinsics of the generated frames against the
conditioning cameras, RotErr / TransErr / CamMC of ``engine.eval.camera_metrics.camera_errors``
(both trajectories relative to their first camera; translations brought to one scale by
``camera_scale``, default ``"own"``: CamI2V's relative protocol). Computed for ground-truth videos
too: VGGT's own error, the floor a generated video can reach.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from geoforge.engine.eval.camera_metrics import SCALE_MODES, camera_errors
from geoforge.engine.models.vggt import VGGT, preprocess_images
from geoforge.engine.models.vggt.estimate import Geometry, check_geometry_heads, estimate_geometry
from geoforge.kernels.reproject import reprojection_error


def frame_subset(frames: int, max_frames: int | None) -> torch.Tensor:
    """Indices of the frames VGGT sees: all, or ``round(linspace(0, frames - 1, max_frames))``."""
    if max_frames is None or max_frames >= frames:
        return torch.arange(frames)
    if max_frames < 2:
        raise ValueError(f"max_frames must be >= 2, got {max_frames}")
    return torch.linspace(0, frames - 1, max_frames).round().long()


@dataclass(kw_only=True)
class GeometryEstimate(Geometry):
    """VGGT's reading of one video (S frames at the VGGT resolution h x w): the :class:`Geometry`
    (cameras, world = first camera; depth; confidence) plus which frames VGGT saw."""

    index: torch.Tensor  # [S] frame indices into the video
    frames: torch.Tensor  # [S, 3, h, w] in [0, 1], what VGGT saw


class VGGTGeometry:
    """VGGT-based geometry metrics of single videos (see the module docstring)."""

    def __init__(self, vggt: VGGT, resolution: int = 518, max_frames: int | None = None,
                 conf_percentile: float = 0.0, camera_scale: str = "own", backend: str = "auto") -> None:
        check_geometry_heads(vggt, "VGGTGeometry")
        if resolution % 14 or resolution < 14:
            raise ValueError(f"resolution must be a positive multiple of 14, got {resolution}")
        if not 0.0 <= conf_percentile < 100.0:
            raise ValueError(f"conf_percentile must be in [0, 100), got {conf_percentile}")
        if camera_scale not in SCALE_MODES:
            raise ValueError(f"camera_scale must be one of {SCALE_MODES}, got {camera_scale!r}")
        self.vggt = vggt.eval().requires_grad_(False)
        self.resolution, self.max_frames = resolution, max_frames
        self.conf_percentile, self.camera_scale, self.backend = conf_percentile, camera_scale, backend

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, device: str | torch.device = "cpu",
                        **kwargs) -> VGGTGeometry:
        """VGGT from a local file / directory or a hub id (e.g. ``facebook/VGGT-1B``)."""
        return cls(VGGT.from_pretrained(source, device=device), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.vggt.parameters()).device

    @torch.inference_mode()
    def estimate(self, video: torch.Tensor) -> GeometryEstimate:
        """Cameras and depth of ``video [T, 3, H, W]`` in [0, 1] (float or uint8)."""
        if video.ndim != 4 or video.shape[1] != 3:
            raise ValueError(f"video must be [T, 3, H, W], got {tuple(video.shape)}")
        index = frame_subset(video.shape[0], self.max_frames)
        frames = video[index]
        frames = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float().clamp(0, 1)
        images = preprocess_images(list(frames.cpu()), mode="crop", target_size=self.resolution).to(self.device)
        geometry = estimate_geometry(self.vggt, images)
        return GeometryEstimate(index=index, frames=images.float(),
                                **{f.name: getattr(geometry, f.name) for f in fields(Geometry)})

    def reprojection(self, estimate: GeometryEstimate) -> dict[str, torch.Tensor | float]:
        """``{"score", "per_frame_mse" [S], "coverage" [S]}`` of one estimated video."""
        conf = estimate.conf
        threshold = 0.0
        if self.conf_percentile > 0:
            threshold = float(torch.quantile(conf.flatten().float(), self.conf_percentile / 100.0))
        out = reprojection_error(estimate.frames, estimate.depth, conf, estimate.extrinsics, estimate.intrinsics,
                                 conf_threshold=threshold, backend=self.backend)
        mse = out["per_frame_mse"].float().cpu()
        return {"score": float(mse.mean()), "per_frame_mse": mse, "coverage": out["coverage"].float().cpu()}

    def camera_accuracy(self, estimate: GeometryEstimate, extrinsics: torch.Tensor) -> dict[str, float]:
        """RotErr (rad), TransErr, CamMC of the estimate against camera-from-world ``extrinsics [T, 3, 4|4]``
        of the whole video (the estimate's frame subset is taken from it)."""
        target = extrinsics[estimate.index.to(extrinsics.device)].cpu()
        errors = camera_errors(estimate.extrinsics.cpu(), target, scale=self.camera_scale)
        return {k: float(v) for k, v in errors.items()}

    def video_metrics(self, video: torch.Tensor, extrinsics: torch.Tensor | None = None) -> dict[str, float]:
        """``reproj`` (mean per-frame MSE) and, given the video's cameras, ``rot_err``, ``trans_err``, ``cammc``."""
        estimate = self.estimate(video)
        metrics = {"reproj": float(self.reprojection(estimate)["score"])}
        if extrinsics is not None:
            metrics.update(self.camera_accuracy(estimate, extrinsics))
        return metrics
