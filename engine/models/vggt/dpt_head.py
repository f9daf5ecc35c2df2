"""VGGT DPT head: dense depth / point maps (or track features) from four aggregator outputs.

Reproduces ``vggt/heads/dpt_head.py`` + ``vggt/heads/utils.py`` (parameter names ``norm, projects.i,
resize_layers.{0,1,3}, scratch.layer{1-4}_rn, scratch.refinenet{1-4}.{out_conv, resConfUnit1,
resConfUnit2}.conv{1,2}, scratch.output_conv1, scratch.output_conv2.{0,2}``). Official behaviour:

- for each of ``intermediate_layer_idx``: patch tokens (from ``patch_start_idx``) -> shared ``norm`` ->
  ``[N, C, h, w]`` grid -> 1x1 ``projects[i]`` -> (+ UV positional embedding) -> ``resize_layers[i]``
  (ConvTranspose 4x, ConvTranspose 2x, identity, 3x3 conv stride 2);
- RefineNet fusion from coarse to fine: ``refinenet4`` (no residual input) to the size of level 3, then
  ``refinenet3``/``refinenet2`` to the next level's size, ``refinenet1`` by a factor 2; bilinear with
  ``align_corners=True`` throughout, then ``output_conv1``;
- the residual conv units use an **in-place** ReLU on their input, so their skip connection adds
  ``relu(x)``, not ``x`` (reproduced explicitly below);
- bilinear (``align_corners=True``) resize to ``(h * p / down_ratio, w * p / down_ratio)``, + UV embedding,
  then either the features (``feature_only``) or ``output_conv2`` + :func:`activate_head`;
- UV embedding: a grid spanning ``+-aspect/diag * (n-1)/n`` (MoGe convention, aspect = W/H of the image),
  sin/cos of each coordinate with ``omega_0 = 100`` computed in float64, times 0.1;
- frames can be processed in chunks (``frames_chunk_size``, official default 8) to bound memory.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .activations import CONF_ACTIVATIONS, DENSE_ACTIVATIONS, activate_head

_INTERP_MAX_ELEMENTS = 1610612736  # official ``custom_interpolate`` chunking threshold


def interpolate(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, ``align_corners=True``; split along the batch when the output would exceed INT_MAX."""
    n = size[0] * size[1] * x.shape[0] * x.shape[1]
    if n > _INTERP_MAX_ELEMENTS:
        chunks = torch.chunk(x, n // _INTERP_MAX_ELEMENTS + 1, dim=0)
        return torch.cat([F.interpolate(c, size=size, mode="bilinear", align_corners=True)
                          for c in chunks], dim=0)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def uv_grid(width: int, height: int, aspect_ratio: float, dtype=None, device=None) -> torch.Tensor:
    """``[height, width, 2]`` (u, v) grid normalised so the image diagonal spans unit half-length."""
    diag = (aspect_ratio ** 2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    xs = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, steps=width,
                        dtype=dtype, device=device)
    ys = torch.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, steps=height,
                        dtype=dtype, device=device)
    uu, vv = torch.meshgrid(xs, ys, indexing="xy")
    return torch.stack([uu, vv], dim=-1)


