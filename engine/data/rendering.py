"""Pieces shared by the synthetic scene renderers (``engine.data.synthetic``'s rooms and
``engine.data.voxel_render``'s voxel worlds): the light direction, periodic value noise, camera
rotations from yaw / pitch / roll, and the world rays through pixel centres. NumPy only.

Conventions: OpenCV camera axes (x right, y down, z forward), world y down; intrinsics ``k`` in pixels
with pixel centres at integer coordinates.
"""
from __future__ import annotations

import numpy as np

LIGHT = np.array([0.3, -0.8, 0.5]) / np.linalg.norm([0.3, -0.8, 0.5])  # towards the light (up = -y)
NOISE_PERIOD = 32  # lattice period of the value-noise tables (a power of two)


def value_noise(points: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Smooth periodic 3D value noise in [0, 1] at points [3, N]: trilinear (smoothstep-eased)
    interpolation of the random ``table`` values at the integer lattice points."""
    base = np.floor(points)
    f = points - base
    f = f * f * (3 - 2 * f)
    lo = base.astype(np.int32) & (NOISE_PERIOD - 1)
    hi = (lo + 1) & (NOISE_PERIOD - 1)
    x = (lo[0] * NOISE_PERIOD**2, hi[0] * NOISE_PERIOD**2)
    y = (lo[1] * NOISE_PERIOD, hi[1] * NOISE_PERIOD)
    z = (lo[2], hi[2])

    def along_z(i: int, j: int) -> np.ndarray:
        v0 = table[x[i] + y[j] + z[0]]
        return v0 + f[2] * (table[x[i] + y[j] + z[1]] - v0)

    def along_yz(i: int) -> np.ndarray:
        v0 = along_z(i, 0)
        return v0 + f[1] * (along_z(i, 1) - v0)

    v0 = along_yz(0)
    return v0 + f[0] * (along_yz(1) - v0)


def rotation(yaw: np.ndarray, pitch: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """Camera-to-world rotations [T, 3, 3] = R_y(yaw) R_x(pitch) R_z(roll) (yaw about the down axis)."""
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    one, zero = np.ones_like(yaw), np.zeros_like(yaw)
    ry = np.stack([np.stack([cy, zero, sy], -1), np.stack([zero, one, zero], -1), np.stack([-sy, zero, cy], -1)], -2)
    rx = np.stack([np.stack([one, zero, zero], -1), np.stack([zero, cp, -sp], -1), np.stack([zero, sp, cp], -1)], -2)
    rz = np.stack([np.stack([cr, -sr, zero], -1), np.stack([sr, cr, zero], -1), np.stack([zero, zero, one], -1)], -2)
    return ry @ rx @ rz


def pixel_rays(c2w: np.ndarray, k: np.ndarray, height: int, width: int, offsets: np.ndarray) -> np.ndarray:
    """World ray directions [3, T, S*H*W] through pixel centres shifted by ``offsets`` [S, 2]; their
    camera-space z is 1, so the ray parameter of a hit is its depth."""
    v, u = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pix = np.stack([(u[None] + offsets[:, 0, None, None]).ravel(), (v[None] + offsets[:, 1, None, None]).ravel(),
                    np.ones(len(offsets) * height * width)])
    cam = np.linalg.inv(k) @ pix  # [3, S*H*W]
    return np.einsum("tij,jm->itm", c2w, cam).astype(np.float32)


__all__ = ["LIGHT", "NOISE_PERIOD", "value_noise", "rotation", "pixel_rays"]
