"""Geometry Forcing: token-grid mapping, losses recomputed with plain torch from saved features, the frozen
teacher (no gradient, not trained), the DINO term, ablation switches and recipe validation."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from geoforge.engine.config import ConfigError, load_recipe
from geoforge.engine.models.dit import DiTConfig, VideoDiT
from geoforge.engine.models.vggt import DinoVisionTransformer
from geoforge.engine.objectives.geometry_forcing import (GFConfig, DinoTermConfig, GeometryForcingHead, alignment_snapshot,
                                                teacher_to_dit_grid)
from geoforge.engine.objectives.video_loss import VideoDiffusionLoss
from geoforge.engine.teacher.live import LiveTeacher, build_dino, dino_patch_features
from geoforge.engine.teacher.spec import DinoConfig, TeacherConfig, TeacherSource, teacher_size

TINY_VGGT = {"aggregator": {"img_size": 56, "patch_size": 14, "embed_dim": 32, "depth": 2, "num_heads": 2,
                            "patch_embed": "conv"}}
TINY_DINO = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 56}


# ----------------------------------------------------------------------------- independent references
def bilinear_weights(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] interpolation matrix, written from the definitions (float64):

    upsampling: pixel-centre bilinear (align_corners=False: source x = (i + 0.5) n_in / n_out - 0.5, clamped);
    downsampling: the triangle (tent) filter stretched by the scale s = n_in / n_out, centred at
    (i + 0.5) s in edge coordinates, over the source centres j + 0.5, normalised to sum 1."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    s = n_in / n_out
    for i in range(n_out):
        if s <= 1:
            x = min(max((i + 0.5) * s - 0.5, 0.0), n_in - 1)
            j0 = int(math.floor(x))
            j1 = min(j0 + 1, n_in - 1)
            w[i, j0] += 1 - (x - j0)
            w[i, j1] += x - j0
        else:
            c = (i + 0.5) * s
            for j in range(n_in):
                w[i, j] = max(0.0, 1 - abs(j + 0.5 - c) / s)
            w[i] /= w[i].sum()
    return w


def map_reference(y: torch.Tensor, grid: tuple[int, int], tp: int) -> torch.Tensor:
    """[B, T, h, w, C] -> [B, T / tp, H, W, C]: mean over each tp frames, then separable bilinear."""
    b, t, h, w, c = y.shape
    y = y.double().reshape(b, t // tp, tp, h, w, c).mean(2)
    wh, ww = bilinear_weights(h, grid[0]), bilinear_weights(w, grid[1])
    return torch.einsum("Hh,Ww,bthwc->btHWc", wh, ww, y)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def losses_reference(x: torch.Tensor, y: torch.Tensor, params: dict[str, torch.Tensor], prefix: str):
    """Angular and scale losses of DESIGN §4 from the head's weights, in float64."""
    def lin(v, name):
        return v @ params[f"{prefix}.{name}.weight"].double().T + params[f"{prefix}.{name}.bias"].double()

    p = lin(silu(lin(silu(lin(x.double(), "projector.0")), "projector.2")), "projector.4")
    p_hat = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    y_hat = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    angular = (1 - (p_hat * y_hat).sum(-1)).mean()
    g = lin(silu(lin(p_hat, "scale_head.0")), "scale_head.2")
    return angular, (g - y).pow(2).mean()


# ----------------------------------------------------------------------------- token grid
@pytest.mark.parametrize("src,dst,tp", [((3, 5), (4, 7), 1), ((6, 9), (3, 4), 1), ((4, 4), (4, 4), 2),
                                        ((5, 3), (8, 2), 2)])
