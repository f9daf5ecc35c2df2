"""What a generated video has to beat, and whether it is noise.

The two trivial predictions of the frames after the context, from the ground-truth clip:

- ``flat``: every frame a flat image of the clip's mean colour (per channel, over all its frames);
- ``repeat``: the last context frame repeated (a static camera).

:func:`high_frequency_energy`: the mean squared response to the 3x3 Laplacian (per channel, valid
pixels) of images in [0, 1]. Sampled noise carries tens of times the ground truth's; a blurred sample
carries less. The ratio generated / ground truth is what the run report and the end-to-end tests read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def flat_frames(video: torch.Tensor, context: int) -> torch.Tensor:
    """``[N, T - context, C, H, W]``: the clip's mean colour of ``video [N, T, C, H, W]`` as flat frames."""
    mean = video.float().mean(dim=(1, 3, 4), keepdim=True)
    return mean.expand(-1, video.shape[1] - context, -1, video.shape[3], video.shape[4]).clone()


def repeated_context(video: torch.Tensor, context: int) -> torch.Tensor:
    """``[N, T - context, C, H, W]``: the last context frame of ``video`` repeated."""
    if not 0 < context < video.shape[1]:
        raise ValueError(f"need 0 < context ({context}) < frames ({video.shape[1]})")
    return video[:, context - 1:context].float().expand(-1, video.shape[1] - context, -1, -1, -1).clone()


def high_frequency_energy(images: torch.Tensor) -> float:
    """Mean squared 3x3 Laplacian of ``images [..., C, H, W]`` (float, [0, 1])."""
    c, h, w = images.shape[-3:]
    flat = images.float().reshape(-1, c, h, w)
    kernel = _LAPLACIAN.to(flat.device).reshape(1, 1, 3, 3).repeat(c, 1, 1, 1)
    return float(F.conv2d(flat, kernel, groups=c).square().mean())


__all__ = ["flat_frames", "repeated_context", "high_frequency_energy"]
