"""Pixel ranges, in one place: images in [0, 1] (data, metrics, files), the models' [-1, 1], and uint8.

Imports nothing of ``engine``: any layer may use it.
"""
from __future__ import annotations

import numpy as np
import torch


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (what the video models see)."""
    return x * 2 - 1


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped to the range first (model samples may overshoot)."""
    return (x.clamp(-1, 1) + 1) / 2


def to_uint8(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """[0, 1] -> uint8 [0, 255] (clamped, rounded), same layout and kind (tensor or numpy array)."""
    if isinstance(x, np.ndarray):
        return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8)


__all__ = ["to_signed", "to_unit", "to_uint8"]
