"""LPIPS v0.1 with the VGG16 backbone (Zhang et al. 2018, richzhang/PerceptualSimilarity).

    LPIPS(x, y) = Σ_l mean_{h,w} w_lᵀ (φ̂_l(x) − φ̂_l(y))²,   φ̂ = φ / (‖φ‖₂ over channels + 1e-10)

φ_l are the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (``features`` indices
3, 8, 15, 22, 29 in torchvision's numbering) and w_l ≥ 0 the learned 1×1 "lin" layers.

Inputs are images in [0, 1], ``[..., 3, H, W]`` (every leading index is one image, e.g. the frames
of a [B, T, 3, H, W] batch). The official network takes [-1, 1] (``lpips.LPIPS(...)(x, y,
normalize=True)`` maps [0, 1] inputs with 2x − 1); this module applies that map itself and then the
official ScalingLayer (x − shift) / scale. The output is the spatially averaged distance per image.

Weights (``LPIPS.from_pretrained``):
- backbone: torchvision's VGG16 state dict (``features.{0,2,5,...,28}.{weight,bias}``; the
  ``classifier.*`` keys are ignored), or a full ``lpips.LPIPS`` state dict (``net.slice{k}.{i}.*``);
- lin layers: the LPIPS v0.1 ``vgg.pth`` file (``lin{k}.model.1.weight``, [1, C_k, 1, 1]; index 0 of
  ``model`` is the training-time dropout, an identity here).
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from geoforge.engine.weights import load_into, load_state_dict

# torchvision vgg16 "D" configuration up to relu5_3: channels, "M" = 2×2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features[:30]`` (module indices kept so its weights load unchanged).

    ``forward(x [N, 3, H, W]) -> list of the five tapped activations``.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG16_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in VGG16_TAPS:
                taps.append(x)
        return taps


class NetLinLayer(nn.Module):
    """A 1×1 conv C → 1 without bias, laid out as the official ``model.1`` (``model.0`` = dropout)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


def _normalize_channels(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return feat / (feat.square().sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS(VGG16) v0.1; ``forward(x, y)`` on [..., 3, H, W] in [0, 1] → distances [...]."""

    def __init__(self, chunk: int = 32) -> None:
        super().__init__()
        if chunk < 1:
            raise ValueError(f"LPIPS: chunk must be >= 1, got {chunk}")
        self.chunk = chunk
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = (NetLinLayer(c) for c in LPIPS_CHANNELS)
        self.requires_grad_(False)
        self.eval()

    @property
    def lins(self) -> list[NetLinLayer]:
        return [self.lin0, self.lin1, self.lin2, self.lin3, self.lin4]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Channel-normalised VGG taps of images [N, 3, H, W] in [0, 1]."""
        scaled = (2 * images - 1 - self.shift) / self.scale
        return [_normalize_channels(f) for f in self.net(scaled)]

    def _distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feats = self.features(torch.cat([x, y]))
        total = x.new_zeros(x.shape[0])
        for feat, lin in zip(feats, self.lins):
            fx, fy = feat.chunk(2)
            total = total + lin.model((fx - fy).square()).mean(dim=(1, 2, 3))
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim < 3 or x.shape[-3] != 3:
            raise ValueError(f"LPIPS: inputs must be two [..., 3, H, W] tensors of one shape, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        lead = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:]).to(self.shift.dtype)
        y = y.reshape(-1, *y.shape[-3:]).to(self.shift.dtype)
        out = torch.cat([self._distance(a, b) for a, b in zip(x.split(self.chunk), y.split(self.chunk))])
        return out.reshape(lead)

    def load_backbone(self, source: str | os.PathLike) -> None:
        """Load torchvision VGG16 (``features.*``) or full-LPIPS (``net.slice{k}.{i}.*``) weights."""
        state = {}
        for key, value in load_state_dict(source).items():
            sliced = re.fullmatch(r"net\.slice\d\.(\d+\.(?:weight|bias))", key)
            if sliced:
                state["features." + sliced.group(1)] = value
            elif key.startswith("features."):
                state[key] = value
        load_into(self.net, state, source=f"{os.fspath(source)} (VGG16 backbone)")

    def load_lin(self, source: str | os.PathLike) -> None:
        """Load the LPIPS v0.1 lin layers (``lin{k}.model.1.weight``); backbone keys are skipped."""
        state = {k: v for k, v in load_state_dict(source).items()
                 if not k.startswith(("net.", "scaling_layer."))}
        lins = nn.ModuleDict({f"lin{k}": lin for k, lin in enumerate(self.lins)})
        load_into(lins, state, source=f"{os.fspath(source)} (LPIPS lin layers)")

    @classmethod
    def from_pretrained(cls, backbone_path: str | os.PathLike, lin_path: str | os.PathLike,
                        chunk: int = 32) -> "LPIPS":
        """LPIPS with the VGG16 backbone from ``backbone_path`` and lin layers from ``lin_path``
        (local files or ``hf://`` references, see ``engine.weights``)."""
        model = cls(chunk=chunk)
        model.load_backbone(backbone_path)
        model.load_lin(lin_path)
        return model
