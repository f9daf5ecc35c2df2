"""Noise-level and camera embeddings of DFoT's U-ViT3D, with DFoT's parameter names.

- :class:`NoiseEmbedding` (``noise_level_pos_embedding``): per-frame noise input ``[B, T]`` (DFoT's
  continuous diffusion feeds ``0.125 * logSNR``) -> features -> ``linear_1 -> SiLU -> linear_2``
  (diffusers' ``TimestepEmbedding``). Features: EDM2's Fourier embedding
  ``sqrt(2) cos(x freqs + phases)`` with the random ``freqs ~ 2 pi N(0, 1)``, ``phases ~ 2 pi U(0, 1)``
  kept as persistent buffers (they are in the released state dicts), computed in float32 (float64
  stays float64); or, without Fourier, the sinusoidal ``[cos, sin]`` (flip_sin_to_cos, no shift).
- :class:`PoseEmbedding` (``external_cond_embedding``): the ray condition ``[B, T, 180, H, W]`` patch-
  embedded by a conv (kernel = stride = patch) to ``[B, T, E, H / p, W / p]``; during training a whole
  clip's embedding is zeroed with probability ``dropout`` (DFoT's ``RandomEmbeddingDropout``), unless a
  boolean ``mask [B]`` chooses the clips to zero (pose classifier-free guidance at inference; GeoForge's
  trainer also passes its seeded draw in training).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from geoforge.engine.models.uvit3d.blocks import Conv


class _MLP(nn.Module):
    """diffusers ``TimestepEmbedding(in, out)``: ``linear_1 -> SiLU -> linear_2``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class FourierFeatures(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(dim))
        self.register_buffer("phases", 2 * math.pi * torch.rand(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        y = x.to(dtype)[..., None] * self.freqs.to(dtype) + self.phases.to(dtype)
        return y.cos() * math.sqrt(2)


class SinusoidalFeatures(nn.Module):
    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        self.dim, self.max_period = dim, max_period

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
        args = x.float()[..., None] * freqs
        return torch.cat([args.cos(), args.sin()], dim=-1)


class NoiseEmbedding(nn.Module):
    def __init__(self, freq_dim: int, emb_dim: int, fourier: bool = True):
        super().__init__()
        self.timesteps = FourierFeatures(freq_dim) if fourier else SinusoidalFeatures(freq_dim)
        self.embedding = _MLP(freq_dim, emb_dim)

    def forward(self, noise_levels: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.timesteps(noise_levels).to(self.embedding.linear_1.weight.dtype))


class PoseEmbedding(nn.Module):
    def __init__(self, cond_dim: int, emb_dim: int, patch_size: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.patch_embedder = Conv(nn.Conv2d(cond_dim, emb_dim, kernel_size=patch_size, stride=patch_size))

    def drop_mask(self, b: int, device: torch.device, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The clips whose pose is dropped (bool ``[B]``) or None: ``mask`` if given (seeded by the trainer, or
        guidance at inference), else a random draw with probability ``dropout`` in training."""
        if mask is None and self.training and self.dropout > 0:
            mask = torch.rand(b, device=device) < self.dropout
        if mask is not None:
            if mask.shape != (b,):
                raise ValueError(f"external_cond_mask must be a bool tensor [B] = [{b}], got {tuple(mask.shape)}")
            mask = mask.to(device=device, dtype=torch.bool)
        return mask

    def forward(self, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``cond [B, T, C, H, W]`` -> ``[B, T, E, H / p, W / p]``; ``mask [B]`` True = drop the clip's pose."""
        b, t = cond.shape[:2]
        emb = self.patch_embedder(cond.flatten(0, 1)).unflatten(0, (b, t))
        mask = self.drop_mask(b, emb.device, mask)
        if mask is not None:
            emb = emb * (~mask).to(emb.dtype)[:, None, None, None, None]
        return emb
