"""FID Inception-v3: pytorch-fid / torchvision key layout, loading, the FID-graph patches, features."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from geoforge.engine.eval.frechet import fid
from geoforge.engine.eval.inception import FIDInceptionV3

# torchvision Inception3: conv name -> (out, in, kh, kw); every conv has a BatchNorm of `out` channels.


def _a(cin: int, pool: int) -> dict[str, tuple[int, int, int, int]]:
    return {"branch1x1": (64, cin, 1, 1), "branch5x5_1": (48, cin, 1, 1), "branch5x5_2": (64, 48, 5, 5),
            "branch3x3dbl_1": (64, cin, 1, 1), "branch3x3dbl_2": (96, 64, 3, 3),
            "branch3x3dbl_3": (96, 96, 3, 3), "branch_pool": (pool, cin, 1, 1)}


def _c(cin: int, c7: int) -> dict[str, tuple[int, int, int, int]]:
    return {"branch1x1": (192, cin, 1, 1), "branch7x7_1": (c7, cin, 1, 1), "branch7x7_2": (c7, c7, 1, 7),
            "branch7x7_3": (192, c7, 7, 1), "branch7x7dbl_1": (c7, cin, 1, 1), "branch7x7dbl_2": (c7, c7, 7, 1),
            "branch7x7dbl_3": (c7, c7, 1, 7), "branch7x7dbl_4": (c7, c7, 7, 1),
            "branch7x7dbl_5": (192, c7, 1, 7), "branch_pool": (192, cin, 1, 1)}


def _e(cin: int) -> dict[str, tuple[int, int, int, int]]:
    return {"branch1x1": (320, cin, 1, 1), "branch3x3_1": (384, cin, 1, 1), "branch3x3_2a": (384, 384, 1, 3),
            "branch3x3_2b": (384, 384, 3, 1), "branch3x3dbl_1": (448, cin, 1, 1),
            "branch3x3dbl_2": (384, 448, 3, 3), "branch3x3dbl_3a": (384, 384, 1, 3),
            "branch3x3dbl_3b": (384, 384, 3, 1), "branch_pool": (192, cin, 1, 1)}


BLOCKS = {
    "Mixed_5b": _a(192, 32), "Mixed_5c": _a(256, 64), "Mixed_5d": _a(288, 64),
    "Mixed_6a": {"branch3x3": (384, 288, 3, 3), "branch3x3dbl_1": (64, 288, 1, 1),
                 "branch3x3dbl_2": (96, 64, 3, 3), "branch3x3dbl_3": (96, 96, 3, 3)},
    "Mixed_6b": _c(768, 128), "Mixed_6c": _c(768, 160), "Mixed_6d": _c(768, 160), "Mixed_6e": _c(768, 192),
    "Mixed_7a": {"branch3x3_1": (192, 768, 1, 1), "branch3x3_2": (320, 192, 3, 3),
                 "branch7x7x3_1": (192, 768, 1, 1), "branch7x7x3_2": (192, 192, 1, 7),
                 "branch7x7x3_3": (192, 192, 7, 1), "branch7x7x3_4": (192, 192, 3, 3)},
    "Mixed_7b": _e(1280), "Mixed_7c": _e(2048),
}
STEM = {"Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3), "Conv2d_2b_3x3": (64, 32, 3, 3),
        "Conv2d_3b_1x1": (80, 64, 1, 1), "Conv2d_4a_3x3": (192, 80, 3, 3)}


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    convs = dict(STEM)
    for block, spec in BLOCKS.items():
        convs.update({f"{block}.{name}": shape for name, shape in spec.items()})
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in convs.items():
        out[f"{name}.conv.weight"] = shape
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.bn.{p}"] = (shape[0],)
        out[f"{name}.bn.num_batches_tracked"] = ()
    return out


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    torch.manual_seed(0)
    m = FIDInceptionV3()
    for conv in m.modules():  # He init keeps activations O(1) through the random network
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    return m


def test_state_dict_matches_torchvision_layout(model: FIDInceptionV3) -> None:
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == _expected_shapes()
    # torchvision's inception_v3 has 27,161,264 parameters; without fc (2048*1000 + 1000) and
    # AuxLogits (3,326,696) that leaves the trunk's 21,785,568.
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - 2_049_000 - 3_326_696


def test_loads_pt_inception_layout(model: FIDInceptionV3, tmp_path: Path) -> None:
    state = {k: torch.randn_like(v.float()) for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # 1008-class head: skipped
    torch.save(state, tmp_path / "pt_inception.pth")
    loaded = FIDInceptionV3.from_pretrained(tmp_path / "pt_inception.pth")
    for key, value in loaded.state_dict().items():
        if key in state:
            torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"broken.pth.*missing keys: Mixed_7c\.branch_pool\.conv\.weight"):
        FIDInceptionV3.from_pretrained(tmp_path / "broken.pth")


def test_fid_graph_pooling_patches(model: FIDInceptionV3) -> None:
    # The pool branch's 1x1 conv picks input channel 0; BN stays the identity (eval, fresh stats).
    x = torch.randn(1, 2048, 5, 5)
    for block, pooled in ((model.Mixed_7b, F.avg_pool2d(torch.ones(1, 1, 5, 5), 3, 1, 1, count_include_pad=False)),
                          (model.Mixed_7c, None)):
        cin = block.branch_pool.conv.in_channels
        saved = block.branch_pool.conv.weight.clone()
        block.branch_pool.conv.weight.zero_()
        block.branch_pool.conv.weight[:, 0] = 1.0
        inp = x[:, :cin]
        out = block(inp)[:, -192:]  # the pool branch comes last
        block.branch_pool.conv.weight.copy_(saved)
        if pooled is None:  # Mixed_7c: 3x3 max pool
            ref = F.max_pool2d(inp[:, :1], 3, 1, 1)
        else:  # Mixed_7b: average over the valid pixels only (TF), so a constant map stays constant
            ref = F.avg_pool2d(inp[:, :1], 3, 1, 1, count_include_pad=False)
            assert torch.allclose(pooled, torch.ones_like(pooled))
        eps = block.branch_pool.bn.eps
        torch.testing.assert_close(out, F.relu(ref / (1 + eps) ** 0.5).expand_as(out), rtol=1e-5, atol=1e-6)


def test_features_at_299(model: FIDInceptionV3) -> None:
    images = torch.rand(2, 3, 40, 56)  # resized to 299x299 inside
    feats = model(images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all() and feats.std() > 0.1


def test_fid_with_small_inputs(model: FIDInceptionV3) -> None:
    model.resize_input = False
    try:
        real = torch.rand(3, 3, 75, 75)
        feats = model(real)
        torch.testing.assert_close(model(real[1:2]), feats[1:2], rtol=1e-4, atol=1e-5)  # batch-independent
        assert fid(real, real.clone(), model, batch_size=2) == pytest.approx(0.0, abs=1e-6)
        assert fid(real, real.flip(-1) * 0.5, model, batch_size=3) > 0
    finally:
        model.resize_input = True
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        model(torch.rand(3, 75, 75))
