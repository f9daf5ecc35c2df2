"""I3D for FVD: pytorch-i3d key layout, TensorFlow SAME padding, preprocessing, loading, the extractor."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from geoforge.engine.eval.frechet import fvd
from geoforge.engine.eval.i3d import FVDExtractor, InceptionI3d, _same_pad, preprocess_clips

# pytorch-i3d (piergiaj), InceptionModule(in_channels, [b0, b1a, b1b, b2a, b2b, b3b]).
MIXED = {
    "Mixed_3b": (192, [64, 96, 128, 16, 32, 32]), "Mixed_3c": (256, [128, 128, 192, 32, 96, 64]),
    "Mixed_4b": (480, [192, 96, 208, 16, 48, 64]), "Mixed_4c": (512, [160, 112, 224, 24, 64, 64]),
    "Mixed_4d": (512, [128, 128, 256, 24, 64, 64]), "Mixed_4e": (512, [112, 144, 288, 32, 64, 64]),
    "Mixed_4f": (528, [256, 160, 320, 32, 128, 128]), "Mixed_5b": (832, [256, 160, 320, 32, 128, 128]),
    "Mixed_5c": (832, [384, 192, 384, 48, 128, 128]),
}


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    units = {"Conv3d_1a_7x7": (64, 3, 7, 7, 7), "Conv3d_2b_1x1": (64, 64, 1, 1, 1),
             "Conv3d_2c_3x3": (192, 64, 3, 3, 3)}
    for name, (cin, (b0, b1a, b1b, b2a, b2b, b3b)) in MIXED.items():
        units.update({f"{name}.b0": (b0, cin, 1, 1, 1), f"{name}.b1a": (b1a, cin, 1, 1, 1),
                      f"{name}.b1b": (b1b, b1a, 3, 3, 3), f"{name}.b2a": (b2a, cin, 1, 1, 1),
                      f"{name}.b2b": (b2b, b2a, 3, 3, 3), f"{name}.b3b": (b3b, cin, 1, 1, 1)})
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in units.items():
        out[f"{name}.conv3d.weight"] = shape
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.bn.{p}"] = (shape[0],)
        out[f"{name}.bn.num_batches_tracked"] = ()
    out["logits.conv3d.weight"] = (400, 1024, 1, 1, 1)
    out["logits.conv3d.bias"] = (400,)
    return out


@pytest.fixture(scope="module")
def model() -> InceptionI3d:
    torch.manual_seed(0)
    m = InceptionI3d()
    for conv in m.modules():  # He init keeps activations O(1) through the random network
        if isinstance(conv, nn.Conv3d):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    return m.eval()


def test_state_dict_matches_pytorch_i3d_layout(model: InceptionI3d) -> None:
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _expected_shapes()
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("size", list(range(1, 20)))
@pytest.mark.parametrize("kernel,stride", [(7, 2), (3, 1), (3, 2), (2, 2), (1, 1)])
def test_same_padding_is_tensorflows(size: int, kernel: int, stride: int) -> None:
    # TensorFlow SAME: out = ceil(in / s), total pad = max((out - 1) s + k - in, 0), the extra pixel at the end.
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    x = torch.ones(1, 1, size, size, size)
    padded = _same_pad(x, (kernel,) * 3, (stride,) * 3)
    assert padded.shape[-1] == size + total
    row = padded[0, 0, total // 2, total // 2]  # a line through the input along the last axis
    before = total // 2
    assert row[:before].sum() == 0 and bool((row[before:before + size] == 1).all())
    assert row[before + size:].sum() == 0
    assert F.max_pool3d(padded, kernel, stride).shape[-1] == out


def test_preprocess_clips_against_a_direct_computation() -> None:
    videos = torch.rand(2, 18, 3, 20, 24)
    clips = preprocess_clips(videos, resolution=32, num_frames=16)
    assert clips.shape == (2, 3, 16, 32, 32)
    frame = F.interpolate(videos[1, 5][None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(clips[1, :, 5], 2 * frame - 1)
    assert preprocess_clips(videos, 32, None).shape[2] == 18
    with pytest.raises(ValueError, match="num_frames=16"):
        preprocess_clips(videos[:, :8], 32, 16)


def test_forward_features_and_from_pretrained(model: InceptionI3d, tmp_path: Path) -> None:
    torch.manual_seed(1)
    videos = torch.rand(2, 8, 3, 48, 48)
    extractor = FVDExtractor(model, resolution=64, num_frames=None)
    feats = extractor(videos)
    assert feats.shape == (2, 400) and bool(torch.isfinite(feats).all())
    torch.testing.assert_close(feats, model(preprocess_clips(videos, 64, None)))
    assert not torch.allclose(feats[0], feats[1])
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save(model.state_dict(), path)
    loaded = FVDExtractor.from_pretrained(path, resolution=64, num_frames=None)
    torch.testing.assert_close(loaded(videos), feats)
    bad = {k: v for k, v in model.state_dict().items() if not k.startswith("logits")}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="logits.conv3d"):
        FVDExtractor.from_pretrained(tmp_path / "bad.pt")


def test_fvd_of_identical_and_different_sets(model: InceptionI3d) -> None:
    torch.manual_seed(2)
    real = torch.rand(5, 8, 3, 32, 32)
    extractor = FVDExtractor(model, resolution=64, num_frames=None)
    assert fvd(real, real.clone(), extractor, batch_size=2) == pytest.approx(0.0, abs=1e-6)
    assert fvd(real, (real * 0.5).flip(1), extractor, batch_size=3) > 1e-3