def test_teacher_grid_mapping_matches_definition(src, dst, tp):
    """Non-square grids, up- and downsampling, tokens spanning 2 frames: vs the written-out definition."""
    y = torch.randn(2, 4, *src, 6)
    got = teacher_to_dit_grid(y, dst, tp)
    assert got.shape == (2, 4 // tp, *dst, 6)
    torch.testing.assert_close(got.double(), map_reference(y, dst, tp), atol=1e-5, rtol=1e-5)


def test_grid_mapping_keeps_image_positions():
    """A feature that is linear in the image x coordinate stays the same linear function on the DiT grid
    (grids tile the same image: token centres are (j + 0.5) / W)."""
    h, w, big_w = 3, 4, 8
    xs = (torch.arange(w) + 0.5) / w
    y = xs.view(1, 1, 1, w, 1).expand(1, 1, h, w, 1).clone()
    out = teacher_to_dit_grid(y, (h, big_w), 1)[0, 0, 0, :, 0]
    centres = (torch.arange(big_w) + 0.5) / big_w
    inside = (centres >= xs[0]) & (centres <= xs[-1])   # no extrapolation beyond the outer centres
    torch.testing.assert_close(out[inside], centres[inside])


def test_teacher_size_follows_aspect_ratio():
    assert teacher_size(64, 64, 56) == (56, 56)
    assert teacher_size(256, 256, 518) == (518, 518)
    assert teacher_size(32, 48, 56) == (42, 56)   # 32 * 56 / 48 = 37.3 -> 3 patches of 14


# ----------------------------------------------------------------------------- losses from saved features
def _gf(**kw) -> GFConfig:
    base = dict(enabled=True, dit_block=1, projector_hidden=48, scale_hidden=16)
    base.update(kw)
    cfg = GFConfig(**base)
    cfg.validate()
    return cfg


def _teacher(**kw) -> TeacherConfig:
    base = dict(vggt=TeacherSource(pretrained=None, config=TINY_VGGT), layers=[0, 1], resolution=56)
    base.update(kw)
    cfg = TeacherConfig(**base)
    cfg.validate()
    return cfg


def _batch(b=2, t=4, h=32, w=32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"frames": torch.rand(b, t, 3, h, w, generator=g), "index": torch.arange(b)}


def _noise(b, t, h, w):
    g = torch.Generator().manual_seed(2)
    return {"t": torch.rand(b, t, generator=g), "context": torch.zeros(b, t, dtype=torch.bool),
            "eps": torch.randn(b, t, 3, h, w, generator=g), "drop_cond": torch.zeros(b, dtype=torch.bool)}


@pytest.mark.parametrize("shape,tp,teacher_frames", [((2, 4, 32, 48), 1, 0), ((2, 4, 32, 32), 2, 2)])
def test_losses_recomputed_independently_from_saved_features(tmp_path, shape, tp, teacher_frames):
    """One batch through the DiT + GF head (fused CPU alignment); the DiT features, teacher features and
    head weights are saved, reloaded and the losses recomputed with plain torch formulas."""
    b, t, h, w = shape
    gf = _gf()
    teacher = LiveTeacher(_teacher(frames=teacher_frames))
    dit = VideoDiT(DiTConfig(hidden_dim=32, depth=2, num_heads=2, patch_size=8, temporal_patch_size=tp))
    module = VideoDiffusionLoss(dit, _objective(), gf, teacher.dims, backend="cpu")
    batch = _batch(b, t, h, w)
    batch.update(teacher(batch))
    out = module.flow_matching(batch, _noise(b, t, h, w))
    parts = module.gf(out["features"], batch)
    save_file(alignment_snapshot(module.gf, out["features"], batch, parts), str(tmp_path / "snap.safetensors"))

    saved = load_file(str(tmp_path / "snap.safetensors"))
    x = saved["dit_block_1"]                                    # [B, T', H', W', D]
    grid = (h // 8, w // 8)
    assert x.shape == (b, t // tp, *grid, 32)
    params = {k[len("head."):]: v for k, v in saved.items() if k.startswith("head.")}
    angular, scale = [], []
    for layer in (0, 1):
        y = saved[f"teacher.vggt_L{layer}"]                     # [B, Tt, h14, w14, C] on the VGGT grid
        th, tw = teacher_size(h, w, 56)
        assert y.shape[:4] == (b, teacher_frames or t, th // 14, tw // 14)
        target = map_reference(y, grid, tp)
        tokens = x[:, :target.shape[1]].reshape(-1, x.shape[-1])
        a, s = losses_reference(tokens, target.reshape(-1, target.shape[-1]), params, f"vggt.align.vggt_L{layer}")
        angular.append(a)
        scale.append(s)
    ang, sc = torch.stack(angular).mean(), torch.stack(scale).mean()
    assert saved["part.gf_angular"].item() == pytest.approx(ang.item(), rel=1e-5)
    assert saved["part.gf_scale"].item() == pytest.approx(sc.item(), rel=1e-5)
    assert saved["part.loss"].item() == pytest.approx(0.5 * ang.item() + 0.05 * sc.item(), rel=1e-5)
    total = module(batch, _noise(b, t, h, w))
    assert total["loss"].item() == pytest.approx(total["fm"].item() + saved["part.loss"].item(), rel=1e-5)


def _objective():
    from geoforge.engine.objectives.flow_matching import FlowMatchingConfig

    return FlowMatchingConfig()


def test_gradients_match_plain_autograd():
    """The fused alignment's gradients (DiT features and projector weights) equal autograd of the plain formulas."""
    gf = _gf()
    teacher = LiveTeacher(_teacher())
    head = GeometryForcingHead(gf, teacher.dims, hidden_dim=32, backend="cpu")
    ref = GeometryForcingHead(gf, teacher.dims, hidden_dim=32, backend="reference")
    ref.load_state_dict(head.state_dict())
    batch = _batch(2, 4, 32, 32)
    batch.update(teacher(batch))
    feats = torch.randn(2, 4, 4, 4, 32)
    grads = []
    for h in (head, ref):
        x = feats.clone().requires_grad_(True)
        h({1: x}, batch)["loss"].backward()
        grads.append([x.grad] + [p.grad for p in h.parameters()])
    for g_fused, g_ref in zip(*grads):
        torch.testing.assert_close(g_fused, g_ref, atol=1e-5, rtol=5e-4)


@pytest.mark.parametrize("losses,expect", [("angular", (0.5, 0.0)), ("scale", (0.0, 0.05)), ("both", (0.5, 0.05))])
def test_loss_switches(losses, expect):
    gf = _gf(losses=losses)
    assert gf.weights() == expect
    teacher = LiveTeacher(_teacher())
    head = GeometryForcingHead(gf, teacher.dims, hidden_dim=32, backend="cpu")
    batch = _batch(2, 4, 32, 32)
    batch.update(teacher(batch))
    parts = head({1: torch.randn(2, 4, 4, 4, 32)}, batch)
    want = expect[0] * parts["gf_angular"] + expect[1] * parts["gf_scale"]
    assert parts["loss"].item() == pytest.approx(want.item(), rel=1e-6)


# ----------------------------------------------------------------------------- the frozen teacher
def test_teacher_is_frozen_and_outside_the_trained_module():
    gf = _gf()
    teacher = LiveTeacher(_teacher())
    dit = VideoDiT(DiTConfig(hidden_dim=32, depth=2, num_heads=2, patch_size=8))
    module = VideoDiffusionLoss(dit, _objective(), gf, teacher.dims, backend="cpu")
    teacher_params = list(teacher.vggt.parameters())
    assert teacher_params and not any(p.requires_grad for p in teacher_params)
    assert not teacher.vggt.training
    trained = {id(p) for p in module.parameters()}
    assert not trained & {id(p) for p in teacher_params}        # the optimizer is built from module.parameters()
    assert not any("aggregator" in k for k in module.state_dict())
    assert any(k.startswith("gf.vggt.align.vggt_L0.projector") for k in module.state_dict())
    batch = _batch(2, 4, 32, 32)
    feats = teacher(batch)
    assert all(not v.requires_grad and v.dtype == torch.float32 for v in feats.values())
    batch.update(feats)
    module(batch, _noise(2, 4, 32, 32))["loss"].backward()
    assert all(p.grad is None for p in teacher_params)
    assert all(p.grad is not None for p in module.gf.parameters())


def test_teacher_features_are_patch_tokens_of_the_aggregator():
    """Live features = the aggregator outputs minus the special tokens, reshaped to the 14-pixel grid."""
    teacher = LiveTeacher(_teacher(frames=3))
    frames = _batch(2, 4, 32, 48)["frames"]
    feats = teacher.features(frames)
    images = F.interpolate(frames[:, :3].flatten(0, 1), size=(42, 56), mode="bilinear", align_corners=False,
                           antialias=False).clamp(0, 1).unflatten(0, (2, 3))
    tokens, start = teacher.vggt.aggregator(images)
    assert start == 5
    for layer in (0, 1):
        want = tokens[layer][:, :, start:].reshape(2, 3, 3, 4, -1)
        torch.testing.assert_close(feats[f"vggt_L{layer}"], want, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- DINOv2 (REPA) term
def test_dino_term_and_official_weights(tmp_path):
    """The optional DINOv2 teacher loads an official-format state dict strictly and adds its own term."""
    vit = DinoVisionTransformer(**{**TINY_DINO, "num_register_tokens": 4, "init_values": 1.0})
    torch.save(vit.state_dict(), tmp_path / "dinov2_tiny_reg4_pretrain.pth")
    dino = DinoConfig(pretrained=str(tmp_path / "dinov2_tiny_reg4_pretrain.pth"), variant="dinov2_vits14_reg",
                      config=TINY_DINO, resolution=28)
    loaded = build_dino(dino)
    for (k, a), (_, b) in zip(vit.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    images = torch.rand(3, 3, 28, 28)
    normed = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(dino_patch_features(loaded, images).flatten(1, 2), vit.eval()(normed))

    gf = _gf(dino=DinoTermConfig(dit_block=2, projector_hidden=16, scale_hidden=8))
    teacher = LiveTeacher(_teacher(dino=dino))
    assert teacher.dims["dino"] == 32
    dit = VideoDiT(DiTConfig(hidden_dim=32, depth=2, num_heads=2, patch_size=8))
    module = VideoDiffusionLoss(dit, _objective(), gf, teacher.dims, backend="cpu")
    assert module.gf.dit_blocks == (1, 2)
    batch = _batch(2, 4, 32, 32)
    batch.update(teacher(batch))
    assert batch["teacher.dino"].shape == (2, 4, 2, 2, 32)
    parts = module(batch, _noise(2, 4, 32, 32))
    assert {"fm", "gf_angular", "gf_scale", "dino_angular", "dino_scale"} <= set(parts)
    gf_only = parts["fm"] + 0.5 * parts["gf_angular"] + 0.05 * parts["gf_scale"]
    assert parts["loss"].item() == pytest.approx((gf_only + 0.5 * parts["dino_angular"]).item(), rel=1e-5)


def test_dino_weights_of_another_variant_are_refused(tmp_path):
    vit = DinoVisionTransformer(**{**TINY_DINO, "embed_dim": 48, "num_heads": 2})
    torch.save(vit.state_dict(), tmp_path / "w.pth")
    misfit = r"teacher\.dino\.pretrained .*w\.pth do not fit dinov2_vits14_reg: wrong shape keys"
    with pytest.raises(ValueError, match=misfit):
        build_dino(DinoConfig(pretrained=str(tmp_path / "w.pth"), variant="dinov2_vits14_reg", config=TINY_DINO))


# ----------------------------------------------------------------------------- recipe keys
@pytest.mark.parametrize("override,message", [
    ("gf.dit_block=9", "gf.dit_block: 9 is not a block of the DiT"),
    ("teacher.resolution=60", "teacher.resolution: must be a positive multiple of 14"),
    ("teacher.frames=9", "teacher.frames: 9 > data.frames=8"),
    ("gf.losses=neither", "gf.losses: must be one of"),
    ("teacher.layers=[]", "teacher.layers: name at least one"),
    ("teacher.layerz=[1]", "teacher.layerz: unknown key (did you mean 'layers'?)"),
    ("gf.dino={}", "teacher.dino: gf.dino is set, so the REPA term needs teacher.dino too"),
    ("teacher.dino={}", "gf.dino: teacher.dino is set, so the REPA term needs gf.dino too"),
])
def test_recipe_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe("gf_tiny", [override])


@pytest.mark.parametrize("old,new", [("gf.teacher_layers=[1]", "teacher.layers"),
                                     ("gf.teacher_resolution=56", "teacher.resolution"),
                                     ("gf.teacher_frames=0", "teacher.frames"), ("gf.teacher_cache=x", "teacher.cache"),
                                     ("gf.teacher.init_seed=1", "teacher.vggt"),
                                     ("gf.dino.resolution=224", "teacher.dino.resolution"),
                                     ("gf.dino.variant=dinov2_vitb14_reg", "teacher.dino.variant")])
def test_old_teacher_keys_under_gf_name_where_they_moved(old, new):
    key = old.split("=")[0].replace("gf.teacher.init_seed", "gf.teacher")
    with pytest.raises(ConfigError, match=re.escape(f"{key}: this key moved to {new}")):
        load_recipe("gf_tiny", [old])


def test_gf_off_with_teacher_extras_is_refused():
    with pytest.raises(ConfigError, match="gf.enabled: false, but teacher.cache"):
        load_recipe("gf_tiny", ["gf.enabled=false", "teacher.cache=somewhere"])


def test_temporal_patch_must_divide_teacher_frames():
    with pytest.raises(ConfigError, match="teacher.frames: 3 frames do not fill whole DiT tokens"):
        load_recipe("gf_tiny", ["model.temporal_patch_size=2", "teacher.frames=3"])


@pytest.mark.parametrize("name", ["gf_tiny", "gf_re10k", "gf_minecraft", "gf_repa_re10k", "dfot_re10k"])
def test_recipes_load(name):
    recipe = load_recipe(name)
    assert recipe.gf.enabled == (name != "dfot_re10k")
    if name == "gf_repa_re10k":
        assert recipe.gf.dino is not None and recipe.teacher.dino is not None
