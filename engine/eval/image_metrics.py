"""PSNR and SSIM per image (or per video frame).

Inputs are ``[..., C, H, W]`` tensors of the same shape (e.g. images [N, 3, H, W] or video batches
[B, T, 3, H, W]); every leading index is one image, and a metric is computed for each of them.
``reduction`` = ``"none"`` returns the per-image values with the leading shape, ``"mean"`` / ``"sum"``
reduce over all images. Both are computed in float64 (SSIM's E[x²] − E[x]² cancels badly in float32:
~1e-4 relative error on flat images) and returned as float64.

PSNR = 10·log10(L² / MSE) with the MSE over (C, H, W) and L = ``data_range``; identical images give
+inf (so a mean over a set containing one is +inf too).

SSIM follows Wang et al. 2004 as in scikit-image's ``structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=L, channel_axis=...)``: an 11×11 Gaussian window
(σ = 1.5, normalised), K1 = 0.01, K2 = 0.03, local statistics only where the window fits inside the
image ("valid": skimage filters the whole image and then crops the 5-pixel border before averaging,
which keeps exactly these positions), SSIM map averaged over positions and channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("none", "mean", "sum")
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{name}: inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim < 3:
        raise ValueError(f"{name}: inputs must be [..., C, H, W], got shape {tuple(x.shape)}")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, reduction: str = "none") -> torch.Tensor:
    """PSNR in dB of each image of ``x`` vs ``y`` ([..., C, H, W]); +inf where they are identical."""
    _check_pair(x, y, "psnr")
    mse = (x.double() - y.double()).square().mean(dim=(-3, -2, -1))
    return _reduce(10 * torch.log10(data_range ** 2 / mse), reduction)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
                    dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The normalised 1-D Gaussian [size] centred on the middle tap."""
    offsets = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-offsets.square() / (2 * sigma ** 2))
    return (g / g.sum()).to(dtype)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, reduction: str = "none") -> torch.Tensor:
    """Mean SSIM of each image of ``x`` vs ``y`` ([..., C, H, W] with H, W ≥ 11); 1 where identical."""
    _check_pair(x, y, "ssim")
    *lead, c, h, w = x.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    x = x.double().reshape(-1, c, h, w)
    y = y.double().reshape(-1, c, h, w)
    g = gaussian_window(dtype=torch.float64, device=x.device)
    kernel_h = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kernel_w = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions, per channel
        return F.conv2d(F.conv2d(t, kernel_h, groups=c), kernel_w, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return _reduce(ssim_map.mean(dim=(-3, -2, -1)).reshape(lead), reduction)

