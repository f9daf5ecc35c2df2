"""GeoForge's U-ViT3D against the official DFoT / Geometry Forcing code (``tests/data/uvit3d/golden.*``).

The fixture was produced by ``tests/data/uvit3d/make_golden.py`` (its docstring says how): the official
``UViT3DPose`` of ``CIntellifusion/GeometryForcing`` @ bf86144 (backbone files identical to DFoT cc614cc
except GF's ``return_latents``) at a tiny config, random float16-exact weights, run on CPU in float32 and
float64 with the ray condition of real RealEstate10K poses computed by the official ``CameraPose`` code.

Tolerances. Relative = max |ours - official| / max |official| per tensor. float32: 1e-4 (the issue's bar;
achieved <= 7e-6 on an AVX-512 CPU). float64: 2e-5 (achieved <= 7e-6) - the stored reference is exact to
~5e-7 (float16 residual, see ``golden.json``), and the official code computes RMSNorm and the Fourier
features in float32 even in a float64 model, GeoForge in float64. float32 and float64 official results differ by ~1e-3 (the 2^14 pi ray frequencies
round differently), so each precision is compared with its own reference.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from geoforge.engine.models.uvit3d import UViT3D, UViT3DConfig, ray_condition

DATA = Path(__file__).resolve().parents[3] / "data" / "uvit3d"
TOL = {torch.float32: 1e-4, torch.float64: 2e-5}


@pytest.fixture(scope="module")
def golden():
    return load_file(str(DATA / "golden.safetensors")), json.loads((DATA / "golden.json").read_text())


def _constructor(meta):
    return {"cfg": meta["tiny_cfg"], "x_shape": meta["x_shape"], "max_tokens": meta["max_tokens"],
            "external_cond_dim": 16}


def _model(golden, dtype, fold="auto"):
    tensors, meta = golden
    model = UViT3D.from_dfot_config(_constructor(meta), fold_pose=fold).eval()
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def _reference(tensors, name, dtype):
    ref = tensors[f"fp32.{name}"].double()
    return ref + tensors[f"fp64res.{name}"].double() if dtype == torch.float64 else ref


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_config_from_constructor(golden):
    cfg = UViT3DConfig.from_dfot_constructor(_constructor(golden[1]))
    assert cfg.channels == [32, 32, 16, 32] and cfg.resolution == 32 and cfg.max_frames == 2
    assert cfg.num_feature_maps == 7 and cfg.use_checkpointing == [False, False, False, True]


@pytest.mark.parametrize("fold", ["never", "always"])   # pose embedding as DFoT computes it / folded into FiLM
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_latents_match_official(golden, dtype, fold):
    tensors, _ = golden
    model = _model(golden, dtype, fold)
    x, noise, poses = tensors["in.x"], tensors["in.noise_levels"], tensors["in.poses16"]
    rays = ray_condition(poses.to(dtype), x.shape[-1])
    with torch.no_grad():
        out, latents = model.dfot_forward(x.to(dtype), noise.to(dtype), rays, return_latents=True)
    assert out.dtype == dtype and len(latents) == 7
    errors = {"out": rel_err(out, _reference(tensors, "out", dtype))}
    for i, lat in enumerate(latents):
        ref = _reference(tensors, f"latent{i}", dtype)
        assert lat.shape == ref.shape, (i, lat.shape, ref.shape)
        errors[f"latent{i}"] = rel_err(lat, ref)
    assert max(errors.values()) < TOL[dtype], errors


def test_geoforge_forward_equals_official_call(golden):
    """``forward(poses16=..., return_features=(3,))`` = the official call; feature 3 = latent 2, channels-last."""
    tensors, _ = golden
    model = _model(golden, torch.float32)
    x, noise, poses = tensors["in.x"], tensors["in.noise_levels"], tensors["in.poses16"]
    with torch.no_grad():
        out, feats = model(x, noise, poses16=poses, return_features=(3,))
    assert rel_err(out, tensors["fp32.out"]) < 1e-4
    assert feats[3].shape == (1, 2, 4, 4, 16)
    assert rel_err(feats[3].permute(0, 1, 4, 2, 3), tensors["fp32.latent2"]) < 1e-4
    assert model.feature_channels(3) == 16 and model.feature_channels(4) == 32 and model.feature_channels(7) == 32


def test_ray_condition_matches_official(golden):
    tensors, _ = golden
    rays = ray_condition(tensors["rays.poses16"], 4)
    ref = tensors["rays.res4"]
    assert rays.shape == ref.shape == (2, 2, 180, 4, 4)
    # identical float32 operations: equal up to a few ulps of the large (2^14 pi) arguments
    assert (rays - ref).abs().max() < 1e-4, (rays - ref).abs().max()
    # the first frame is the reference camera: origin ~0 (float32 rounding of R R^T) -> sin ~0, sin(+pi/2) ~1
    assert torch.allclose(rays[:, 0, :45], torch.zeros(()), atol=2e-2)
    assert torch.allclose(rays[:, 0, 45:90], torch.ones(()), atol=2e-2)
    assert rays[:, 1, :45].abs().max() > 0.5   # the second camera has moved


@pytest.mark.parametrize("fold", ["never", "always"])
def test_pose_dropout_mask_zeroes_the_camera(golden, fold):
    """``external_cond_mask`` (True = drop) zeroes the whole pose embedding of that clip, bias included."""
    tensors, _ = golden
    model = _model(golden, torch.float32, fold)
    x, noise, poses = tensors["in.x"], tensors["in.noise_levels"], tensors["in.poses16"]
    rays = ray_condition(poses, x.shape[-1])
    with torch.no_grad():
        kept = model.dfot_forward(x, noise, rays)
        dropped = model.dfot_forward(x, noise, rays, external_cond_mask=torch.tensor([True]))
        model.external_cond_embedding.patch_embedder.proj.bias.zero_()
        no_pose = model.dfot_forward(x, noise, torch.zeros_like(rays))
    assert rel_err(kept, dropped) > 1e-2
    assert torch.allclose(dropped, no_pose, atol=1e-6)
