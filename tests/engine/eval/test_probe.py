"""The geometry probe (``engine.eval.probe``): the ridge solution against an independent least-squares solve, R^2
near 1 for features that carry depth and world points and near 0 for noise, the token bookkeeping against the
patchified frames, and the probe of a real (tiny) DiT."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from geoforge.engine.data.re10k import pixel_intrinsics, relative_extrinsics
from geoforge.engine.data.synthetic import render_clip
from geoforge.engine.eval.probe import (fit_and_score, fit_ridge, probe_geometry, probe_rows, r2_score,
                                        token_features)
from geoforge.engine.models.dit import DiTConfig, VideoDiT
from geoforge.engine.teacher.oracle import SCENE_SCALE, geometry_features


def clips(first: int, count: int, frames: int = 4, res: int = 32) -> dict[str, torch.Tensor]:
    """``count`` rendered synthetic clips as a batch: frames [B, T, 3, H, W] in [0, 1], depth, cameras."""
    out = {"frames": [], "depth": [], "intrinsics": [], "extrinsics": []}
    for n in range(first, first + count):
        c = render_clip(7, n, frames, res)
        out["frames"].append(torch.from_numpy(c["frames"]).permute(0, 3, 1, 2).float() / 255)
        out["depth"].append(torch.from_numpy(c["depth"]))
        out["intrinsics"].append(pixel_intrinsics(c["intrinsics"].float(), res, res))
        out["extrinsics"].append(relative_extrinsics(c["w2c"]).float())
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def data() -> tuple[dict, dict]:
    return clips(0, 12), clips(100, 6)


def targets(batch: dict, grid: int = 8) -> torch.Tensor:
    return geometry_features(batch["depth"], batch["intrinsics"], batch["extrinsics"], 0, grid).reshape(-1, 4)


def test_ridge_equals_least_squares_on_the_augmented_system():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.1, 2.0, 5.0]) + 2.0
    y = torch.randn(40, 3, generator=g, dtype=torch.float64)
    lam = 2.5
    ridge = fit_ridge(x, y, lam)
    # independent: numpy, standardised by hand, the penalty as extra rows sqrt(lam) [I 0] with target 0
    xn, yn = x.numpy(), y.numpy()
    z = (xn - xn.mean(0)) / xn.std(0)
    a = np.hstack([z, np.ones((40, 1))])
    a_aug = np.vstack([a, np.hstack([np.sqrt(lam) * np.eye(5), np.zeros((5, 1))])])
    y_aug = np.vstack([yn, np.zeros((5, 3))])
    w = np.linalg.lstsq(a_aug, y_aug, rcond=None)[0]
    np.testing.assert_allclose(ridge.weight.numpy(), w, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ridge.predict(x).numpy(), a @ w, rtol=1e-10, atol=1e-12)
    # the bias is unpenalised: with huge lambda the prediction tends to the training mean of y
    flat = fit_ridge(x, y, 1e12).predict(x)
    torch.testing.assert_close(flat, y.mean(0).expand_as(flat), atol=1e-8, rtol=0)
    # lambda 0 is ordinary least squares: a perfect fit of a linear target
    w_true = torch.randn(5, 2, generator=g, dtype=torch.float64)
    exact = x @ w_true + 0.7
    torch.testing.assert_close(fit_ridge(x, exact, 0.0).predict(x), exact, atol=1e-9, rtol=0)


def test_r2_score_by_hand():
    y = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 2.0], [4.0, 5.0]])
    pred = torch.tensor([[1.0, 2.0], [2.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    # column 0: SS_res 1, SS_tot 5 -> 0.8; column 1: the mean predicted -> 0
    torch.testing.assert_close(r2_score(pred, y), torch.tensor([0.8, 0.0], dtype=torch.float64))


def test_features_that_carry_the_geometry_give_r2_near_one_and_noise_near_zero(data):
    train, test = data
    y_tr, y_te = targets(train), targets(test)
    assert y_tr.shape == (12 * 4 * 64, 4)
    # sanity of the targets: world points within the rooms, log depth of a metre-scale scene
    assert y_tr[:, :3].abs().max() * SCENE_SCALE < 10 and y_tr[:, 3].exp().min() > 0.05
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(4, 32, generator=g)

    def carrying(y: torch.Tensor) -> torch.Tensor:
        return y @ mix + 0.01 * torch.randn(y.shape[0], 32, generator=g)

    groups = torch.arange(12).repeat_interleave(4 * 64)
    r2, lam = fit_and_score(carrying(y_tr), y_tr, carrying(y_te), y_te, groups=groups)
    assert r2.min() > 0.98, r2
    assert lam > 0
    noise_tr, noise_te = torch.randn(y_tr.shape[0], 32, generator=g), torch.randn(y_te.shape[0], 32, generator=g)
    r2, _ = fit_and_score(noise_tr, y_tr, noise_te, y_te, groups=groups)
    assert r2.max() < 0.05, r2
    # only depth carried: depth near 1, the lateral world coordinate not (z, forward in frame 0's camera, follows
    # depth in part: the cameras look roughly along it)
    depth_only = torch.cat([y_tr[:, 3:], torch.randn(y_tr.shape[0], 8, generator=g)], dim=1)
    depth_only_te = torch.cat([y_te[:, 3:], torch.randn(y_te.shape[0], 8, generator=g)], dim=1)
    r2, _ = fit_and_score(depth_only, y_tr, depth_only_te, y_te, lam=1.0)
    assert r2[3] > 0.999 and r2[0] < 0.3, r2


class PatchModel(nn.Module):
    """A stand-in DiT whose block-1 features are the pixels of each token's patch: ``[B, T, H/p, W/p, p*p*3]``."""

    def __init__(self, p: int = 4):
        super().__init__()
        self.cfg = DiTConfig(patch_size=p, camera="rays")
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x, t, *, intrinsics=None, extrinsics=None, return_features=()):
        assert intrinsics is not None and extrinsics is not None
        p = self.cfg.patch_size
        b, f, c, h, w = x.shape
        feats = x.reshape(b, f, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 4, 6, 2).reshape(b, f, h // p, w // p, -1)
        return x, {1: feats}


def test_rows_pair_each_token_with_its_own_cell_and_skip_the_context(data):
    train, _ = data
    model = PatchModel()
    x, y, clip = probe_rows(model, train, 0.0, 1, seed=0, chunk=5)   # chunks of 5, 5, 2 clips
    assert x.shape == (12 * 3 * 64, 48) and y.shape == (12 * 3 * 64, 4)
    # t = 0: the features are the clean pixels; the rows of frame 1.. in (clip, frame, row, column) order
    frames = train["frames"][:, 1:] * 2 - 1
    expect = frames.reshape(12, 3, 3, 8, 4, 8, 4).permute(0, 1, 3, 5, 4, 6, 2).reshape(-1, 48)
    torch.testing.assert_close(x, expect)
    torch.testing.assert_close(y, geometry_features(train["depth"], train["intrinsics"], train["extrinsics"], 0,
                                                    8)[:, 1:].reshape(-1, 4))
    assert torch.equal(clip, torch.arange(12).repeat_interleave(3 * 64))
    # t = 1: pure noise on the probed frames (the same noise for every t); t = 0.5: halfway
    x1, _, _ = probe_rows(model, train, 1.0, 1, seed=0, chunk=5)
    xh, _, _ = probe_rows(model, train, 0.5, 1, seed=0, chunk=5)
    torch.testing.assert_close(xh, 0.5 * x + 0.5 * x1)
    assert abs(float(x1.std()) - 1.0) < 0.05


def test_probe_of_a_tiny_dit(data):
    train, test = data
    torch.manual_seed(0)
    dit = VideoDiT(DiTConfig(hidden_dim=32, depth=2, num_heads=2, patch_size=4, camera="rays", camera_freqs=2)).eval()
    feats = token_features(dit, train, 0.5, 2, torch.Generator().manual_seed(0))
    assert feats.shape == (12, 4, 8, 8, 32)
    out = probe_geometry(dit, train, test, block=2, times=(0.0, 0.8))
    assert sorted(out) == ["0", "0.8"]
    for t, r in out.items():
        assert set(r) == {"x", "y", "z", "depth", "world", "lambda"}
        assert all(np.isfinite(v) for v in r.values()) and r["lambda"] > 0
        assert r["world"] == pytest.approx((r["x"] + r["y"] + r["z"]) / 3)
        assert -1.0 < r["depth"] <= 1.0
    # deterministic: the same noise, the same probe
    again = probe_geometry(dit, train, test, block=2, times=(0.8,))
    assert again["0.8"] == out["0.8"]
