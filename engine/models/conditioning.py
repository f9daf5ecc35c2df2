"""Conditioning inputs of the video DiT: noise level, camera rays and actions.

Conventions (see DESIGN.md): cameras are OpenCV (x right, y down, z forward); ``extrinsics`` are
camera-from-world ``[..., 3, 4]``; ``intrinsics`` are 3x3 in pixels with pixel centres at integer
coordinates, so pixel (u, v) has the camera-frame direction ``K^-1 [u, v, 1]``.

Every embedding returns one vector per *token frame*: with a temporal patch size ``tp`` the ``tp``
frames of a patch are folded together by concatenating their per-frame features before the first
linear layer (no frame's noise level or action is averaged away).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from einops import rearrange

CAMERA_KINDS = ("none", "rays", "plucker")


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[..., dim]`` (float32) of flow times ``t`` in [0, 1], scaled by 1000 as in DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


class NoiseLevelEmbedding(nn.Module):
    """Per-frame flow time ``t [B, T]`` -> ``[B, T / tp, hidden]`` (features of the tp frames concatenated)."""

    def __init__(self, hidden: int, temporal_patch: int = 1, freq_dim: int = 256):
        super().__init__()
        self.tp, self.freq_dim = temporal_patch, freq_dim
        self.mlp = nn.Sequential(nn.Linear(temporal_patch * freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(rearrange(feats, "b (t pt) f -> b t (pt f)", pt=self.tp))


class ActionEmbedding(nn.Module):
    """Per-frame actions ``[B, T, A]`` -> ``[B, T / tp, hidden]`` (the tp frames' actions concatenated)."""

    def __init__(self, action_dim: int, hidden: int, temporal_patch: int = 1):
        super().__init__()
        self.tp, self.action_dim = temporal_patch, action_dim
        self.mlp = nn.Sequential(nn.Linear(temporal_patch * action_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, actions: torch.Tensor) -> torch.Tensor:
        if actions.shape[-1] != self.action_dim:
            raise ValueError(f"actions: last dim must be action_dim={self.action_dim}, got {tuple(actions.shape)}")
        a = actions.to(self.mlp[0].weight.dtype)
        return self.mlp(rearrange(a, "b (t pt) a -> b t (pt a)", pt=self.tp))


def scale_intrinsics(intrinsics: torch.Tensor, factor: float) -> torch.Tensor:
    """Intrinsics for an image resized by ``factor`` (0.125 for an 8x-downsampling VAE grid).

    With integer pixel centres, pixel u of the original covers [u - 0.5, u + 0.5), so its position
    on the resized grid is ``(u + 0.5) * factor - 0.5``: fx' = fx * factor, cx' = (cx + 0.5) * factor - 0.5.
    """
    k = intrinsics.clone()
    k[..., :2, :] = k[..., :2, :] * factor
    k[..., :2, 2] = k[..., :2, 2] + 0.5 * factor - 0.5
    return k


def relative_to_first(extrinsics: torch.Tensor) -> torch.Tensor:
    """Camera-from-world ``[B, T, 3, 4]`` re-expressed in frame 0's camera frame (frame 0 becomes [I | 0]).

    ``E_t' = E_t @ E_0^-1``: rotation ``R_t R_0^T``, translation ``t_t - R_t R_0^T t_0``. The result does
    not depend on the choice of world frame.
    """
    r, tr = extrinsics[..., :3], extrinsics[..., 3:]
    r0, t0 = r[:, :1], tr[:, :1]
    r_rel = r @ r0.transpose(-1, -2)
    return torch.cat([r_rel, tr - r_rel @ t0], dim=-1)


def camera_rays(intrinsics: torch.Tensor, extrinsics: torch.Tensor, height: int,
                width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space rays through every pixel centre of a ``height x width`` image.

    intrinsics ``[B, T, 3, 3]`` (pixels), extrinsics ``[B, T, 3, 4]`` camera-from-world ``[R | t]``.
    Returns origins ``[B, T, 3]`` (the camera centre ``-R^T t``) and unit directions
    ``[B, T, height, width, 3]`` (``R^T K^-1 [u, v, 1]`` normalised, u = column, v = row). Float32.
    """
    if intrinsics.shape[-2:] != (3, 3) or extrinsics.shape[-2:] != (3, 4):
        raise ValueError(f"intrinsics must be [..., 3, 3] and extrinsics [..., 3, 4], got "
                         f"{tuple(intrinsics.shape)} and {tuple(extrinsics.shape)}")
    k_inv = torch.linalg.inv(intrinsics.float())
    r, tr = extrinsics[..., :3].float(), extrinsics[..., 3].float()
    v, u = torch.meshgrid(torch.arange(height, device=k_inv.device, dtype=torch.float32),
                          torch.arange(width, device=k_inv.device, dtype=torch.float32), indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # [H, W, 3]
    world_from_pix = r.transpose(-1, -2) @ k_inv  # [B, T, 3, 3]
    dirs = torch.einsum("btij,hwj->bthwi", world_from_pix, pix)
    origins = -(r.transpose(-1, -2) @ tr[..., None])[..., 0]
    return origins, nn.functional.normalize(dirs, dim=-1)


def plucker(origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Plücker coordinates ``[..., 6] = (d, o x d)`` for origins broadcastable to directions ``[..., 3]``."""
    origins = origins.expand_as(directions)
    return torch.cat([directions, torch.linalg.cross(origins, directions, dim=-1)], dim=-1)


def nerf_encoding(x: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """NeRF frequency encoding ``[..., C] -> [..., 2 * num_freqs * C]``.

    Channel order: for each input channel c, ``sin(2^k pi x_c)`` for k = 0..num_freqs-1, then the cosines.
    """
    freqs = math.pi * 2.0 ** torch.arange(num_freqs, device=x.device, dtype=torch.float32)
    args = (x.float()[..., None] * freqs).flatten(-2)  # [..., C * num_freqs]
    return torch.cat([args.sin(), args.cos()], dim=-1)


def camera_channels(kind: str, num_freqs: int) -> int:
    """Channels of the per-pixel camera map: rays -> 2 * 3 * 2 * num_freqs (180 for 15), plucker -> 6."""
    if kind == "rays":
        return 12 * num_freqs
    if kind == "plucker":
        return 6
    raise ValueError(f"camera must be one of {CAMERA_KINDS[1:]} for a camera map, got {kind!r}")


def camera_map(intrinsics: torch.Tensor, extrinsics: torch.Tensor, height: int, width: int, kind: str,
               num_freqs: int = 15) -> torch.Tensor:
    """Per-pixel camera features ``[B, T, height, width, C]`` (float32), C = ``camera_channels(kind, num_freqs)``.

    ``rays``: NeRF encodings of the origin and of the direction, concatenated (DFoT's ray encoding);
    ``plucker``: (d, o x d).
    """
    origins, dirs = camera_rays(intrinsics, extrinsics, height, width)
    origins = origins[:, :, None, None, :]
    if kind == "plucker":
        return plucker(origins, dirs)
    camera_channels(kind, num_freqs)  # validates kind
    return torch.cat([nerf_encoding(origins, num_freqs).expand(*dirs.shape[:-1], -1),
                      nerf_encoding(dirs, num_freqs)], dim=-1)


class CameraEmbedding(nn.Module):
    """Camera map patch-embedded on the DiT token grid: -> ``[B, T / tp, (H / p) * (W / p), hidden]``.

    Rays are computed at the cell centres of the grid the model sees (``height x width`` of x). For a
    latent model, ``latent_downsample`` is the pixel-to-grid factor and pixel intrinsics are rescaled
    with ``scale_intrinsics(K, 1 / latent_downsample)``. With ``relative`` the cameras are first
    re-expressed relative to frame 0 (``relative_to_first``).
    """

    def __init__(self, kind: str, hidden: int, patch_size: int, temporal_patch: int, num_freqs: int = 15,
                 latent_downsample: int = 1, relative: bool = True):
        super().__init__()
        self.kind, self.num_freqs, self.relative = kind, num_freqs, relative
        self.p, self.tp, self.downsample = patch_size, temporal_patch, latent_downsample
        in_dim = temporal_patch * patch_size * patch_size * camera_channels(kind, num_freqs)
        self.proj = nn.Linear(in_dim, hidden)

    def forward(self, intrinsics: torch.Tensor, extrinsics: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Cameras are used in float32 (pass them in float32: a bf16 camera is already off by its rounding);
        only the camera map fed to ``proj`` takes the weights' dtype."""
        intrinsics, extrinsics = intrinsics.float(), extrinsics.float()
        if self.downsample != 1:
            intrinsics = scale_intrinsics(intrinsics, 1.0 / self.downsample)
        if self.relative:
            extrinsics = relative_to_first(extrinsics.float())
        cmap = camera_map(intrinsics, extrinsics, height, width, self.kind, self.num_freqs)
        patches = rearrange(cmap.to(self.proj.weight.dtype), "b (t pt) (h ph) (w pw) c -> b t (h w) (pt ph pw c)",
                            pt=self.tp, ph=self.p, pw=self.p)
        return self.proj(patches)
