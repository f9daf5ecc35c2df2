"""PSNR / SSIM against numpy re-implementations written here and closed-form cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geoforge.engine.eval.image_metrics import gaussian_window, psnr, ssim


def _numpy_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Wang et al. SSIM of [C, H, W] float64 arrays: 11x11 Gaussian (sigma 1.5), valid window
    positions, population (co)variances, mean over positions and channels (skimage's settings)."""
    offsets = np.arange(11) - 5
    g = np.exp(-offsets ** 2 / (2 * 1.5 ** 2))
    w2 = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for xc, yc in zip(x, y):
        h, w = xc.shape
        for i in range(h - 10):
            for j in range(w - 10):
                px, py = xc[i:i + 11, j:j + 11], yc[i:i + 11, j:j + 11]
                mx, my = (w2 * px).sum(), (w2 * py).sum()
                vx, vy = (w2 * (px - mx) ** 2).sum(), (w2 * (py - my) ** 2).sum()
                cxy = (w2 * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_gaussian_window_matches_skimage_settings() -> None:
    g = gaussian_window().double().numpy()
    # skimage: scipy gaussian_filter(sigma=1.5, truncate=3.5) -> radius 5, weights exp(-k^2 / 2 sigma^2).
    k = np.arange(-5, 6)
    ref = np.exp(-k ** 2 / 4.5)
    np.testing.assert_allclose(g, ref / ref.sum(), rtol=1e-6)


def test_ssim_matches_numpy_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 19, generator=gen, dtype=torch.float64)
    y = (x + 0.15 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    got = ssim(x, y)
    assert got.shape == (2,)
    for b in range(2):
        assert got[b].item() == pytest.approx(_numpy_ssim(x[b].numpy(), y[b].numpy()), abs=1e-10)
    assert got.dtype == torch.float64
    torch.testing.assert_close(ssim(x.float(), y.float()), got, atol=1e-6, rtol=0)  # float32 inputs


def test_ssim_known_cases() -> None:
    x = torch.rand(3, 12, 12)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    # Constant images a and b: zero variances, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.3, 0.7, 0.01 ** 2
    got = ssim(torch.full((3, 15, 15), a), torch.full((3, 15, 15), b))
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-7)
    # A data range of 255 on images scaled by 255 gives the same value.
    y = (x + 0.1).clamp(0, 1)
    assert ssim(255 * x, 255 * y, data_range=255.0).item() == pytest.approx(ssim(x, y).item(), abs=1e-5)
    assert ssim(x, y).item() < 1.0


def test_psnr_matches_formula_and_known_cases() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 4, 3, 8, 8, generator=gen)
    y = torch.rand(2, 4, 3, 8, 8, generator=gen)
    got = psnr(x, y)
    assert got.shape == (2, 4)
    xn, yn = x.double().numpy(), y.double().numpy()
    ref = 10 * np.log10(1.0 / ((xn - yn) ** 2).mean(axis=(2, 3, 4)))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    offset = psnr(torch.full((3, 5, 5), 0.2), torch.full((3, 5, 5), 0.3))
    assert offset.item() == pytest.approx(-20 * math.log10(0.1), rel=1e-5)
    assert psnr(255 * x, 255 * y, data_range=255.0).double().numpy() == pytest.approx(ref, rel=1e-5)


def test_reductions_and_video_shapes() -> None:
    x, y = torch.rand(2, 3, 3, 11, 11), torch.rand(2, 3, 3, 11, 11)
    per_frame = ssim(x, y)
    assert per_frame.shape == (2, 3)
    assert ssim(x, y, reduction="mean").item() == pytest.approx(per_frame.mean().item(), rel=1e-6)
    assert psnr(x, y, reduction="sum").item() == pytest.approx(psnr(x, y).sum().item(), rel=1e-6)
    torch.testing.assert_close(per_frame[1, 2], ssim(x[1, 2], y[1, 2]))


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(3, 10, 20), torch.rand(3, 10, 20))
    with pytest.raises(ValueError, match="psnr: inputs must have the same shape"):
        psnr(torch.rand(3, 4, 4), torch.rand(3, 4, 5))
    with pytest.raises(ValueError, match="reduction"):
        psnr(torch.rand(3, 4, 4), torch.rand(3, 4, 4), reduction="max")
