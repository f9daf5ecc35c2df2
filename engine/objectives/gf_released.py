"""Geometry Forcing's alignment *as released* (``gf.alignment_form: as_released``), for side-by-side runs.

The published code (``CIntellifusion/GeometryForcing`` @ bf86144, ``external/vggt_alignment_loss.py`` and
``external/alignment_projector.py``; research notes §1) aligns differently from GeoForge's per-token form:

- **target**: every requested VGGT aggregator output ``[B, T, N, 2C]`` (all N tokens, camera and register
  tokens included; VGGT-1B: 1374 x 2048) is resized *as an image* (bilinear, ``align_corners=False``; T acts as
  the channel axis) to ``S x S`` (GF: 512); the L layers are stacked as channels: ``[B, T, L, S, S]``
  (:func:`released_target`). Tokens and channels are mixed - the issue GF's authors acknowledged (#4).
- **projector** (``ConvProjector``, per frame on the U-ViT map ``[BT, C, h, w]``): conv3x3 C->m, ReLU,
  conv3x3 m->m, ReLU, AdaptiveAvgPool2d(S) (an ~S/h x nearest upsampling), conv1x1 m->L (GF: m = 128).
- **angular**: ``p`` and ``y`` flattened to ``[BT, L, S^2]`` and L2-normalised over the S^2 plane (not over
  channels); ``L_ang = sum over the BT frames of mean_{l, s}(-p_hat y_hat)`` (a sum over frames, not a mean).
- **scale**: ``g`` = conv1x1 L->m, ReLU, conv1x1 m->L on the normalised ``p_hat``; ``L_scale = MSE(g(p_hat), y)``
  (mean over all elements, against the unnormalised target).
- **total**: GF adds ``alignment_coeff * (L_ang + unormalize_lambda * L_scale)`` (script: 0.1 and 1.0). Here
  ``gf.angular_weight`` = alignment_coeff and ``gf.scale_weight`` = alignment_coeff x unormalize_lambda
  (GF's values: 0.1 / 0.1).

Note (from the released code, for whoever compares): GF's ``configure_optimizers`` (dfot_video.py) optimises
``diffusion_model.parameters()`` only, so its projector and scale head never train, and its
``on_save_checkpoint`` keeps only ``diffusion_model.model*`` keys, so the released checkpoints cannot
contain them. GeoForge trains them (they are part of the trained module).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RELEASED_KEY = "vggt_released"   # teacher feature key of the stacked, resized layers [B, T, L, S, S]


def released_target(layers: list[torch.Tensor], size: int) -> torch.Tensor:
    """VGGT aggregator outputs ``[B, T, N, C2]`` (all tokens) -> ``[B, T, L, size, size]`` as GF builds it."""
    resized = [F.interpolate(t.float(), size=(size, size), mode="bilinear", align_corners=False) for t in layers]
    return torch.stack(resized, dim=2)


class ConvProjector(nn.Module):
    """GF's ``ConvProjector`` (same parameter names): ``[N, C, h, w]`` -> ``[N, L, S, S]``."""

    def __init__(self, in_channels: int, out_channels: int, size: int, mid_channels: int = 128):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(mid_channels, mid_channels, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d((size, size))
        self.channel_reducer = nn.Conv2d(mid_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_reducer(self.pool(self.conv(x)))


class ReleasedAlignment(nn.Module):
    """Projector + scale head of GF's released form; ``forward`` returns ``(L_ang, L_scale)`` unweighted."""

    def __init__(self, in_channels: int, layers: int, size: int, mid_channels: int = 128):
        super().__init__()
        self.size = size
        self.projector = ConvProjector(in_channels, layers, size, mid_channels)
        self.feature_unormalizer = nn.Sequential(nn.Conv2d(layers, mid_channels, 1), nn.ReLU(),
                                                 nn.Conv2d(mid_channels, layers, 1))

    def forward(self, latent: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``latent [BT, C, h, w]`` (the U-ViT map), ``target [BT, L, S, S]`` -> (angular, scale)."""
        p = self.projector(latent)
        if p.shape != target.shape:
            raise ValueError(f"as_released: projection {tuple(p.shape)} vs target {tuple(target.shape)}")
        p_hat = F.normalize(p.flatten(2), p=2, dim=-1)
        y_hat = F.normalize(target.flatten(2).to(p.dtype), p=2, dim=-1)
        angular = (-(p_hat * y_hat)).mean(dim=(1, 2)).sum()
        scale = F.mse_loss(self.feature_unormalizer(p_hat.view_as(p)), target.to(p.dtype))
        return angular, scale


__all__ = ["RELEASED_KEY", "released_target", "ConvProjector", "ReleasedAlignment"]