def sincos_embed(pos: torch.Tensor, dim: int, omega_0: float = 100.0) -> torch.Tensor:
    """``[M] -> [M, dim]`` = ``[sin(pos * w), cos(pos * w)]``, ``w_i = omega_0 ** (-i / (dim/2))``, in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / omega_0 ** omega
    out = torch.outer(pos.reshape(-1).to(torch.float64), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def uv_pos_embed(x: torch.Tensor, width: int, height: int, ratio: float = 0.1) -> torch.Tensor:
    """``x [N, C, h, w] + ratio * embed(uv grid of (h, w), aspect W/H)`` (u in the first C/2 channels)."""
    h, w, c = x.shape[-2], x.shape[-1], x.shape[1]
    grid = uv_grid(w, h, aspect_ratio=width / height, dtype=x.dtype, device=x.device).reshape(-1, 2)
    emb = torch.cat([sincos_embed(grid[:, 0], c // 2), sincos_embed(grid[:, 1], c // 2)], dim=-1)
    emb = (emb.view(h, w, c) * ratio).permute(2, 0, 1)[None]
    return x + emb


class ResidualConvUnit(nn.Module):
    """``conv2(relu(conv1(relu(x)))) + relu(x)`` (the official in-place ReLU rewrites the skip input)."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    """``out_conv(resize(rcu2(x + rcu1(skip))))``; without ``has_residual`` the skip input is absent."""

    def __init__(self, features: int, has_residual: bool = True):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        self.resConfUnit1 = ResidualConvUnit(features) if has_residual else None
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.resConfUnit1 is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = interpolate(x, size if size is not None else (x.shape[-2] * 2, x.shape[-1] * 2))
        return self.out_conv(x)


class DPTHead(nn.Module):
    """``forward(tokens_list, image_hw, patch_start_idx)`` -> ``(pred [B,S,H,W,C-1], conf [B,S,H,W])``,
    or features ``[B, S, features, H/down, W/down]`` when ``feature_only``."""

    def __init__(self, dim_in: int, patch_size: int = 14, output_dim: int = 4, activation: str = "inv_log",
                 conf_activation: str = "expp1", features: int = 256,
                 out_channels: Sequence[int] = (256, 512, 1024, 1024),
                 intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23), pos_embed: bool = True,
                 feature_only: bool = False, down_ratio: int = 1):
        super().__init__()
        if len(out_channels) != 4 or len(intermediate_layer_idx) != 4:
            raise ValueError("DPT head needs exactly 4 out_channels and 4 intermediate_layer_idx, got "
                             f"{list(out_channels)} and {list(intermediate_layer_idx)}")
        if not feature_only and activation not in DENSE_ACTIVATIONS:
            raise ValueError(f"DPT head activation must be one of {DENSE_ACTIVATIONS}, got {activation!r}")
        if not feature_only and conf_activation not in CONF_ACTIVATIONS:
            raise ValueError(f"DPT head conf_activation must be one of {CONF_ACTIVATIONS}, "
                             f"got {conf_activation!r}")
        self.patch_size = patch_size
        self.activation, self.conf_activation = activation, conf_activation
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self.intermediate_layer_idx = list(intermediate_layer_idx)
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, oc, kernel_size=1) for oc in out_channels])
        oc = out_channels
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = nn.Module()
        for i, channels in enumerate(oc, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(channels, features, 3, padding=1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        if feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(32, output_dim, kernel_size=1))

    def forward(self, aggregated_tokens_list: Sequence[torch.Tensor | None], image_hw: tuple[int, int],
                patch_start_idx: int, frames_chunk_size: int | None = 8):
        """``aggregated_tokens_list[i]``: ``[B, S, P', C]`` (only ``intermediate_layer_idx`` are read);
        ``image_hw``: the input image size ``(H, W)``."""
        s = aggregated_tokens_list[self.intermediate_layer_idx[0]].shape[1]
        if frames_chunk_size is None or frames_chunk_size >= s:
            return self._forward_frames(aggregated_tokens_list, image_hw, patch_start_idx, 0, s)
        if frames_chunk_size <= 0:
            raise ValueError(f"frames_chunk_size must be positive or None, got {frames_chunk_size}")
        parts = [self._forward_frames(aggregated_tokens_list, image_hw, patch_start_idx, start,
                                      min(start + frames_chunk_size, s))
                 for start in range(0, s, frames_chunk_size)]
        if self.feature_only:
            return torch.cat(parts, dim=1)
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

    def _forward_frames(self, tokens_list, image_hw, patch_start_idx: int, start: int, end: int):
        height, width = image_hw
        ph, pw = height // self.patch_size, width // self.patch_size
        levels = []
        b = tokens_list[self.intermediate_layer_idx[0]].shape[0]
        for i, layer in enumerate(self.intermediate_layer_idx):
            x = tokens_list[layer][:, start:end, patch_start_idx:]
            x = self.norm(x.reshape(b * (end - start), -1, x.shape[-1]))
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], ph, pw)
            x = self.projects[i](x)
            if self.pos_embed:
                x = uv_pos_embed(x, width, height)
            levels.append(self.resize_layers[i](x))
        out = self._fuse(levels)
        out = interpolate(out, (int(ph * self.patch_size / self.down_ratio),
                                int(pw * self.patch_size / self.down_ratio)))
        if self.pos_embed:
            out = uv_pos_embed(out, width, height)
        if self.feature_only:
            return out.view(b, end - start, *out.shape[1:])
        pred, conf = activate_head(self.scratch.output_conv2(out), self.activation, self.conf_activation)
        return pred.view(b, end - start, *pred.shape[1:]), conf.view(b, end - start, *conf.shape[1:])

    def _fuse(self, levels: list[torch.Tensor]) -> torch.Tensor:
        sc = self.scratch
        l1, l2, l3, l4 = (getattr(sc, f"layer{i}_rn")(x) for i, x in enumerate(levels, start=1))
        out = sc.refinenet4(l4, size=l3.shape[2:])
        out = sc.refinenet3(out, l3, size=l2.shape[2:])
        out = sc.refinenet2(out, l2, size=l1.shape[2:])
        out = sc.refinenet1(out, l1)
        return sc.output_conv1(out)
