"""The iREPA-style GF alignment form (``gf.alignment_form: irepa``, ``engine.objectives.gf_irepa``): the spatially
normalised target (zero mean and unit std over each frame's tokens, iREPA's formula), the 3x3 conv projector over
the token grid, GF's losses recomputed by hand, gradients into the projector, and toy training steps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from geoforge.engine.config import ConfigError, load_recipe
from geoforge.engine.models.dit import DiTConfig, VideoDiT
from geoforge.engine.objectives.geometry_forcing import GeometryForcingHead
from geoforge.engine.objectives.gf_irepa import IrepaAlignment, spatial_normalise
from geoforge.engine.objectives.video_loss import VideoDiffusionLoss, sample_noise
from geoforge.engine.teacher.builder import build_teacher
from geoforge.engine.teacher.oracle import oracle_channels


def test_spatial_normalisation_has_zero_mean_and_unit_std_over_each_frames_tokens():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(6, 5, 7, 12, generator=g) * (0.5 + 4 * torch.rand(6, 1, 1, 12, generator=g)) + 3   # [N, h, w, C]
    z = spatial_normalise(y)
    assert z.shape == y.shape
    torch.testing.assert_close(z.mean(dim=(1, 2)), torch.zeros(6, 12), atol=2e-6, rtol=0)
    torch.testing.assert_close(z.flatten(1, 2).std(dim=1), torch.ones(6, 12), atol=1e-4, rtol=0)
    # iREPA's spatial_zscore on tokens [B, T, D]: (x - alpha * x.mean(1)) / (x.std(1) + 1e-6)
    tokens = y.flatten(1, 2)
    for alpha in (1.0, 0.6):
        expect = (tokens - alpha * tokens.mean(dim=1, keepdim=True)) / (tokens.std(dim=1, keepdim=True) + 1e-6)
        torch.testing.assert_close(spatial_normalise(y, alpha).flatten(1, 2), expect)
    # per frame: another frame's values do not enter
    y2 = y.clone()
    y2[1:] += 100.0
    torch.testing.assert_close(spatial_normalise(y2)[0], z[0])


def test_projector_is_a_3x3_conv_over_the_token_grid_and_the_losses_are_gfs():
    torch.manual_seed(0)
    align = IrepaAlignment(16, 6, 8)
    assert align.projector.kernel_size == (3, 3) and align.projector.padding == (1, 1)
    x = torch.randn(4, 5, 5, 16)
    y = spatial_normalise(torch.randn(4, 5, 5, 6))
    p = align.project(x)
    assert p.shape == (4, 5, 5, 6)
    # a token's projection depends on its 3x3 neighbourhood only
    x2 = x.clone()
    x2[:, 0, 0] += 1.0
    changed = (align.project(x2) - p).abs().sum(dim=(0, 3)) > 0
    assert changed[:2, :2].all() and not changed[2:].any() and not changed[:, 2:].any()
    ang, scale = align(x, y)
    # by hand: cosine per token, the scale head on p / |p| against the normalised target
    pf, yf = p.reshape(-1, 6), y.reshape(-1, 6)
    p_hat = pf / pf.norm(dim=-1, keepdim=True)
    expect_ang = (1 - F.cosine_similarity(pf, yf, dim=-1)).mean()
    expect_scale = (align.scale_head(p_hat) - yf).square().mean()
    torch.testing.assert_close(ang, expect_ang)
    torch.testing.assert_close(scale, expect_scale)


def test_head_shapes_and_gradients_reach_the_conv_projector():
    r = load_recipe("gf_tiny", ["gf.alignment_form=irepa", "teacher.kind=oracle", "teacher.layers=[0, 1]",
                                "teacher.resolution=56"])
    dims = {"vggt_L0": 36, "vggt_L1": 36}
    head = GeometryForcingHead(r.gf, dims, hidden_dim=32)
    assert set(head.vggt.align) == {"vggt_L0", "vggt_L1"}
    feats = torch.randn(2, 3, 8, 8, 32, requires_grad=True)
    # teacher on a 4x4 grid (56 / 14), bilinearly resized onto the DiT's 8x8 tokens before the normalisation
    batch = {f"teacher.{k}": torch.randn(2, 3, 4, 4, 36) * 5 + 2 for k in dims}
    parts = head({r.gf.dit_block: feats}, batch)
    assert set(parts) == {"loss", "gf_angular", "gf_scale"} and parts["loss"].dim() == 0
    w_ang, w_scale = r.gf.weights()
    torch.testing.assert_close(parts["loss"], w_ang * parts["gf_angular"] + w_scale * parts["gf_scale"])
    parts["loss"].backward()
    for k in dims:
        conv = head.vggt.align[k].projector
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        assert head.vggt.align[k].scale_head[0].weight.grad.abs().sum() > 0
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_irepa_config_keys():
    r = load_recipe("gf_small", ["gf.alignment_form=irepa", "gf.irepa_alpha=0.6"])
    assert r.gf.alignment_form == "irepa" and r.gf.irepa_alpha == 0.6
    with pytest.raises(ConfigError, match="irepa_alpha"):
        load_recipe("gf_small", ["gf.alignment_form=irepa", "gf.irepa_alpha=1.5"])
    with pytest.raises(ConfigError, match="gf.alignment_form"):
        load_recipe("gf_small", ["gf.alignment_form=irepa2"])


def test_toy_training_steps_with_the_irepa_form():
    """The objective with the irepa head trains (a DiT + oracle teacher on a rendered clip): the parameters of
    the conv projector move, the alignment losses fall."""
    from geoforge.engine.data.re10k import pixel_intrinsics, relative_extrinsics
    from geoforge.engine.data.synthetic import render_clip

    torch.manual_seed(0)
    recipe = load_recipe("gf_tiny", ["gf.alignment_form=irepa", "teacher.kind=oracle", "teacher.layers=[0]",
                                     "teacher.resolution=56", "model.patch_size=8", "gf.dit_block=1", "model.depth=2"])
    c = render_clip(3, 0, 4, 32)
    batch = {"frames": torch.from_numpy(c["frames"]).permute(0, 3, 1, 2)[None].float() / 255,
             "depth": torch.from_numpy(c["depth"])[None],
             "intrinsics": pixel_intrinsics(c["intrinsics"].float(), 32, 32)[None],
             "extrinsics": relative_extrinsics(c["w2c"]).float()[None], "index": torch.tensor([0])}
    teacher = build_teacher(recipe.teacher)
    assert teacher.dims == {"vggt_L0": oracle_channels(4)}
    batch.update(teacher(batch))
    dit = VideoDiT(DiTConfig(hidden_dim=32, depth=2, num_heads=2, patch_size=8, camera="rays", camera_freqs=2))
    module = VideoDiffusionLoss(dit, recipe.objective, recipe.gf, teacher.dims, "reference")
    conv = module.gf.vggt.align["vggt_L0"].projector
    before = conv.weight.detach().clone()
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    angular = []
    for step in range(30):
        out = module(batch, sample_noise(recipe.objective, 0.0, batch["frames"].shape, batch["index"], 0, step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        angular.append(float(out["gf_angular"]))
    assert all(torch.isfinite(torch.tensor(angular)))
    assert not torch.equal(conv.weight, before)
    assert angular[-1] < angular[0] - 0.05, angular
