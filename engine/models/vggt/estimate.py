"""The one geometry estimate from VGGT: frames -> cameras, depth, confidence (and world points).

Used by the VideoGPA 3D-consistency score (``engine.videogpa.teacher``) and by the eval geometry metrics
(``engine.eval.geometry``). The frames are one multi-view sequence; ``pose_enc`` becomes camera-from-world
extrinsics and pixel intrinsics (``pose_encoding_to_extri_intri``), ``depth`` / ``depth_conf`` the depth maps
and their confidence. Runs under ``torch.inference_mode`` and the process precision's autocast
(``engine.precision.network_dtype``: bf16 where it is native, fp16 on a CUDA device without bf16; the heads in
float32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from geoforge.engine.precision import network_dtype

from .pose_encoding import pose_encoding_to_extri_intri


@dataclass
class Geometry:
    """Per-frame cameras and depth at the resolution of the frames VGGT saw (float32)."""

    extrinsics: Tensor   # [S, 3, 4] camera-from-world (OpenCV; world = first camera for VGGT)
    intrinsics: Tensor   # [S, 3, 3] pixels
    depth: Tensor        # [S, H, W] z in the camera
    conf: Tensor         # [S, H, W] larger = more confident

    def check(self, frames: int, height: int, width: int, where: str) -> None:
        want = {"extrinsics": (frames, 3, 4), "intrinsics": (frames, 3, 3), "depth": (frames, height, width),
                "conf": (frames, height, width)}
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{where}: {name} must be {shape}, got {got}")

    def points(self, backend: str = "auto") -> Tensor:
        """Every pixel's world point ``[S, H, W, 3]`` (depth unprojected with the cameras)."""
        from .geometry import unproject_depth_map_to_point_map

        return unproject_depth_map_to_point_map(self.depth, self.extrinsics, self.intrinsics, backend=backend)


def check_geometry_heads(model, where: str) -> None:
    if model.camera_head is None or model.depth_head is None:
        raise ValueError(f"{where}: the VGGT model needs its camera_head and depth_head")


@torch.inference_mode()
def estimate_geometry(model, images: Tensor, dtype: torch.dtype | None = None) -> Geometry:
    """VGGT's cameras, depth and confidence of ``images [S, 3, H, W]`` in [0, 1] (one sequence; H, W
    multiples of 14), as float32 on the model's device. ``dtype``: autocast dtype (default
    ``engine.precision.network_dtype``; float32 runs without autocast)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"estimate_geometry: images must be [S, 3, H, W], got {tuple(images.shape)}")
    check_geometry_heads(model, "estimate_geometry")
    device = next(model.parameters()).device
    dtype = network_dtype(device) if dtype is None else dtype
    height, width = images.shape[-2:]
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(images.to(device)[None])
    extrinsics, intrinsics = pose_encoding_to_extri_intri(out["pose_enc"].float(), (height, width))
    return Geometry(extrinsics[0].float(), intrinsics[0].float(), out["depth"][0, ..., 0].float(),
                    out["depth_conf"][0].float())


__all__ = ["Geometry", "check_geometry_heads", "estimate_geometry"]
