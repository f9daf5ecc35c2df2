"""Geometry teachers for the 3D-consistency score: frames -> cameras, depth and confidence.

A teacher is any callable ``teacher(images [S, 3, R, R] in [0, 1]) -> Geometry``. Two are provided:

- :class:`VGGTTeacher`: VGGT (``facebook/VGGT-1B`` by hub id or local path, or a random model from a config
  for tests). ``pose_enc`` becomes camera-from-world extrinsics and pixel intrinsics
  (``pose_encoding_to_extri_intri``), ``depth``/``depth_conf`` the depth maps and their confidence. Runs
  under ``torch.inference_mode`` with bf16 autocast on CUDA (VGGT's recommendation), float32 on CPU.
- :class:`FixedGeometryTeacher`: returns known geometry for any S frames, e.g. the true cameras and depth of
  a rendered synthetic scene; it makes the score a pure function of the frames (used to check that the score
  ranks a 3D-consistent video above a corrupted copy of it, and to score renders with known geometry).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Geometry:
    """Per-frame cameras and depth at the teacher resolution (float32)."""

    extrinsics: Tensor   # [S, 3, 4] camera-from-world (OpenCV)
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


class VGGTTeacher:
    """VGGT as the geometry teacher (needs its camera and depth heads)."""

    def __init__(self, model, dtype: torch.dtype | None = None):
        if model.camera_head is None or model.depth_head is None:
            raise ValueError("VGGTTeacher: the VGGT model needs its camera_head and depth_head")
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        if dtype is None:
            cuda = self.device.type == "cuda"
            dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
        self.dtype = dtype

    @classmethod
    def load(cls, source: str, config: dict | None = None, device: torch.device | str = "cpu",
             seed: int = 0) -> VGGTTeacher:
        """``source``: a hub id / local path for ``VGGT.from_pretrained``, or ``"random"`` for
        ``VGGT.from_config(config)`` initialised from ``seed`` (tests and CPU smoke runs)."""
        from engine.models.vggt import VGGT

        if source == "random":
            if config is None:
                raise ValueError("VGGTTeacher.load: 'random' needs a VGGT config")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = VGGT.from_config(config)
            return cls(model.to(device))
        return cls(VGGT.from_pretrained(source, config=config, device=device))

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Geometry:
        from engine.models.vggt import pose_encoding_to_extri_intri

        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"VGGTTeacher: images must be [S, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        with torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.model(images.to(self.device)[None])
        extrinsics, intrinsics = pose_encoding_to_extri_intri(out["pose_enc"].float(), (height, width))
        return Geometry(extrinsics[0].float(), intrinsics[0].float(), out["depth"][0, ..., 0].float(),
                        out["depth_conf"][0].float())


class FixedGeometryTeacher:
    """Returns the same geometry whatever the frames (e.g. a synthetic scene's true cameras and depth)."""

    def __init__(self, geometry: Geometry):
        self.geometry = geometry
        self.device = geometry.depth.device

    def __call__(self, images: Tensor) -> Geometry:
        s, _, h, w = images.shape
        self.geometry.check(s, h, w, "FixedGeometryTeacher")
        return self.geometry


__all__ = ["Geometry", "VGGTTeacher", "FixedGeometryTeacher"]
