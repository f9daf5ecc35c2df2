"""Fréchet distance against closed forms and independent numpy routes; FID/FVD wrappers with batching."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from geoforge.engine.eval.frechet import (extract_features, feature_statistics, fid, frechet_distance,
                                 frechet_distance_from_features, fvd)


def _random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_diagonal_covariances_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    s1, s2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_commuting_rotated_covariances_closed_form() -> None:
    rng = np.random.default_rng(1)
    q = _random_orthogonal(rng, 12)
    a, b = rng.uniform(0.01, 5, 12), rng.uniform(0.01, 5, 12)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_two_dimensional_non_commuting_closed_form() -> None:
    # For 2x2 matrices tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
    rng = np.random.default_rng(2)
    s1, s2 = _random_spd(rng, 2), _random_spd(rng, 2)
    mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_general_case_matches_eigenvalues_of_the_product() -> None:
    # Independent route: the eigenvalues of the non-symmetric S1 S2 (np.linalg.eigvals).
    rng = np.random.default_rng(3)
    d = 24
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(min=0)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * tr_sqrt
    assert frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_identical_distributions_give_zero() -> None:
    feats = torch.randn(300, 64) @ torch.randn(64, 64)
    mu, sigma = feature_statistics(feats)
    assert frechet_distance(mu, sigma, mu, sigma) <= 1e-9 * torch.trace(sigma).item()
    assert frechet_distance_from_features(feats, feats.clone()) <= 1e-9 * torch.trace(sigma).item()


def test_rank_deficient_covariances_stay_finite_and_non_negative() -> None:
    rng = np.random.default_rng(4)
    few = rng.standard_normal((10, 64))  # rank-9 covariance in 64 dimensions
    few[:, 5] = 3.0  # and one constant feature
    other = rng.standard_normal((12, 64)) + 0.5
    mu1, s1 = feature_statistics(few)
    mu2, s2 = feature_statistics(other)
    same = frechet_distance(mu1, s1, mu1, s1)
    assert 0.0 <= same <= 1e-9 * np.trace(s1.numpy())
    value = frechet_distance(mu1, s1, mu2, s2)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1.numpy() @ s2.numpy()).real.clip(min=0)).sum()
    expected = np.sum((mu1.numpy() - mu2.numpy()) ** 2) + np.trace(s1.numpy() + s2.numpy()) - 2 * tr_sqrt
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(expected, rel=1e-6)
    zeros = np.zeros((64, 64))
    assert frechet_distance(mu1, zeros, mu1, zeros) == 0.0
    assert frechet_distance(mu1, zeros, mu2, s2) == pytest.approx(
        np.sum((mu1.numpy() - mu2.numpy()) ** 2) + np.trace(s2.numpy()), rel=1e-10)


def test_feature_statistics_match_numpy() -> None:
    feats = np.random.default_rng(5).standard_normal((50, 7))
    mu, sigma = feature_statistics(torch.from_numpy(feats).float())
    assert mu.dtype == torch.float64 and sigma.shape == (7, 7)
    np.testing.assert_allclose(mu.numpy(), feats.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sigma.numpy(), np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(torch.randn(1, 4))
    with pytest.raises(ValueError, match="features contains NaN"):
        feature_statistics(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


class _LinearExtractor(torch.nn.Module):
    """Flatten, then a fixed linear map to 6 features (stands in for Inception / I3D)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(in_features, 6, bias=False)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.proj(x.flatten(1))


def test_fid_wrapper_batches_and_matches_the_mean_shift_closed_form() -> None:
    real = torch.rand(20, 3, 4, 4)
    offset = torch.randn(3, 4, 4) * 0.1
    extractor = _LinearExtractor(48)
    # Same covariance, mean shifted by W·offset: FID = ‖W·offset‖².
    expected = extractor.proj(offset.flatten()).double().square().sum().item()
    assert fid(real, real + offset, extractor, batch_size=6) == pytest.approx(expected, rel=1e-6)
    assert extractor.batches == [6, 6, 6, 2] * 2
    assert fid(list(real.split(7)), list(real.split(3)), extractor) == pytest.approx(0.0, abs=1e-9)


def test_fvd_wrapper_on_video_batches() -> None:
    real = torch.rand(9, 2, 3, 2, 2)
    fake = real.flip(0) * 0.5
    extractor = _LinearExtractor(24)
    direct = frechet_distance_from_features(extractor(real).double(), extractor(fake).double())
    assert fvd(real, fake, extractor, batch_size=4) == pytest.approx(direct, rel=1e-5)
    feats = extract_features(iter(real.split(5)), extractor)
    assert feats.shape == (9, 6) and feats.dtype == torch.float64
    with pytest.raises(ValueError, match="no data"):
        extract_features([], extractor)
