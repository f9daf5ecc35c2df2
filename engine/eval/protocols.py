"""The evaluation protocols of ``geoforge-eval`` (Geometry Forcing / DFoT, methods.md §1-2).

- ``short16``: 16-frame videos from 1 ground-truth context frame and the clip's cameras; one window
  (history guidance ``stabilized_vanilla`` 4.0 / 0.02 as in GF's scripts; with no generated history
  this is plain HG-v 4.0). Metrics against ground truth: FVD, FID, PSNR, SSIM, LPIPS on the
  non-context frames; VGGT reprojection consistency and camera accuracy.
- ``long256``: 256 frames from 1 context frame, keyframes first (density 1/16, prediction
  ``stabilized_vanilla`` 4.0 / 0.02), then interpolation (``vanilla`` 1.5): GF's
  ``scripts/eval_geometry_forcing.sh``. Same metrics, plus per-frame-index curves.
- ``rotation360``: 16 frames whose cameras rotate the first test camera about its own y axis by
  ``linspace(0, 2 pi, 16)`` with the camera centre fixed (GF's ``realestate10k_rotate.py``); context 1.
  No ground truth beyond frame 0: the revisit error (first vs last frame: PSNR, SSIM, LPIPS, and the
  FID between the sets of first and last frames), reprojection consistency and camera accuracy
  against the rotation.

Guidance levels (``stabilization``, ``fraction``) are flow times for the DiT; for DFoT's U-ViT3D
(``model.arch: uvit3d``) ``engine.eval.run`` reads them in DFoT's units, as GF's scripts give them
(:func:`engine.eval.run.dfot_guidance`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from geoforge.engine.sampling import Guidance


@dataclass(frozen=True)
class Protocol:
    name: str
    frames: int
    context: int = 1
    num_videos: int = 100
    frame_skip: int = 1
    keyframe_density: float | None = None
    guidance: Guidance = field(default_factory=lambda: Guidance.named("stabilized_vanilla", 4.0, 0.02))
    interpolation_guidance: Guidance = field(default_factory=lambda: Guidance.named("vanilla", 1.5))
    rotation: bool = False  # replace the clip's cameras by a 360-degree turn about the first camera


PROTOCOLS: dict[str, Protocol] = {
    "short16": Protocol("short16", frames=16),
    "long256": Protocol("long256", frames=256, keyframe_density=1 / 16),
    "rotation360": Protocol("rotation360", frames=16, num_videos=1000, rotation=True),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def rotation_extrinsics(first: torch.Tensor, frames: int, turns: float = 1.0) -> torch.Tensor:
    """Camera-from-world ``[frames, 3, 4]``: camera 0 = ``first [3, 4]`` turned about its own y axis.

    Frame i is rotated by ``theta_i = linspace(0, 2 pi turns, frames)[i]`` with the camera centre
    fixed: ``E_i = [R_y(theta_i)^T R_0 | R_y(theta_i)^T t_0]``, so the last frame of a full turn
    looks where the first one does.
    """
    if first.shape != (3, 4):
        raise ValueError(f"first must be one camera-from-world [3, 4], got {tuple(first.shape)}")
    theta = torch.linspace(0.0, 2 * math.pi * turns, frames, dtype=torch.float64)
    c, s = theta.cos(), theta.sin()
    zero, one = torch.zeros_like(theta), torch.ones_like(theta)
    r_y = torch.stack([torch.stack([c, zero, s], -1), torch.stack([zero, one, zero], -1),
                       torch.stack([-s, zero, c], -1)], -2)  # [frames, 3, 3]
    e0 = first.to(torch.float64)
    out = r_y.transpose(-1, -2) @ e0
    return out.to(first.dtype)
