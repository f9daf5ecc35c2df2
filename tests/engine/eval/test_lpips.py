"""LPIPS(VGG16): official key layout, loading, metric properties, and an independent recomputation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from geoforge.engine.eval.lpips import LPIPS

# torchvision vgg16().features conv layers: index -> (out, in) channels, all 3x3 with bias.
VGG_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
             14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512),
             26: (512, 512), 28: (512, 512)}
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 = after the convs 2, 7, 14, 21, 28.
TAP_CONVS = (2, 7, 14, 21, 28)
POOL_BEFORE = (5, 10, 17, 24)  # a 2x2 max-pool precedes these convs
LIN_CHANNELS = (64, 128, 256, 512, 512)


@pytest.fixture(scope="module")
def model() -> LPIPS:
    torch.manual_seed(0)
    m = LPIPS(chunk=3)
    for lin in m.lins:  # official lin weights are non-negative
        lin.model[1].weight.abs_()
    return m


def test_state_dict_matches_official_names(model: LPIPS) -> None:
    backbone = {k: tuple(v.shape) for k, v in model.net.state_dict().items()}
    expected = {}
    for i, (cout, cin) in VGG_CONVS.items():
        expected[f"features.{i}.weight"] = (cout, cin, 3, 3)
        expected[f"features.{i}.bias"] = (cout,)
    assert backbone == expected
    lins = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("lin")}
    assert lins == {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(LIN_CHANNELS)}
    assert not any(p.requires_grad for p in model.parameters())


def _reference_lpips(model: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS from the raw weights with functional ops in float64 (independent of the modules)."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def taps(img: torch.Tensor) -> list[torch.Tensor]:
        h, out = ((2 * img.double() - 1) - shift) / scale, []
        for i in VGG_CONVS:
            if i in POOL_BEFORE:
                h = F.max_pool2d(h, 2)
            h = F.relu(F.conv2d(h, sd[f"net.features.{i}.weight"], sd[f"net.features.{i}.bias"], padding=1))
            if i in TAP_CONVS:
                out.append(h)
        return out

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for k, (fx, fy) in enumerate(zip(taps(x), taps(y))):
        nx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
        ny = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
        w = sd[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)
        total += ((nx - ny) ** 2 * w).sum(dim=1).mean(dim=(1, 2))
    return total


def test_matches_independent_recomputation(model: LPIPS) -> None:
    x, y = torch.rand(4, 3, 16, 24), torch.rand(4, 3, 16, 24)
    got = model(x, y)
    torch.testing.assert_close(got.double(), _reference_lpips(model, x, y), rtol=1e-4, atol=1e-7)


def test_metric_properties(model: LPIPS) -> None:
    x = torch.rand(2, 3, 3, 16, 16)  # [B, T, 3, H, W]: one value per frame
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    d = model(x, y)
    assert d.shape == (2, 3)
    torch.testing.assert_close(model(x, x), torch.zeros(2, 3))
    torch.testing.assert_close(model(y, x), d)
    assert (d > 0).all()
    torch.testing.assert_close(d[1, 2], model(x[1, 2][None], y[1, 2][None])[0])
    farther = model(x, (x + 0.5 * torch.randn_like(x)).clamp(0, 1))
    assert (farther > d).all()


def test_from_pretrained_torchvision_and_lpips_formats(model: LPIPS, tmp_path: Path) -> None:
    vgg = {f"features.{k}": v.clone() for k, v in
           ((k.removeprefix("features."), v) for k, v in model.net.state_dict().items())}
    vgg["classifier.0.weight"] = torch.zeros(8, 4)  # torchvision's classifier: ignored
    torch.save(vgg, tmp_path / "vgg16.pth")
    lins = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("lin")}
    save_file(lins, str(tmp_path / "vgg_lin.safetensors"))
    loaded = LPIPS.from_pretrained(tmp_path / "vgg16.pth", tmp_path / "vgg_lin.safetensors")
    x, y = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x, y), model(x, y))

    # A full lpips.LPIPS state dict (net.slice{k}.{i}.*, scaling_layer.*) serves as both files.
    slice_of = {i: 1 + sum(i > t for t in (3, 8, 15, 22)) for i in VGG_CONVS}
    full = {f"net.slice{slice_of[i]}.{i}.{p}": model.net.state_dict()[f"features.{i}.{p}"]
            for i in VGG_CONVS for p in ("weight", "bias")}
    full.update(lins)
    full["scaling_layer.shift"] = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    torch.save(full, tmp_path / "lpips_full.pth")
    again = LPIPS.from_pretrained(tmp_path / "lpips_full.pth", tmp_path / "lpips_full.pth")
    torch.testing.assert_close(again(x, y), model(x, y))


def test_bad_inputs_and_files_are_named(model: LPIPS, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        model(torch.rand(2, 4, 8, 8), torch.rand(2, 4, 8, 8))
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth \(LPIPS lin layers\).*missing keys: lin1"):
        model.load_lin(tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth \(VGG16 backbone\).*missing keys: features.0.weight"):
        model.load_backbone(tmp_path / "partial.pth")
