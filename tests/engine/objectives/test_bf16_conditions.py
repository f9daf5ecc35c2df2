"""Under bf16 (``distributed.precision: bf16``, every GPU recipe: DeepSpeed's bf16 weights) the conditions stay float32.

The training module used to cast intrinsics, extrinsics and the flow time ``t`` to the model's dtype before the
embeddings saw them. bf16 keeps 8 bits of mantissa: a camera 3 m from the origin moves by ~1 cm, and the
15-frequency NeRF encoding of the ray map (frequencies up to 2^14 pi) turns that into noise. These tests run
the real module in bf16 on CPU (bf16 exists there) and capture what the embeddings receive.
"""
from __future__ import annotations

import math

import pytest
import torch

import geoforge.engine.models.conditioning as conditioning
from geoforge.engine.models.dit import DiTConfig, VideoDiT
from geoforge.engine.objectives.flow_matching import FlowMatchingConfig
from geoforge.engine.objectives.video_loss import VideoDiffusionLoss, sample_noise


def _rotation(axis: torch.Tensor, angle: float) -> torch.Tensor:
    axis = axis / axis.norm()
    k = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return torch.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def realistic_batch(b: int = 1, frames: int = 4, size: int = 16) -> dict[str, torch.Tensor]:
    """RE10K-like: focal ~0.9 image widths, a camera walking ~0.3 m per frame a few metres from the origin."""
    g = torch.Generator().manual_seed(3)
    f = 0.9 * size
    k = torch.tensor([[f, 0.0, (size - 1) / 2], [0.0, f, (size - 1) / 2], [0.0, 0.0, 1.0]])
    ext = []
    for i in range(frames):
        r = _rotation(torch.tensor([0.2, 1.0, 0.1]), 0.05 * i + 0.3)
        centre = torch.tensor([2.1 + 0.31 * i, -0.73, 3.37 + 0.17 * i])
        ext.append(torch.cat([r, (-r @ centre)[:, None]], dim=1))
    return {"frames": torch.rand(b, frames, 3, size, size, generator=g),
            "intrinsics": k.expand(b, frames, 3, 3).clone(), "extrinsics": torch.stack(ext).expand(b, -1, -1, -1).clone(),
            "index": torch.arange(b)}


def _module(dtype: torch.dtype) -> VideoDiffusionLoss:
    torch.manual_seed(0)
    dit = VideoDiT(DiTConfig(hidden_dim=32, depth=1, num_heads=2, camera="rays", camera_freqs=15))
    return VideoDiffusionLoss(dit, FlowMatchingConfig()).to(dtype)


def _captured_ray_map(module, batch, monkeypatch) -> torch.Tensor:
    seen = []
    original = conditioning.camera_map

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.detach())
        return out

    monkeypatch.setattr(conditioning, "camera_map", spy)
    noise = sample_noise(module.objective, 0.0, batch["frames"].shape, batch["index"], seed=0, step=0)
    module(batch, noise)
    assert len(seen) == 1
    return seen[0]


def test_ray_map_under_bf16_matches_fp32(monkeypatch):
    batch = realistic_batch()
    fp32 = _captured_ray_map(_module(torch.float32), batch, monkeypatch)
    bf16 = _captured_ray_map(_module(torch.bfloat16), batch, monkeypatch)
    assert bf16.dtype == torch.float32
    err = (bf16 - fp32).abs().mean().item()
    # bf16 cameras gave a mean |error| of ~0.4 here (the high frequencies were noise); fp32 cameras: 0
    assert err < 1e-3, f"ray map under bf16 differs from fp32 by a mean |error| of {err:.3g}"


def test_bf16_cameras_would_be_noise():
    """The size of what the test above guards against: the same map from bf16-rounded cameras."""
    batch = realistic_batch()
    k, e = batch["intrinsics"], conditioning.relative_to_first(batch["extrinsics"])
    exact = conditioning.camera_map(k, e, 16, 16, "rays", 15)
    rounded = conditioning.camera_map(k.bfloat16(), conditioning.relative_to_first(
        batch["extrinsics"].bfloat16().float()), 16, 16, "rays", 15)
    assert (rounded - exact).abs().mean().item() > 0.1


def test_flow_time_reaches_the_embedding_in_fp32(monkeypatch):
    module = _module(torch.bfloat16)
    batch = realistic_batch()
    noise = sample_noise(module.objective, 0.0, batch["frames"].shape, batch["index"], seed=0, step=0)
    seen = []
    monkeypatch.setattr(conditioning, "timestep_features",
                        lambda t, *a, _f=conditioning.timestep_features: seen.append(t) or _f(t, *a))
    module(batch, noise)
    assert seen and seen[0].dtype == torch.float32
    assert torch.equal(seen[0], noise["t"]), "t was rounded on its way to the noise-level embedding"


@pytest.mark.parametrize("key", ["intrinsics", "extrinsics"])
def test_condition_keeps_cameras_fp32(key):
    module = _module(torch.bfloat16)
    cond = module.condition(realistic_batch(), torch.bfloat16)
    assert cond[key].dtype == torch.float32
