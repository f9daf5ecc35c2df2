"""I3D (Inception-v1 inflated to 3-D, Kinetics-400) and the FVD feature extractor.

``InceptionI3d`` reproduces piergiaj/pytorch-i3d's module (as vendored by VideoGPT, TATS and
content-debiased-fvd) with the same parameter names (``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_4b.b1b.bn.running_var``, ``logits.conv3d.bias`` ...), so ``i3d_pretrained_400.pt``
(TATS/VideoGPT's conversion of TF-Hub ``deepmind/i3d-kinetics-400/1``, the network of the original
TensorFlow FVD) loads unchanged. Convs and max-pools use TensorFlow "SAME" padding computed from the
input size; BatchNorm eps defaults to 1e-5 as in those ports (``bn_eps``; Sonnet's own default was 1e-3).

FVD protocol (StyleGAN-V / TF FVD; ``FVDExtractor``): clips of ``num_frames`` = 16 consecutive frames
(the first 16 of each given video; the caller picks the clip), every frame resized bilinearly
(``align_corners=False``) to 224×224, [0, 1] → [-1, 1], and the 400 logits *before* the softmax as
the feature vector. The logits are averaged over the remaining time (and space) positions, as
the TF model's ``reduce_mean`` does; at 16×224×224 there is exactly one position. The final average
pool (2×7×7 at 224²) shrinks to the feature map when the input is smaller, so reduced sizes (e.g.
8×64×64) run too, for tests.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from geoforge.engine.weights import load_into, load_state_dict

Triple = tuple[int, int, int]
# (b0, b1a, b1b, b2a, b2b, b3b) output channels of each Inception module, in order.
MIXED_CHANNELS: dict[str, tuple[int, ...]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
FVD_RESOLUTION, FVD_NUM_FRAMES, I3D_CLASSES = 224, 16, 400


def _out_channels(name: str) -> int:
    out = MIXED_CHANNELS[name]
    return out[0] + out[2] + out[4] + out[5]


def _in_channels(name: str) -> int:
    names = list(MIXED_CHANNELS)
    index = names.index(name)
    return 192 if index == 0 else _out_channels(names[index - 1])


def _same_pad(x: torch.Tensor, kernel: Triple, stride: Triple) -> torch.Tensor:
    """Zero-pad [B, C, T, H, W] as TensorFlow's "SAME" (extra pixel at the end)."""
    pads: list[int] = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Zero padding equals -inf padding here: every input follows a ReLU.
        return F.max_pool3d(_same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class Unit3D(nn.Module):
    """SAME-padded Conv3d, then BatchNorm3d and ReLU (the logits unit: bias, no BN, no ReLU)."""

    def __init__(self, cin: int, cout: int, kernel: Triple = (1, 1, 1), stride: Triple = (1, 1, 1),
                 bn_eps: float = 1e-5, logits: bool = False) -> None:
        super().__init__()
        self.kernel, self.stride, self.activation = kernel, stride, not logits
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, bias=logits)
        self.bn = None if logits else nn.BatchNorm3d(cout, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_same_pad(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class InceptionModule(nn.Module):
    def __init__(self, cin: int, out: Sequence[int], bn_eps: float) -> None:
        super().__init__()
        self.b0 = Unit3D(cin, out[0], bn_eps=bn_eps)
        self.b1a = Unit3D(cin, out[1], bn_eps=bn_eps)
        self.b1b = Unit3D(out[1], out[2], (3, 3, 3), bn_eps=bn_eps)
        self.b2a = Unit3D(cin, out[3], bn_eps=bn_eps)
        self.b2b = Unit3D(out[3], out[4], (3, 3, 3), bn_eps=bn_eps)
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(cin, out[5], bn_eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                          self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """I3D: clips [B, 3, T, H, W] in [-1, 1] → class logits [B, num_classes] (before softmax)."""

    def __init__(self, num_classes: int = I3D_CLASSES, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), bn_eps=bn_eps)
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64, bn_eps=bn_eps)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), bn_eps=bn_eps)
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        mixed = {name: InceptionModule(_in_channels(name), out, bn_eps) for name, out in MIXED_CHANNELS.items()}
        self.Mixed_3b, self.Mixed_3c = mixed["Mixed_3b"], mixed["Mixed_3c"]
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b, self.Mixed_4c, self.Mixed_4d = mixed["Mixed_4b"], mixed["Mixed_4c"], mixed["Mixed_4d"]
        self.Mixed_4e, self.Mixed_4f = mixed["Mixed_4e"], mixed["Mixed_4f"]
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b, self.Mixed_5c = mixed["Mixed_5b"], mixed["Mixed_5c"]
        self.logits = Unit3D(_out_channels("Mixed_5c"), num_classes, logits=True)
        self.requires_grad_(False)
        self.eval()

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.ndim != 5 or clips.shape[1] != 3:
            raise ValueError(f"InceptionI3d: clips must be [B, 3, T, H, W], got {tuple(clips.shape)}")
        x = clips
        for name, module in self.named_children():
            if name != "logits":
                x = module(x)
        kernel = [min(k, s) for k, s in zip((2, 7, 7), x.shape[2:])]
        x = F.avg_pool3d(x, kernel, stride=1)
        return self.logits(x).mean(dim=(2, 3, 4))


def preprocess_clips(videos: torch.Tensor, resolution: int = FVD_RESOLUTION,
                     num_frames: int | None = FVD_NUM_FRAMES) -> torch.Tensor:
    """Videos [B, T, 3, H, W] in [0, 1] → I3D input [B, 3, num_frames, resolution, resolution] in [-1, 1].

    Takes the first ``num_frames`` frames (all with ``None``) and resizes each frame bilinearly.
    """
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be [B, T, 3, H, W], got {tuple(videos.shape)}")
    b, t = videos.shape[:2]
    if num_frames is not None:
        if t < num_frames:
            raise ValueError(f"videos have {t} frames, the FVD clip needs num_frames={num_frames}")
        videos, t = videos[:, :num_frames], num_frames
    frames = F.interpolate(videos.reshape(b * t, *videos.shape[2:]), size=(resolution, resolution),
                           mode="bilinear", align_corners=False)
    clips = frames.reshape(b, t, 3, resolution, resolution).transpose(1, 2)
    return 2 * clips - 1


class FVDExtractor(nn.Module):
    """FVD features: videos [B, T, 3, H, W] in [0, 1] → I3D logits [B, 400] (see the module doc)."""

    def __init__(self, i3d: InceptionI3d | None = None, resolution: int = FVD_RESOLUTION,
                 num_frames: int | None = FVD_NUM_FRAMES) -> None:
        super().__init__()
        self.i3d = i3d if i3d is not None else InceptionI3d()
        self.resolution, self.num_frames = resolution, num_frames

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        clips = preprocess_clips(videos.to(self.i3d.logits.conv3d.weight.dtype), self.resolution,
                                 self.num_frames)
        return self.i3d(clips)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, resolution: int = FVD_RESOLUTION,
                        num_frames: int | None = FVD_NUM_FRAMES, bn_eps: float = 1e-5) -> "FVDExtractor":
        """Load ``i3d_pretrained_400.pt`` (local path or ``hf://``) into a Kinetics-400 I3D."""
        i3d = InceptionI3d(bn_eps=bn_eps)
        load_into(i3d, load_state_dict(source), source=os.fspath(source))
        return cls(i3d, resolution, num_frames)
