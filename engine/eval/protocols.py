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

History guidance is given as GF's / DFoT's scripts give it (:class:`GuidanceSpec`): DFoT's scheme name and
its levels in DFoT's units, whatever the architecture; :meth:`GuidanceSpec.to_guidance` turns them into the
sampler's flow times on the recipe's DFoT schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from geoforge.engine.objectives.dfot_diffusion import DFoTDiffusionConfig
from geoforge.engine.objectives.dfot_velocity import dfot_level_time
from geoforge.engine.sampling import GUIDANCE_NAMES, Guidance
from geoforge.engine.schema import ConfigError


@dataclass(frozen=True)
class GuidanceSpec:
    """History guidance in the user's units: one unit per flag, the same on every architecture.

    ``name``: DFoT's scheme (:data:`engine.sampling.GUIDANCE_NAMES`); ``scale``: the HG-v / HG-f weight w;
    ``stabilization_level`` (``stabilized_*``: the noise level of generated history) and ``freq_scale`` (HG-f:
    the noise level of the fractional history) are DFoT's ``stabilization_level`` / ``freq_scale``, in DFoT's
    units: a fraction of its discrete noise schedule (T = 1000 levels; level ``(k T - 1)``, e.g. 0.02 = level 19,
    logSNR 2.83, flow time 0.196), as the published scripts and papers give them (GF's and DFoT's
    ``stabilization_level=0.02``). Chosen over flow time because these are the numbers a reader of the papers
    and of the released code has; :meth:`to_guidance` converts them, on the recipe's ``dfot`` schedule, into
    the flow times the sampler works in (``engine.objectives.dfot_velocity.dfot_level_time``). Flow time t and
    DFoT's VP path have the same logSNR ``2 log((1 - t) / t)``, so a level is the same noise level on the DiT
    and on the U-ViT3D (for the DiT, whose own diffusion is not DFoT's, the recipe's ``dfot`` section only
    serves this conversion: DFoT's RE10K schedule unless set). ``cond_scale``, ``subsets``,
    ``subset_weights``: as :class:`engine.sampling.Guidance`.
    """

    name: str = "conditional"
    scale: float = 1.0
    stabilization_level: float = 0.0
    freq_scale: float = 0.5
    cond_scale: float = 1.0
    subsets: tuple[tuple[int, ...], ...] = ()
    subset_weights: tuple[float, ...] = ()

    def validate(self) -> None:
        """Raise ConfigError naming the field (and its ``geoforge-eval`` flag) of an invalid setting."""
        if self.name not in GUIDANCE_NAMES:
            raise ConfigError(f"guidance: must be one of {GUIDANCE_NAMES}, got {self.name!r}")
        if not 0.0 <= self.stabilization_level < 1.0:
            raise ConfigError(f"stabilization_level (--stabilization-level): DFoT's noise level, must be in "
                              f"[0, 1), got {self.stabilization_level}")
        if not 0.0 < self.freq_scale < 1.0:
            raise ConfigError(f"freq_scale (--freq-scale): DFoT's noise level, must be in (0, 1), got "
                              f"{self.freq_scale}")

    def to_guidance(self, dfot: DFoTDiffusionConfig | None = None) -> Guidance:
        """The sampler's :class:`Guidance`: the levels as flow times on ``dfot``'s schedule (default: DFoT's
        RE10K one, ``DFoTDiffusionConfig()``)."""
        self.validate()
        dfot = dfot if dfot is not None else DFoTDiffusionConfig()
        fractional = self.name.removeprefix("stabilized_") == "fractional"
        return Guidance.named(self.name, scale=self.scale, cond_scale=self.cond_scale,
                              stabilization=dfot_level_time(dfot, self.stabilization_level),
                              fraction=dfot_level_time(dfot, self.freq_scale) if fractional else Guidance.fraction,
                              subsets=[list(s) for s in self.subsets], subset_weights=list(self.subset_weights))


@dataclass(frozen=True)
class Protocol:
    name: str
    frames: int
    context: int = 1
    num_videos: int = 100
    frame_skip: int = 1
    keyframe_density: float | None = None
    guidance: GuidanceSpec = GuidanceSpec("stabilized_vanilla", 4.0, stabilization_level=0.02)
    interpolation_guidance: GuidanceSpec = GuidanceSpec("vanilla", 1.5)
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
