"""3D consistency of a video against the true geometry of its scene (synthetic clips: depth + cameras known).

For consecutive frames (i, i + 1): every pixel p of frame i is unprojected with the true depth of frame i
and its camera (``kernels.reproject.unproject_depth``: OpenCV pinhole, camera-from-world extrinsics,
pixel centres at integers) and projected into camera i + 1 at ``q`` with depth z. It is valid when
z > 0, q lies inside the image and the true depth of frame i + 1 at the nearest pixel of q agrees with z
within 5% (not occluded). The error of the pair is the mean over valid pixels of
``|video_i(p) - video_{i+1}(q)|^2`` (colours in [0, 1], bilinear at q), and the video's error is the
mean over pairs. A video that moves as the scene does scores near the ground truth's own error (which is
not 0: resampling and antialiasing); one that ignores the camera scores higher.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OCCLUSION_TOLERANCE = 0.05


def pair_warp_error(frame_i: torch.Tensor, frame_j: torch.Tensor, depth_i: torch.Tensor, depth_j: torch.Tensor,
                    k_i: torch.Tensor, k_j: torch.Tensor, e_i: torch.Tensor, e_j: torch.Tensor) -> torch.Tensor:
    """Mean squared colour error of frame j warped onto frame i (``[3, H, W]`` frames, ``[H, W]`` depths,
    ``[3, 3]`` intrinsics, ``[3, 4]`` camera-from-world extrinsics); NaN when no pixel is valid."""
    from geoforge.kernels.reproject import unproject_depth

    h, w = depth_i.shape
    world = unproject_depth(depth_i[None].float(), e_i[None].float(), k_i[None].float(), backend="reference")[0]
    cam = world @ e_j[:3, :3].float().T + e_j[:3, 3].float()
    z = cam[..., 2]
    pix = cam @ k_j.float().T
    u, v = pix[..., 0] / z.clamp_min(1e-6), pix[..., 1] / z.clamp_min(1e-6)
    inside = (z > 1e-6) & (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)
    ui, vi = u.round().clamp(0, w - 1).long(), v.round().clamp(0, h - 1).long()
    visible = (depth_j[vi, ui] - z).abs() <= OCCLUSION_TOLERANCE * z
    valid = inside & visible
    if not bool(valid.any()):
        return torch.tensor(float("nan"))
    grid = torch.stack([u / (w - 1) * 2 - 1, v / (h - 1) * 2 - 1], dim=-1)[None]
    warped = F.grid_sample(frame_j[None].float(), grid, mode="bilinear", align_corners=True)[0]
    err = (frame_i.float() - warped).square().mean(0)
    return err[valid].mean()


def warp_consistency_error(video: torch.Tensor, depth: torch.Tensor, intrinsics: torch.Tensor,
                           extrinsics: torch.Tensor) -> torch.Tensor:
    """Per video ``[N]``: the mean over consecutive pairs of :func:`pair_warp_error` (module docstring).
    ``video [N, T, 3, H, W]`` in [0, 1], ``depth [N, T, H, W]``, ``intrinsics [N, T, 3, 3]``,
    ``extrinsics [N, T, 3, 4]``."""
    out = []
    for n in range(video.shape[0]):
        pairs = [pair_warp_error(video[n, i], video[n, i + 1], depth[n, i], depth[n, i + 1], intrinsics[n, i],
                                 intrinsics[n, i + 1], extrinsics[n, i], extrinsics[n, i + 1])
                 for i in range(video.shape[1] - 1)]
        out.append(torch.stack(pairs).nanmean())
    return torch.stack(out)


__all__ = ["pair_warp_error", "warp_consistency_error"]
