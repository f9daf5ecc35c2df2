"""Fréchet distance between Gaussians fitted to network features, and the FID / FVD wrappers.

    d² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½

``tr (Σ₁^½ Σ₂ Σ₁^½)^½`` equals ``tr (Σ₁ Σ₂)^½`` (the same eigenvalues), but the first form is a
symmetric positive semi-definite matrix, so both square roots come from ``eigh`` in float64 with
eigenvalues clamped at 0. There is no imaginary part to discard (unlike ``scipy.linalg.sqrtm`` of
the non-symmetric Σ₁Σ₂ used by pytorch-fid / StyleGAN-V) and singular or rank-deficient covariances
(fewer samples than feature dimensions, constant features) stay finite and non-negative.

Statistics follow pytorch-fid / StyleGAN-V: mean and unbiased (N − 1) covariance of [N, D] features.
``fid`` and ``fvd`` run an extractor (``engine.eval.inception.FIDInceptionV3``,
``engine.eval.i3d.FVDExtractor`` or any callable mapping a batch to [b, D]) over both sets in batches.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

Stats = tuple[torch.Tensor, torch.Tensor]
Extractor = Callable[[torch.Tensor], torch.Tensor]
Batches = torch.Tensor | Iterable[torch.Tensor]


def _as_float64(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def feature_statistics(features: torch.Tensor | np.ndarray) -> Stats:
    """Mean [D] and unbiased covariance [D, D] (float64) of ``features`` [N, D], N ≥ 2."""
    f = _as_float64(features, "features")
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {tuple(f.shape)}")
    mu = f.mean(dim=0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(sym: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix; negative round-off eigenvalues are clamped to 0."""
    values, vectors = torch.linalg.eigh(sym)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor | np.ndarray, sigma1: torch.Tensor | np.ndarray,
                     mu2: torch.Tensor | np.ndarray, sigma2: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); mu [D], sigma [D, D]."""
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    s1, s2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes must be mu [D], sigma [D, D] for one D; got mu1 {tuple(mu1.shape)}, "
                         f"sigma1 {tuple(s1.shape)}, mu2 {tuple(mu2.shape)}, sigma2 {tuple(s2.shape)}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    root1 = _psd_sqrt(s1)
    inner = root1 @ s2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * trace_sqrt
    # d² ≥ 0 exactly; only round-off (~1e-12 · tr Σ) can push it below.
    return max(value.item(), 0.0)


def frechet_distance_from_features(features1: torch.Tensor | np.ndarray,
                                   features2: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def _device_of(extractor: Extractor) -> torch.device | None:
    if isinstance(extractor, torch.nn.Module):
        for p in extractor.parameters():
            return p.device
    return None


@torch.no_grad()
def extract_features(data: Batches, extractor: Extractor, batch_size: int = 32) -> torch.Tensor:
    """Run ``extractor`` over ``data`` and stack its outputs as float64 [N, D] on the CPU.

    ``data`` is one tensor [N, ...] (split into ``batch_size`` chunks) or an iterable of batch
    tensors (e.g. a DataLoader); each batch is moved to the extractor's device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = data.split(batch_size) if isinstance(data, torch.Tensor) else data
    device = _device_of(extractor)
    outputs = []
    for batch in batches:
        out = extractor(batch.to(device) if device is not None else batch)
        if out.ndim != 2 or out.shape[0] != batch.shape[0]:
            raise ValueError(f"extractor must return [batch, D] features, got {tuple(out.shape)} "
                             f"for a batch of {batch.shape[0]}")
        outputs.append(out.detach().to("cpu", torch.float64))
    if not outputs:
        raise ValueError("no data given to extract features from")
    return torch.cat(outputs)


def fid(real_images: Batches, fake_images: Batches, extractor: Extractor, batch_size: int = 50) -> float:
    """FID between two image sets [N, 3, H, W] in [0, 1] (or iterables of such batches)."""
    return frechet_distance_from_features(extract_features(real_images, extractor, batch_size),
                                          extract_features(fake_images, extractor, batch_size))


def fvd(real_videos: Batches, fake_videos: Batches, extractor: Extractor, batch_size: int = 16) -> float:
    """FVD between two video sets [N, T, 3, H, W] in [0, 1] (or iterables of such batches)."""
    return frechet_distance_from_features(extract_features(real_videos, extractor, batch_size),
                                          extract_features(fake_videos, extractor, batch_size))
