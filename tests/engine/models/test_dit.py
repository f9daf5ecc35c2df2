"""Video DiT, its 3D RoPE and its camera / action / noise conditioning."""
import math

import pytest
import torch

from geoforge.engine.models.conditioning import (camera_map, camera_rays, nerf_encoding, plucker, relative_to_first,
                                        scale_intrinsics)
from geoforge.engine.models.checkpointing import enable_activation_checkpointing
from geoforge.engine.models.dit import DIT_PRESETS, DiTConfig, VideoDiT, flops_per_token, num_params
from geoforge.engine.models.rope import apply_rope, grid_positions, rope_angles, rope_axis_dims


def small_cfg(**kw) -> DiTConfig:
    base = dict(hidden_dim=48, depth=2, num_heads=2, patch_size=2)
    base.update(kw)
    return DiTConfig(**base)


def randomized(cfg: DiTConfig, seed: int = 0) -> VideoDiT:
    """A model with every parameter random (the zero-initialised adaLN/output would hide conditioning)."""
    model = VideoDiT(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def random_rotation(gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return (q * torch.det(q)).float()  # proper rotation


def random_cameras(b: int, t: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rot = torch.stack([random_rotation(gen) for _ in range(b * t)]).reshape(b, t, 3, 3)
    trans = torch.randn(b, t, 3, 1, generator=gen)
    k = torch.tensor([[1.1 * w, 0, (w - 1) / 2], [0, 1.2 * h, (h - 1) / 2], [0, 0, 1.0]])
    return k.expand(b, t, 3, 3).clone(), torch.cat([rot, trans], dim=-1)


# ---------------------------------------------------------------- shapes, features, init

@pytest.mark.parametrize("in_channels,tp,camera", [(3, 1, "none"), (3, 2, "rays"), (4, 1, "plucker"),
                                                   (16, 2, "none")])
def test_output_shape_pixels_and_latents(in_channels, tp, camera):
    cfg = small_cfg(in_channels=in_channels, temporal_patch_size=tp, camera=camera)
    model = randomized(cfg)
    b, frames, h, w = 2, 4, 8, 6
    x = torch.randn(b, frames, in_channels, h, w)
    kw = {}
    if camera != "none":
        kw["intrinsics"], kw["extrinsics"] = random_cameras(b, frames, h, w)
    out = model(x, torch.rand(b, frames), **kw)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


def test_zero_init_gives_zero_output():
    model = VideoDiT(small_cfg(camera="rays", action_dim=3))
    x = torch.randn(1, 2, 3, 4, 4)
    k, e = random_cameras(1, 2, 4, 4)
    out = model(x, torch.rand(1, 2), intrinsics=k, extrinsics=e, actions=torch.randn(1, 2, 3))
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("tp", [1, 2])
def test_features_are_one_based_block_outputs(tp):
    cfg = small_cfg(depth=3, temporal_patch_size=tp)
    model = randomized(cfg)
    x = torch.randn(2, 4, 3, 8, 4)
    seen = {}
    model.blocks[2].register_forward_hook(lambda mod, args, out: seen.setdefault("last", out))
    model.blocks[0].register_forward_hook(lambda mod, args, out: seen.setdefault("first", out))
    t = torch.rand(2, 4)
    out, feats = model(x, t, return_features=[1, 3])
    torch.testing.assert_close(out, model(x, t), rtol=0, atol=0)
    assert set(feats) == {1, 3}
    assert feats[3].shape == (2, 4 // tp, 4, 2, 48)
    torch.testing.assert_close(feats[3], seen["last"].reshape(2, 4 // tp, 4, 2, 48), rtol=0, atol=0)
    torch.testing.assert_close(feats[1], seen["first"].reshape(2, 4 // tp, 4, 2, 48), rtol=0, atol=0)
    with pytest.raises(ValueError, match="return_features"):
        model(x, torch.rand(2, 4), return_features=[0])
    with pytest.raises(ValueError, match="return_features"):
        model(x, torch.rand(2, 4), return_features=[4])


def test_param_count_and_presets():
    cfg = small_cfg(camera="rays", action_dim=4)
    assert num_params(cfg) == sum(p.numel() for p in VideoDiT(cfg).parameters())
    assert 2e6 < num_params(DiTConfig()) < 8e6  # tiny: a few million
    assert DiTConfig(size="XL").resolved().hidden_dim == DIT_PRESETS["XL"][0] == 1152
    assert DiTConfig(size="B", depth=3).resolved().depth == 3  # an explicit field beats the preset
    # DiT-XL/2 is ~675M parameters; the video variant differs only by the per-frame embeddings.
    assert 0.66e9 < num_params(DiTConfig(size="XL", in_channels=4)) < 0.69e9


def test_flops_per_token_matches_formula():
    cfg = small_cfg(mlp_ratio=4.0)
    d, ctx = 48, 2 * 16  # T'=2 frames of 4x4 tokens, full attention
    expected = 2 * (8 * d * d + 16 * d * d + 4 * d * ctx) + 4 * 12 * d
    assert flops_per_token(cfg, 2, 8, 8) == expected
    causal = flops_per_token(small_cfg(attention="frame_causal"), 2, 8, 8)
    assert causal == expected - 2 * 4 * d * (ctx - 16 * 1.5)


# ---------------------------------------------------------------- attention pattern and conditioning

def test_frame_causal_output_ignores_later_frames():
    x = torch.randn(1, 4, 3, 4, 4)
    t = torch.rand(1, 4)
    k, e = random_cameras(1, 4, 4, 4)
    x2, e2 = x.clone(), e.clone()
    x2[:, 2:] += torch.randn_like(x2[:, 2:])
    e2[:, 2:, :, 3] += 1.0
    for attention in ("frame_causal", "full"):
        model = randomized(small_cfg(attention=attention, camera="plucker", camera_relative=False))
        a = model(x, t, intrinsics=k, extrinsics=e)
        b = model(x2, t, intrinsics=k, extrinsics=e2)
        if attention == "frame_causal":
            torch.testing.assert_close(a[:, :2], b[:, :2], rtol=1e-5, atol=1e-5)
            assert (a[:, 2:] - b[:, 2:]).abs().max() > 1e-2
        else:
            assert (a[:, :2] - b[:, :2]).abs().max() > 1e-2


@pytest.mark.parametrize("tp", [1, 2])
def test_per_frame_noise_level_conditions_its_frame(tp):
    model = randomized(small_cfg(attention="frame_causal", temporal_patch_size=tp))
    x = torch.randn(2, 4, 3, 4, 4)
    t = torch.rand(2, 4)
    t2 = t.clone()
    t2[:, 3] = 1 - t2[:, 3]  # the last frame (second frame of the last temporal patch when tp = 2)
    a, b = model(x, t), model(x, t2)
    token_frame = 3 // tp * tp  # first frame of the changed token frame
    torch.testing.assert_close(a[:, :token_frame], b[:, :token_frame], rtol=1e-5, atol=1e-5)
    assert (a[:, token_frame:] - b[:, token_frame:]).abs().amax(dim=(0, 2, 3, 4)).min() > 1e-2


def test_camera_and_action_condition_and_drop_cond_removes_them():
    model = randomized(small_cfg(camera="rays", action_dim=3))
    x, t = torch.randn(2, 2, 3, 4, 4), torch.rand(2, 2)
    k, e = random_cameras(2, 2, 4, 4, seed=1)
    _, e2 = random_cameras(2, 2, 4, 4, seed=2)
    act, act2 = torch.randn(2, 2, 3), torch.randn(2, 2, 3)
    base = model(x, t, intrinsics=k, extrinsics=e, actions=act)
    assert (base - model(x, t, intrinsics=k, extrinsics=e2, actions=act)).abs().max() > 1e-2
    assert (base - model(x, t, intrinsics=k, extrinsics=e, actions=act2)).abs().max() > 1e-2
    drop = torch.tensor([True, False])
    a = model(x, t, intrinsics=k, extrinsics=e, actions=act, drop_cond=drop)
    b = model(x, t, intrinsics=k, extrinsics=e2, actions=act2, drop_cond=drop)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)  # dropped: no dependence on camera or action
    assert (a[1] - b[1]).abs().max() > 1e-2  # kept
    # a dropped sample equals the model without any conditioning module contribution
    uncond = randomized(small_cfg())
    uncond.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(a[0], uncond(x, t)[0], rtol=1e-5, atol=1e-5)


def test_cond_dropout_in_training_only():
    model = randomized(small_cfg(camera="plucker", cond_dropout=0.5))
    x, t = torch.randn(64, 1, 3, 2, 2), torch.rand(64, 1).fill_(0.3)
    x = x[:1].expand_as(x)
    k, e = random_cameras(64, 1, 2, 2, seed=3)
    model.eval()
    ev = model(x, t, intrinsics=k, extrinsics=e)
    torch.testing.assert_close(ev, model(x, t, intrinsics=k, extrinsics=e))
    model.train()
    tr = model(x, t, intrinsics=k, extrinsics=e)
    uncond = model(x, t, intrinsics=k, extrinsics=e, drop_cond=torch.ones(64, dtype=torch.bool))
    dropped = (tr - uncond).flatten(1).abs().amax(1) < 1e-6
    kept = (tr - ev).flatten(1).abs().amax(1) < 1e-6
    assert torch.equal(dropped | kept, torch.ones(64, dtype=torch.bool))
    assert 10 < dropped.sum() < 54  # ~ Binomial(64, 0.5)


def test_activation_checkpointing_same_gradients():
    cfg = small_cfg(depth=3, camera="rays")
    plain = randomized(cfg)
    ckpt = VideoDiT(small_cfg(depth=3, camera="rays"))
    ckpt.load_state_dict(plain.state_dict())
    assert enable_activation_checkpointing(ckpt.blocks) == 3
    x, t = torch.randn(2, 2, 3, 4, 4), torch.rand(2, 2)
    k, e = random_cameras(2, 2, 4, 4)
    grads = []
    for model in (plain, ckpt):
        model.train()
        out, feats = model(x, t, intrinsics=k, extrinsics=e, return_features=[2])
        (out.square().mean() + feats[2].mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(g.abs().max() > 0 for g in grads[0].values())


def test_training_after_a_first_call_under_inference_mode():
    model = randomized(small_cfg(attention="frame_causal"))
    x, t = torch.randn(1, 3, 3, 6, 2), torch.rand(1, 3)  # a grid no other test caches
    with torch.inference_mode():
        model(x, t)
    model(x, t).square().mean().backward()  # cached RoPE tables / mask must be usable by autograd
    assert model.final.linear.weight.grad.abs().max() > 0


def test_bf16_forward_close_to_fp32():
    model = randomized(small_cfg(camera="plucker"))
    x, t = torch.randn(1, 2, 3, 4, 4), torch.rand(1, 2)
    k, e = random_cameras(1, 2, 4, 4)
    ref = model(x, t, intrinsics=k, extrinsics=e)
    out = model.to(torch.bfloat16)(x.bfloat16(), t, intrinsics=k, extrinsics=e)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 0.05


# ---------------------------------------------------------------- cameras

def test_rays_centre_pixel_is_forward_axis_and_origin_is_camera_centre():
    h, w = 5, 7
    k, e = random_cameras(2, 3, h, w, seed=4)
    origins, dirs = camera_rays(k, e, h, w)
    rot, trans = e[..., :3], e[..., 3]
    centre = -(rot.transpose(-1, -2) @ trans[..., None])[..., 0]
    torch.testing.assert_close(origins, centre)
    forward = rot[..., 2, :]  # third row of R = R^T e_z, the camera z axis in world coordinates
    torch.testing.assert_close(dirs[:, :, h // 2, w // 2], forward, rtol=1e-5, atol=1e-5)
    # every ray projects back onto its own pixel (independent check of u = column, v = row)
    points = origins[:, :, None, None] + 2.5 * dirs
    cam = torch.einsum("btij,bthwj->bthwi", rot, points) + trans[:, :, None, None]
    pix = torch.einsum("btij,bthwj->bthwi", k, cam)
    pix = pix[..., :2] / pix[..., 2:]
    v, u = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    torch.testing.assert_close(pix, torch.stack([u, v], -1).float().expand_as(pix), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(2, 3, h, w))


def test_plucker_moment_is_o_cross_d_and_invariant_along_the_ray():
    k, e = random_cameras(1, 2, 3, 4, seed=5)
    origins, dirs = camera_rays(k, e, 3, 4)
    pl = camera_map(k, e, 3, 4, "plucker")
    o = origins[:, :, None, None].expand_as(dirs)
    manual = torch.stack([o[..., 1] * dirs[..., 2] - o[..., 2] * dirs[..., 1],
                          o[..., 2] * dirs[..., 0] - o[..., 0] * dirs[..., 2],
                          o[..., 0] * dirs[..., 1] - o[..., 1] * dirs[..., 0]], dim=-1)
    torch.testing.assert_close(pl[..., :3], dirs)
    torch.testing.assert_close(pl[..., 3:], manual)
    torch.testing.assert_close(plucker(o + 3.0 * dirs, dirs)[..., 3:], manual, rtol=1e-4, atol=1e-5)


def test_ray_map_channels_and_nerf_encoding():
    k, e = random_cameras(1, 1, 2, 2)
    assert camera_map(k, e, 2, 2, "rays", 15).shape == (1, 1, 2, 2, 180)
    x = torch.tensor([[0.25, -0.5, 1.0]])
    enc = nerf_encoding(x, 2)
    args = torch.tensor([0.25 * math.pi, 0.5 * math.pi, -0.5 * math.pi, -math.pi, math.pi, 2 * math.pi])
    torch.testing.assert_close(enc, torch.cat([args.sin(), args.cos()])[None])


def test_relative_cameras_are_world_frame_invariant():
    k, e = random_cameras(1, 3, 4, 4, seed=6)
    rel = relative_to_first(e)
    torch.testing.assert_close(rel[:, 0], torch.eye(3, 4)[None], rtol=0, atol=1e-5)
    # move the world by a rigid transform G: E' = E G^-1; relative cameras must not change
    gen = torch.Generator().manual_seed(7)
    g_rot, g_t = random_rotation(gen), torch.randn(3, generator=gen)
    g_inv = torch.cat([g_rot.T, (-g_rot.T @ g_t)[:, None]], dim=1)
    g_inv4 = torch.cat([g_inv, torch.tensor([[0, 0, 0, 1.0]])])
    moved = e @ g_inv4
    torch.testing.assert_close(relative_to_first(moved), rel, rtol=1e-4, atol=1e-5)


def test_scale_intrinsics_keeps_pixel_footprints():
    k = torch.tensor([[100.0, 0, 63.5], [0, 90.0, 31.5], [0, 0, 1]])
    small = scale_intrinsics(k, 1 / 8)
    point = torch.tensor([0.3, -0.2, 2.0])
    full = (k @ point)[:2] / point[2]
    low = (small @ point)[:2] / point[2]
    torch.testing.assert_close(low, (full + 0.5) / 8 - 0.5)
    torch.testing.assert_close(scale_intrinsics(k, 1.0), k)


def test_latent_model_rescales_intrinsics():
    cfg = small_cfg(in_channels=4, camera="plucker", latent_downsample=8, camera_relative=False)
    model = randomized(cfg)
    latent_k, e = random_cameras(1, 2, 4, 4)
    pixel_k = scale_intrinsics(latent_k, 8.0)
    x, t = torch.randn(1, 2, 4, 4, 4), torch.rand(1, 2)
    ref = randomized(small_cfg(in_channels=4, camera="plucker", camera_relative=False))
    torch.testing.assert_close(model(x, t, intrinsics=pixel_k, extrinsics=e),
                               ref(x, t, intrinsics=latent_k, extrinsics=e), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- RoPE

def test_rope_scores_depend_only_on_relative_position():
    head_dim = 20
    assert rope_axis_dims(head_dim) == (8, 6, 6)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, head_dim, generator=gen)
    pos = torch.tensor([[3.0, 1.0, 4.0], [1.0, 5.0, 9.0]])
    shift = torch.tensor([[7.0, -2.0, 11.0]])

    def score(p):
        ang = rope_angles(p, head_dim, theta=100.0)
        qr = apply_rope(q[None], ang[:1].cos(), ang[:1].sin())
        kr = apply_rope(k[None], ang[1:].cos(), ang[1:].sin())
        return (qr * kr).sum()

    torch.testing.assert_close(score(pos), score(pos + shift), rtol=1e-4, atol=1e-4)
    assert abs(score(pos) - score(pos * torch.tensor([1.0, 2.0, 1.0]))) > 1e-3  # changes with the offset
    ang = rope_angles(pos, head_dim)
    rotated = apply_rope(torch.stack([q, k]), ang.cos(), ang.sin())
    torch.testing.assert_close(rotated.norm(dim=-1), torch.stack([q, k]).norm(dim=-1))  # a rotation


def test_rope_each_axis_rotates_its_own_channels():
    head_dim = 12  # (t, h, w) = (4, 4, 4) channels
    x = torch.randn(1, head_dim)
    for axis, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 12)]):
        pos = torch.zeros(1, 3)
        pos[0, axis] = 1.0
        ang = rope_angles(pos, head_dim)
        out = apply_rope(x, ang.cos(), ang.sin())
        untouched = torch.ones(head_dim, dtype=torch.bool)
        untouched[lo:hi] = False
        torch.testing.assert_close(out[0, untouched], x[0, untouched])
        assert (out[0, lo:hi] - x[0, lo:hi]).abs().max() > 1e-3
    assert grid_positions(2, 2, 3).tolist()[:4] == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0]]


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("kw,field", [
    (dict(hidden_dim=50, num_heads=4), "hidden_dim"),
    (dict(hidden_dim=40, num_heads=8), "hidden_dim / num_heads"),
    (dict(size="XXL"), "size"),
    (dict(attention="causal"), "attention"),
    (dict(camera="pose"), "camera"),
    (dict(cond_dropout=1.0), "cond_dropout"),
    (dict(cond_dropout=0.1), "cond_dropout"),  # nothing to drop
    (dict(patch_size=0), "patch_size"),
    (dict(temporal_patch_size=0), "temporal_patch_size"),
    (dict(action_dim=-1), "action_dim"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        DiTConfig(**kw).validate()
    with pytest.raises(ValueError, match=field):
        VideoDiT(DiTConfig(**kw))


def test_valid_config_resolves_preset():
    cfg = DiTConfig(hidden_dim=40, num_heads=4).resolved()  # head_dim 10 -> RoPE split (6, 2, 2)
    cfg.validate()
    assert (cfg.hidden_dim, cfg.depth, cfg.num_heads) == (40, DIT_PRESETS["tiny"][1], 4)
    assert rope_axis_dims(10) == (6, 2, 2)


def test_forward_input_errors_are_clear():
    model = VideoDiT(small_cfg(temporal_patch_size=2, camera="rays"))
    k, e = random_cameras(1, 3, 4, 4)
    with pytest.raises(ValueError, match="temporal_patch_size"):
        model(torch.randn(1, 3, 3, 4, 4), torch.rand(1, 3), intrinsics=k, extrinsics=e)
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.randn(1, 2, 3, 5, 4), torch.rand(1, 2), intrinsics=k[:, :2], extrinsics=e[:, :2])
    with pytest.raises(ValueError, match="intrinsics"):
        model(torch.randn(1, 2, 3, 4, 4), torch.rand(1, 2))
    with pytest.raises(ValueError, match="in_channels"):
        model(torch.randn(1, 2, 4, 4, 4), torch.rand(1, 2))
    with pytest.raises(ValueError, match=r"t must be \[B, T\]"):
        model(torch.randn(1, 2, 3, 4, 4), torch.rand(1), intrinsics=k[:, :2], extrinsics=e[:, :2])


# ----------------------------------------------------------------------------- GPU lane
def _flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("attention_kind", ["full", "frame_causal"])
def test_cuda_bf16_forward_backward_matches_fp32(attention_kind, monkeypatch):
    """A camera-conditioned DiT in bf16 on CUDA (flash-attn when installed) against the same model in fp32:
    outputs and parameter gradients, and the kernel each attention call actually ran."""
    import copy

    import geoforge.engine.models.attention as attn_mod

    monkeypatch.setattr(attn_mod, "_used", {})
    monkeypatch.setitem(attn_mod._state, "backend", None)
    cfg = small_cfg(hidden_dim=128, num_heads=2, camera="rays", camera_freqs=4, attention=attention_kind)
    model32 = randomized(cfg).cuda()
    model16 = copy.deepcopy(model32).bfloat16()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 16, 16, generator=gen).cuda()
    t = torch.rand(2, 4, generator=gen).cuda()
    k = torch.tensor([[14.0, 0, 7.5], [0, 14.0, 7.5], [0, 0, 1]]).expand(2, 4, 3, 3).cuda()
    e = torch.eye(3, 4).expand(2, 4, 3, 4).clone().cuda()
    e[..., 3] = torch.linspace(0, 1, 4).cuda()[None, :, None]
    out32 = model32(x, t, intrinsics=k, extrinsics=e)
    out16 = model16(x, t, intrinsics=k, extrinsics=e)   # cameras and t stay fp32
    rel = ((out16.float() - out32).norm() / out32.norm()).item()
    assert rel < 3e-2, f"bf16 output off by {rel:.3g} (relative)"
    out32.square().mean().backward()
    out16.float().square().mean().backward()
    for (name, p32), p16 in zip(model32.named_parameters(), model16.parameters()):
        if p32.grad is not None and p32.grad.norm() > 0:
            g_rel = ((p16.grad.float() - p32.grad).norm() / p32.grad.norm()).item()
            assert g_rel < 1e-1, f"{name}: bf16 gradient off by {g_rel:.3g}"
    used = attn_mod.attention_report()["geoforge.engine.models.dit:DiTBlock.attend"]
    if attention_kind == "frame_causal":
        assert used.startswith("sdpa"), used   # a block mask: no flash-attn kernel takes it
    elif _flash_attn_installed():
        assert used == "flash_attn", used
    else:
        assert used == "sdpa", used
