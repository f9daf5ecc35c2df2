"""3D rotary position embedding (RoPE) over (t, h, w) token grids.

The head dimension ``d`` (even, >= 6) is split into three even parts, one per axis:
``d_h = d_w = 2 * (d // 6)`` and ``d_t = d - d_h - d_w`` (the remainder goes to time). Within the
part of an axis, channel pairs ``(2i, 2i+1)`` are rotated by the angle ``pos * theta^(-2i / d_axis)``
(interleaved-pair convention). Because every pair is rotated by an angle linear in the position,
``<rope(q, p), rope(k, p')>`` depends on ``p - p'`` only.

Angles are computed in float32 on the fly for any grid (no maximum length) and cached per grid.
Another split of the head dimension can be given as ``axis_dims`` (DFoT's U-ViT3D splits
``head_dim // 2`` frequency pairs as evenly as possible, height and width first: ``dfot_axis_dims``).
"""
from __future__ import annotations

import functools

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels given to the (t, h, w) axes for ``head_dim``; raises ValueError if it cannot be split."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head_dim >= 6 (hidden_dim / num_heads), got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def dfot_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """DFoT's ``RotaryEmbedding3D`` split: ``n = head_dim // 2`` pairs; n % 3 == 0 -> (n/3,)*3,
    1 -> time gets the extra pair, 2 -> height and width get one extra pair each (channels = 2 * pairs)."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head_dim >= 6, got {head_dim}")
    n = head_dim // 2
    pairs = {0: (n // 3,) * 3, 1: (n // 3 + 1, n // 3, n // 3), 2: (n // 3, n // 3 + 1, n // 3 + 1)}[n % 3]
    return tuple(2 * p for p in pairs)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                axis_dims: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Rotation angles ``[L, head_dim // 2]`` (float32) for integer or real ``positions [L, 3]`` (t, h, w).

    ``axis_dims``: channels per axis (even, summing to head_dim); default ``rope_axis_dims(head_dim)``."""
    if positions.ndim != 2 or positions.shape[-1] != 3:
        raise ValueError(f"positions must be [L, 3] (t, h, w), got {tuple(positions.shape)}")
    dims = rope_axis_dims(head_dim) if axis_dims is None else tuple(axis_dims)
    if sum(dims) != head_dim or any(d % 2 for d in dims):
        raise ValueError(f"axis_dims {dims} must be even and sum to head_dim={head_dim}")
    parts = []
    for axis, dim in enumerate(dims):
        inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
        parts.append(positions[:, axis, None].float() * inv_freq)
    return torch.cat(parts, dim=-1)


def grid_positions(frames: int, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """``[frames * height * width, 3]`` (t, h, w) indices in row-major token order (t slowest)."""
    axes = [torch.arange(n, device=device) for n in (frames, height, width)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


@functools.lru_cache(maxsize=32)
def rope_tables(frames: int, height: int, width: int, head_dim: int, theta: float,
                device: torch.device, axis_dims: tuple[int, int, int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached ``(cos, sin)``, each ``[L, head_dim // 2]`` float32, for a (frames, height, width) grid.

    Built outside inference mode so that a first call under ``torch.inference_mode`` does not cache
    tensors that autograd later refuses to save.
    """
    with torch.inference_mode(False):
        angles = rope_angles(grid_positions(frames, height, width, device), head_dim, theta, axis_dims)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., L, d]`` by tables ``[L, d // 2]``; computed in float32 (float64 stays float64),
    returned in x's dtype."""
    pairs = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
