"""Image preprocessing for VGGT (``vggt/utils/load_fn.py::load_and_preprocess_images``) on PIL images or
tensors, plus a resize helper for the Geometry Forcing teacher.

Official rules (``target_size`` 518, sizes multiples of 14):

- RGBA images are composited on white, then converted to RGB;
- ``crop``: width -> 518, height -> ``round(h * 518 / w / 14) * 14`` (bicubic), then a centre crop of the
  height to 518 when it is larger;
- ``pad``: the long side -> 518, the short side -> ``round(short * 518 / long / 14) * 14``, then white
  (1.0) padding to 518 x 518, split ``d // 2`` before and the rest after;
- images of different sizes are padded with white to the largest ``(H, W)``;
- output ``[N, 3, H, W]`` float32 in [0, 1], no normalisation (the aggregator normalises).

PIL inputs are resized with PIL's bicubic filter, exactly as the official code. Tensor inputs are resized
with ``F.interpolate(mode="bicubic", antialias=True)`` (the same filter family as PIL's; values can differ
from PIL by about one 8-bit level) and clamped to [0, 1].
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

TARGET_SIZE = 518
PATCH = 14


def _as_rgb(image):
    """A ``[3, H, W]`` tensor (float in [0, 1] or uint8) -> float tensor; a PIL image -> RGB PIL image."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be [3, H, W], got {tuple(image.shape)}")
        return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    from PIL import Image  # PIL is only needed for PIL inputs

    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a [3, H, W] tensor, got {type(image).__name__}")
    if image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def _resize(image, height: int, width: int) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        out = F.interpolate(image[None], size=(height, width), mode="bicubic", antialias=True,
                            align_corners=False)[0]
        return out.clamp(0.0, 1.0)
    from PIL import Image

    resized = image.resize((width, height), Image.Resampling.BICUBIC)
    data = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1).float() / 255.0


def _pad_to(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    dh, dw = height - img.shape[1], width - img.shape[2]
    if dh <= 0 and dw <= 0:
        return img
    return F.pad(img, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="constant", value=1.0)


def preprocess_images(images: Sequence, mode: str = "crop", target_size: int = TARGET_SIZE) -> torch.Tensor:
    """PIL images or ``[3, H, W]`` tensors -> ``[N, 3, H', W']`` in [0, 1], official crop/pad rules."""
    if len(images) == 0:
        raise ValueError("at least 1 image is required")
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    out = []
    for image in images:
        img = _as_rgb(image)
        width, height = (img.shape[2], img.shape[1]) if isinstance(img, torch.Tensor) else img.size
        if mode == "crop" or width >= height:
            new_w, new_h = target_size, round(height * (target_size / width) / PATCH) * PATCH
        else:
            new_h, new_w = target_size, round(width * (target_size / height) / PATCH) * PATCH
        img = _resize(img, new_h, new_w)
        if mode == "crop" and new_h > target_size:
            top = (new_h - target_size) // 2
            img = img[:, top:top + target_size, :]
        if mode == "pad":
            img = _pad_to(img, target_size, target_size)
        out.append(img)
    max_h, max_w = max(i.shape[1] for i in out), max(i.shape[2] for i in out)
    return torch.stack([_pad_to(i, max_h, max_w) for i in out])


def load_and_preprocess_images(paths: Sequence[str | Path], mode: str = "crop") -> torch.Tensor:
    """Open image files with PIL and apply :func:`preprocess_images`."""
    from PIL import Image

    images = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        with Image.open(path) as im:
            im.load()
            images.append(im.copy())
    return preprocess_images(images, mode=mode)


def vggt_size(height: int, width: int, target_width: int = TARGET_SIZE) -> tuple[int, int]:
    """``(H', W')`` for the teacher: width ``target_width``, height by aspect ratio, both multiples of 14."""
    if target_width % PATCH:
        raise ValueError(f"target_width must be a multiple of {PATCH}, got {target_width}")
    return max(PATCH, round(height * target_width / width / PATCH) * PATCH), target_width


def resize_for_vggt(frames: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[..., 3, H, W]`` frames in [0, 1] to ``size_hw`` (multiples of 14).

    For the Geometry Forcing teacher: video batches ``[B, T, 3, H, W]`` go in, ``[B, T, 3, H', W']`` out.
    Downscaling uses antialiasing; values are clamped to [0, 1].
    """
    h, w = size_hw
    if h % PATCH or w % PATCH or h <= 0 or w <= 0:
        raise ValueError(f"size_hw must be positive multiples of {PATCH}, got {size_hw}")
    if frames.dim() < 3 or frames.shape[-3] != 3:
        raise ValueError(f"frames must be [..., 3, H, W], got {tuple(frames.shape)}")
    lead = frames.shape[:-3]
    flat = frames.reshape(-1, *frames.shape[-3:]).float()
    if flat.shape[-2:] != (h, w):
        flat = F.interpolate(flat, size=(h, w), mode="bilinear", align_corners=False,
                             antialias=h < flat.shape[-2] or w < flat.shape[-1]).clamp(0.0, 1.0)
    return flat.reshape(*lead, 3, h, w)
