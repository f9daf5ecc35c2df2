"""Depth unprojection in torch, equivalent to ``vggt/utils/geometry.py`` (which works in numpy).

Conventions: OpenCV pinhole, ``extrinsic [S, 3, 4]`` camera-from-world, ``intrinsic [S, 3, 3]`` in
pixels with pixel centres at integer coordinates (pixel ``(u, v)`` sits at ``x = u, y = v``):
``X_cam = ((u - cx) d / fx, (v - cy) d / fy, d)``, ``X_world = R^T (X_cam - t)``.

The per-pixel work is the shared op ``kernels.reproject.unproject_depth`` (same convention; its
``backend`` picks the plain-torch reference, the C++ CPU kernel or Triton). :func:`unproject_depth_reference`
below is an independent plain-torch formula kept as a cross-check.
"""
from __future__ import annotations

import torch


def closed_form_inverse_se3(se3: torch.Tensor) -> torch.Tensor:
    """Invert ``[N, 3, 4]`` or ``[N, 4, 4]`` rigid transforms -> ``[N, 4, 4]`` (``[R^T | -R^T t]``)."""
    if se3.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"se3 must be [N, 3, 4] or [N, 4, 4], got {tuple(se3.shape)}")
    rot_t = se3[..., :3, :3].transpose(-1, -2)
    out = torch.eye(4, dtype=se3.dtype, device=se3.device).repeat(*se3.shape[:-2], 1, 1)
    out[..., :3, :3] = rot_t
    out[..., :3, 3:] = -rot_t @ se3[..., :3, 3:]
    return out


def unproject_depth_reference(depth: torch.Tensor, extrinsic: torch.Tensor,
                              intrinsic: torch.Tensor) -> torch.Tensor:
    """``depth [S, H, W]`` -> world points ``[S, H, W, 3]`` (plain torch)."""
    s, h, w = depth.shape
    v, u = torch.meshgrid(torch.arange(h, device=depth.device, dtype=depth.dtype),
                          torch.arange(w, device=depth.device, dtype=depth.dtype), indexing="ij")
    fx, fy = intrinsic[:, 0, 0].view(s, 1, 1), intrinsic[:, 1, 1].view(s, 1, 1)
    cx, cy = intrinsic[:, 0, 2].view(s, 1, 1), intrinsic[:, 1, 2].view(s, 1, 1)
    cam = torch.stack([(u - cx) * depth / fx, (v - cy) * depth / fy, depth], dim=-1)
    cam_to_world = closed_form_inverse_se3(extrinsic)
    return cam @ cam_to_world[:, None, :3, :3].transpose(-1, -2) + cam_to_world[:, None, None, :3, 3]


def unproject_depth_map_to_point_map(depth_map: torch.Tensor, extrinsics_cam: torch.Tensor,
                                     intrinsics_cam: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``depth [S, H, W, 1]`` or ``[S, H, W]``, ``extrinsics [S, 3, 4]``, ``intrinsics [S, 3, 3]`` ->
    world points ``[S, H, W, 3]`` (the official function's contract, on tensors; float32 for float32 depth,
    float64 for float64 depth - the official numpy code always returns float64). ``backend``: see
    ``kernels.reproject.unproject_depth`` (``"reference"`` is plain torch and differentiable)."""
    from geoforge.kernels.reproject import unproject_depth

    if depth_map.dim() == 4 and depth_map.shape[-1] == 1:
        depth_map = depth_map.squeeze(-1)
    if depth_map.dim() != 3:
        raise ValueError(f"depth_map must be [S, H, W] or [S, H, W, 1], got {tuple(depth_map.shape)}")
    s = depth_map.shape[0]
    if extrinsics_cam.shape != (s, 3, 4) or intrinsics_cam.shape != (s, 3, 3):
        raise ValueError(f"expected extrinsics [{s}, 3, 4] and intrinsics [{s}, 3, 3], got "
                         f"{tuple(extrinsics_cam.shape)} and {tuple(intrinsics_cam.shape)}")
    return unproject_depth(depth_map, extrinsics_cam, intrinsics_cam, backend=backend)
