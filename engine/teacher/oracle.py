"""An oracle Geometry Forcing teacher for data with known geometry (synthetic scenes): features that are a
fixed function of the true depth and cameras, to test the alignment mechanism without a trained VGGT.

Per pixel of every frame: the world point ``X`` (unprojected from the true depth with the clip's
intrinsics and camera-from-world extrinsics, which the data gives relative to frame 0, so X is in frame
0's camera) and the log depth; ``c = (X / scale, log depth)`` (4 values) and its Fourier features

    feat = [c, sin(2^k pi c / 2), cos(2^k pi c / 2) for k = 0 .. freqs - 1]      (4 + 8 freqs channels)

area-pooled (mean over the pixels of a cell) to the teacher grid ``teacher.resolution / 14`` squared, the
grid a VGGT would give, ``[B, T, g, g, C]`` float32, under every key of ``teacher.layers``. It needs
the batch's ``depth`` (synthetic clips carry it), ``intrinsics`` and ``extrinsics``; no weights, no
gradient, deterministic. A DiT aligned to it is pushed to encode where each token is in 3D.

``released_size`` (``gf.alignment_form: as_released``): GF's published target instead, built as it builds it
from VGGT's tokens (:func:`engine.objectives.gf_released.released_target`): the ``g*g`` tokens ``[B, T, g*g, C]``
of every layer key resized as an image to ``S x S`` and stacked, ``vggt_released [B, T, L, S, S]``. Its control
without geometry is ``teacher.kind: random`` (:mod:`engine.teacher.random_features`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from geoforge.kernels.reproject import unproject_depth

from geoforge.engine.objectives.gf_released import RELEASED_KEY, released_target
from geoforge.engine.teacher.spec import BATCH_PREFIX, PATCH, TeacherConfig, vggt_key

SCENE_SCALE = 4.0   # metres: the synthetic rooms are 5-8 m wide, so X / 4 is within about [-1, 1]


def oracle_channels(freqs: int) -> int:
    return 4 + 8 * freqs


def geometry_features(depth: torch.Tensor, intrinsics: torch.Tensor, extrinsics: torch.Tensor, freqs: int,
                      grid: int) -> torch.Tensor:
    """``depth [B, T, H, W]``, ``intrinsics [B, T, 3, 3]`` (pixels), ``extrinsics [B, T, 3, 4]`` ->
    ``[B, T, grid, grid, 4 + 8 freqs]`` (module docstring)."""
    b, t, h, w = depth.shape
    depth = depth.float().clamp_min(1e-3)
    points = unproject_depth(depth.flatten(0, 1), extrinsics.float().flatten(0, 1), intrinsics.float().flatten(0, 1),
                             backend="reference")   # [B T, H, W, 3]
    coords = torch.cat([points / SCENE_SCALE, depth.flatten(0, 1)[..., None].log()], dim=-1)   # [N, H, W, 4]
    scales = (2.0 ** torch.arange(freqs, dtype=torch.float32, device=depth.device)) * (math.pi / 2)
    angles = (coords[..., None] * scales).flatten(-2)
    feats = torch.cat([coords, angles.sin(), angles.cos()], dim=-1)   # [N, H, W, C]
    pooled = F.adaptive_avg_pool2d(feats.permute(0, 3, 1, 2), (grid, grid))
    return pooled.permute(0, 2, 3, 1).reshape(b, t, grid, grid, -1).contiguous()


class OracleTeacher:
    """``teacher.kind: oracle``: the teacher call of the train loop (like ``LiveTeacher``), not an nn.Module."""

    def __init__(self, teacher: TeacherConfig, device: torch.device | str = "cpu", released_size: int | None = None):
        self.teacher = teacher
        self.device = torch.device(device)
        self.freqs = teacher.oracle_freqs
        self.grid = teacher.resolution // PATCH
        self.released_size = released_size
        self.keys = [vggt_key(layer) for layer in teacher.layers]
        self.dims = ({RELEASED_KEY: len(self.keys)} if released_size is not None
                     else {k: oracle_channels(self.freqs) for k in self.keys})

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [k for k in ("depth", "intrinsics", "extrinsics") if k not in batch]
        if missing:
            raise KeyError(f"teacher.kind: oracle needs the batch's true geometry; it lacks {missing} "
                           f"(synthetic data carries depth and cameras)")
        frames = self.teacher.aligned_frames(batch["depth"].shape[1])
        feats = geometry_features(batch["depth"][:, :frames].to(self.device),
                                  batch["intrinsics"][:, :frames].to(self.device),
                                  batch["extrinsics"][:, :frames].to(self.device), self.freqs, self.grid)
        if self.released_size is not None:
            tokens = feats.flatten(2, 3)   # [B, T, g*g, C]: the "all tokens" GF resizes as an image
            return {BATCH_PREFIX + RELEASED_KEY: released_target([tokens] * len(self.keys), self.released_size)}
        return {BATCH_PREFIX + key: feats for key in self.keys}


__all__ = ["OracleTeacher", "geometry_features", "oracle_channels"]
