"""Sampling, correlation and embedding helpers of the VGGT tracker.

Reproduces ``vggt/heads/track_modules/utils.py`` and ``CorrBlock`` of ``blocks.py`` (VGGSfM /
CoTracker lineage). Conventions:

- points are pixel coordinates ``(x, y)`` of a feature map; sampling is bilinear with
  ``align_corners=True`` (``x = 0`` is the centre of the left column, ``x = W - 1`` of the right one);
- the correlation window offsets are built as ``stack(meshgrid(dy, dx, indexing="ij"))`` and **added to
  (x, y)**, so window entry ``[i, j]`` samples ``(x + dy_i, y + dx_j)`` - the official (transposed) layout;
- all sin/cos embeddings are computed exactly as the official helpers (float64 where they use it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bilinear_sampler(inp: torch.Tensor, coords: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Sample ``inp [B, C, H, W]`` at pixel coords ``[B, Ho, Wo, 2]`` (x, y) -> ``[B, C, Ho, Wo]``."""
    h, w = inp.shape[-2:]
    coords = coords.detach().to(device=inp.device, dtype=inp.dtype)
    scale = torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)], device=coords.device, dtype=coords.dtype)
    return F.grid_sample(inp, coords * scale - 1, align_corners=True, padding_mode=padding_mode)


def sample_features4d(inp: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Features of ``inp [B, C, H, W]`` at points ``[B, R, 2]`` -> ``[B, R, C]`` (border padding)."""
    feats = bilinear_sampler(inp, coords.unsqueeze(2))  # [B, C, R, 1]
    return feats.permute(0, 2, 1, 3).reshape(inp.shape[0], -1, feats.shape[1] * feats.shape[3])


def flow_embedding(xy: torch.Tensor, channels: int) -> torch.Tensor:
    """``[B, N, 2] -> [B, N, 2 * channels]``: per coordinate interleaved ``sin, cos`` of ``v * f_i``,
    ``f_i = 2i * 1000 / channels`` (``get_2d_embedding(..., cat_coords=False)``)."""
    div = torch.arange(0, channels, 2, device=xy.device, dtype=xy.dtype) * (1000.0 / channels)
    parts = []
    for v in (xy[..., 0:1], xy[..., 1:2]):
        parts.append(torch.stack([torch.sin(v * div), torch.cos(v * div)], dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = torch.outer(pos.reshape(-1).to(torch.float64), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).to(pos.dtype)


def grid_sincos_embed(dim: int, height: int, width: int) -> torch.Tensor:
    """``[1, dim, height, width]`` MAE-style 2D sin/cos embedding: x in the first ``dim/2`` channels."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                            torch.arange(width, dtype=torch.float32), indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, xs), _sincos_1d(dim // 2, ys)], dim=1)
    return emb.reshape(1, height, width, dim).permute(0, 3, 1, 2)


class CorrBlock:
    """Multi-scale correlation of track features with all positions of every frame.

    ``fmaps [B, S, C, H, W]``; level ``l`` is ``avg_pool2d`` by ``2**l``. :meth:`corr_sample` returns
    ``[B, S, N, levels * (2r+1)**2]``: ``<target, fmap> / sqrt(C)`` sampled (zero padding) in a
    ``(2r+1)^2`` window around ``coords / 2**l``.
    """

    def __init__(self, fmaps: torch.Tensor, num_levels: int = 4, radius: int = 4):
        self.radius = radius
        self.pyramid = [fmaps]
        for _ in range(num_levels - 1):
            b, s, c, h, w = self.pyramid[-1].shape
            pooled = F.avg_pool2d(self.pyramid[-1].reshape(b * s, c, h, w), kernel_size=2, stride=2)
            self.pyramid.append(pooled.reshape(b, s, c, *pooled.shape[-2:]))
        d = torch.linspace(-radius, radius, 2 * radius + 1, device=fmaps.device, dtype=fmaps.dtype)
        self.delta = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1)  # [2r+1, 2r+1, 2]

    def corr_sample(self, targets: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """``targets [B, S, N, C]``, ``coords [B, S, N, 2]`` (level-0 pixels) -> ``[B, S, N, L]``."""
        b, s, n, _ = targets.shape
        side = 2 * self.radius + 1
        out = []
        for level, fmaps in enumerate(self.pyramid):
            c, h, w = fmaps.shape[2:]
            corrs = torch.matmul(targets, fmaps.view(b, s, c, h * w)) / math.sqrt(c)
            centroid = coords.reshape(b * s * n, 1, 1, 2) / (2 ** level)
            window = centroid + self.delta.to(coords.device, coords.dtype).view(1, side, side, 2)
            sampled = bilinear_sampler(corrs.reshape(b * s * n, 1, h, w), window, padding_mode="zeros")
            out.append(sampled.view(b, s, n, -1))
        return torch.cat(out, dim=-1).contiguous()
