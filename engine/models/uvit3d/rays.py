"""DFoT's ray-encoding camera condition (``camera_pose_conditioning.type: ray_encoding``).

Input: the raw RealEstate10K pose vector per frame, 16 numbers ``[fx, fy, cx, cy, r11 r12 r13 t1 r21 ...
t3]``: intrinsics normalised by the image size (the image spans [0, 1], pixel centres at
``(u + 0.5) / W``) and the world-to-camera ``[R | t]`` row-major (DFoT ``CameraPose.from_vectors``).

1. Poses relative to the first frame (``normalize_by: first``): ``R_t R_0^T`` and ``t_t - R_t R_0^T t_0``
   (``engine.models.conditioning.relative_to_first``).
2. Rays at every pixel of a ``res x res`` image: direction ``R^T [(u + 0.5 - cx res) / (fx res),
   (v + 0.5 - cy res) / (fy res), 1]`` (not normalised), origin ``-R^T t``.
3. NeRF encoding of origin and direction with 15 frequencies ``2^k pi``: per input channel ``c`` the 15
   arguments ``a = x_c 2^k pi``, then ``sin(a)`` for all channels followed by ``sin(a + pi / 2)``
   (DFoT's form: at high frequencies the float32 ``a + pi / 2`` rounds, so this is not ``cos(a)``
   bit for bit, and the official one is reproduced). Channels: origin (90), then direction (90).

Computed in the poses' dtype (DFoT: float32, autocast off). :func:`poses16_from_cameras` converts
GeoForge's pixel intrinsics / camera-from-world extrinsics to this vector.
"""
from __future__ import annotations

import math

import torch

from geoforge.engine.models.conditioning import relative_to_first

RAY_FREQS = 15


def split_poses16(poses16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T, 16]`` -> normalised ``(fx, fy, cx, cy) [B, T, 4]`` and world-to-camera ``[B, T, 3, 4]``."""
    if poses16.ndim != 3 or poses16.shape[-1] != 16:
        raise ValueError(f"poses16 must be [B, T, 16] (fx fy cx cy + 3x4 world-to-camera), got {tuple(poses16.shape)}")
    k, rt = poses16.split([4, 12], dim=-1)
    return k, rt.unflatten(-1, (3, 4))


def nerf_sin_encoding(x: torch.Tensor, num_freqs: int = RAY_FREQS) -> torch.Tensor:
    """``[..., C] -> [..., 2 C num_freqs]``: ``sin(a)`` then ``sin(a + pi/2)``, ``a = x_c 2^k pi`` (c-major)."""
    scale = 2 ** torch.linspace(0, num_freqs - 1, num_freqs, device=x.device, dtype=x.dtype) * math.pi
    args = (x[..., None] * scale).flatten(-2)
    return torch.sin(torch.cat([args, args + 0.5 * math.pi], dim=-1))


def ray_condition(poses16: torch.Tensor, resolution: int, num_freqs: int = RAY_FREQS) -> torch.Tensor:
    """DFoT's ray-encoding condition ``[B, T, 12 num_freqs (180), res, res]`` from raw poses ``[B, T, 16]``."""
    k, rt = split_poses16(poses16)
    rt = relative_to_first(rt)
    r, t = rt[..., :3], rt[..., 3]
    coords = torch.linspace(0, resolution - 1, resolution, device=poses16.device, dtype=poses16.dtype) + 0.5
    fx, fy, cx, cy = (k * resolution)[..., None, None].unbind(-3)      # each [B, T, 1, 1]
    x = (coords[None, :] - cx) / fx                                     # [B, T, 1, W]
    y = (coords[:, None] - cy) / fy                                     # [B, T, H, 1]
    x, y = torch.broadcast_tensors(x, y)
    direction = torch.stack([x, y, torch.ones_like(x)], dim=-1)        # [B, T, H, W, 3]
    r_inv = r.transpose(-1, -2)
    direction = torch.einsum("btij,bthwj->bthwi", r_inv, direction)
    origin = -torch.einsum("btij,btj->bti", r_inv, t)
    enc_origin = nerf_sin_encoding(origin, num_freqs)[:, :, None, None].expand(*direction.shape[:-1], -1)
    enc = torch.cat([enc_origin, nerf_sin_encoding(direction, num_freqs)], dim=-1)
    return enc.permute(0, 1, 4, 2, 3)


def poses16_from_cameras(intrinsics: torch.Tensor, extrinsics: torch.Tensor, height: int, width: int
                         ) -> torch.Tensor:
    """GeoForge cameras (pixel ``K [B, T, 3, 3]`` with pixel centres at integer coordinates, camera-from-
    world ``[B, T, 3, 4]``) of a ``height x width`` image -> DFoT's raw ``[B, T, 16]`` pose vector
    (normalised intrinsics, pixel-edge origin: ``cx_norm = (cx + 0.5) / W``)."""
    fx = intrinsics[..., 0, 0] / width
    fy = intrinsics[..., 1, 1] / height
    cx = (intrinsics[..., 0, 2] + 0.5) / width
    cy = (intrinsics[..., 1, 2] + 0.5) / height
    return torch.cat([torch.stack([fx, fy, cx, cy], dim=-1), extrinsics.flatten(-2)], dim=-1)
