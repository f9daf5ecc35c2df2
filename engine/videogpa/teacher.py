"""Geometry teachers for the 3D-consistency score: frames -> cameras, depth and confidence.

A teacher is any callable ``teacher(images [S, 3, R, R] in [0, 1]) -> Geometry``. Two are provided:

- :class:`VGGTTeacher`: VGGT (``facebook/VGGT-1B`` by hub id or local path, or a random model from a config
  for tests), read by ``engine.models.vggt.estimate_geometry`` (the estimate the eval metrics use too).
- :class:`FixedGeometryTeacher`: returns known geometry for any S frames, e.g. the true cameras and depth of
  a rendered synthetic scene; it makes the score a pure function of the frames (used to check that the score
  ranks a 3D-consistent video above a corrupted copy of it, and to score renders with known geometry).
"""
from __future__ import annotations

import torch
from torch import Tensor

from geoforge.engine.models.vggt.estimate import Geometry, check_geometry_heads, estimate_geometry
from geoforge.engine.precision import network_dtype


class VGGTTeacher:
    """VGGT as the geometry teacher (needs its camera and depth heads)."""

    def __init__(self, model, dtype: torch.dtype | None = None):
        check_geometry_heads(model, "VGGTTeacher")
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.dtype = network_dtype(self.device) if dtype is None else dtype

    @classmethod
    def load(cls, source: str, config: dict | None = None, device: torch.device | str = "cpu",
             seed: int = 0) -> VGGTTeacher:
        """``source``: a hub id / local path for ``VGGT.from_pretrained``, or ``"random"`` for
        ``VGGT.from_config(config)`` initialised from ``seed`` (tests and CPU smoke runs)."""
        from geoforge.engine.models.vggt import VGGT

        if source == "random":
            if config is None:
                raise ValueError("VGGTTeacher.load: 'random' needs a VGGT config")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = VGGT.from_config(config)
            return cls(model.to(device))
        return cls(VGGT.from_pretrained(source, config=config, device=device))

    def __call__(self, images: Tensor) -> Geometry:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"VGGTTeacher: images must be [S, 3, H, W], got {tuple(images.shape)}")
        return estimate_geometry(self.model, images, self.dtype)


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
