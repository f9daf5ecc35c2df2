"""2D rotary position embedding (RoPE) of the VGGT aggregator.

Reproduces ``vggt/layers/rope.py`` (``RotaryPositionEmbedding2D`` + ``PositionGetter``) and the way
``Aggregator.forward`` builds positions:

- every frame gets the same integer grid ``(y, x)`` of its patches, row-major, **shifted by +1**, and the
  ``patch_start_idx`` special tokens (camera + registers) get position ``(0, 0)``;
- the head dimension ``D`` is split in two halves: the first half is rotated by the ``y`` position, the
  second by ``x``; each half uses ``D/4`` frequencies ``1 / base**(2i / (D/2))`` whose angles are laid out
  as ``cat(angles, angles)`` and rotated with ``rotate_half`` (``[-x2, x1]``), not interleaved pairs.

Unlike the official module (which recomputes a cos/sin table from ``positions.max()`` in every attention
call), the angles are computed once per forward (:func:`rope_angles`) and cos/sin once per dtype
(:class:`RopeCache`). The values are the same: ``angle = position * inv_freq`` in float32, cast to the
query dtype, then ``cos``/``sin`` in that dtype, as the official ``_compute_frequency_components`` does.
"""
from __future__ import annotations

import torch


def patch_positions(grid_h: int, grid_w: int, num_special: int, device=None) -> torch.Tensor:
    """Integer positions ``[num_special + grid_h * grid_w, 2]`` as ``(y, x)``: specials at 0, patches +1."""
    ys = torch.arange(grid_h, device=device)
    xs = torch.arange(grid_w, device=device)
    grid = torch.cartesian_prod(ys, xs) + 1
    special = torch.zeros(num_special, 2, dtype=grid.dtype, device=device)
    return torch.cat([special, grid], dim=0)


def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """Float32 rotation angles ``[..., N, head_dim]`` for integer ``positions [..., N, 2]`` (y, x).

    Layout along the last dim: ``[a_y, a_y, a_x, a_x]`` with ``a = position * inv_freq`` and
    ``inv_freq = 1 / base ** (arange(0, D/2, 2) / (D/2))`` (``D/4`` frequencies per axis).
    """
    if head_dim % 4 != 0:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    half = head_dim // 2
    exponents = torch.arange(0, half, 2, device=positions.device).float() / half
    inv_freq = 1.0 / (base ** exponents)
    ang = positions.to(inv_freq.dtype).unsqueeze(-1) * inv_freq  # [..., N, 2, D/4]
    ang_y, ang_x = ang.unbind(-2)
    return torch.cat([ang_y, ang_y, ang_x, ang_x], dim=-1)


def rotate_halves(x: torch.Tensor) -> torch.Tensor:
    """``rotate_half`` applied separately to the y half and the x half of the last dim."""
    q = x.unflatten(-1, (2, 2, x.shape[-1] // 4))  # [..., axis, part, D/4]
    return torch.stack([-q[..., 1, :], q[..., 0, :]], dim=-2).flatten(-3)


class RopeCache:
    """Angles of one token layout plus their cos/sin, computed once per dtype.

    ``angles``: float32 ``[N, head_dim]`` (shared by every sequence in the batch and every head).
    """

    def __init__(self, angles: torch.Tensor):
        self.angles = angles
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def repeat(self, times: int) -> "RopeCache":
        """The layout of ``times`` consecutive frames (global attention over ``S * P`` tokens)."""
        return RopeCache(self.angles.repeat(times, 1))

    def cos_sin(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._tables:
            ang = self.angles.to(dtype)
            self._tables[dtype] = (ang.cos().to(dtype), ang.sin().to(dtype))
        return self._tables[dtype]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [B, heads, N, head_dim]``: ``x * cos + rotate_halves(x) * sin``."""
        cos, sin = self.cos_sin(x.dtype)
        return x * cos + rotate_halves(x) * sin
