"""Camera pose encoding of VGGT and quaternion helpers (``vggt/utils/pose_enc.py``, ``rotation.py``).

Conventions (as official):

- ``pose_enc [..., 9]`` = ``[t (3), quaternion (4, xyzw = scalar last), fov_h, fov_w]``
  (``"absT_quaR_FoV"``), describing the **camera-from-world** extrinsic ``[R | t]`` in OpenCV axes
  (x right, y down, z forward);
- intrinsics in pixels with the principal point at the image centre ``(W/2, H/2)``:
  ``fy = (H/2) / tan(fov_h/2)``, ``fx = (W/2) / tan(fov_w/2)``;
- quaternions are standardised to a non-negative real part; ``mat_to_quat`` picks, per matrix, the
  best-conditioned of the four closed-form candidates (PyTorch3D's method).
"""
from __future__ import annotations

import torch


def quat_to_mat(quaternions: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` xyzw quaternions (any norm) -> ``[..., 3, 3]`` rotation matrices."""
    i, j, k, r = torch.unbind(quaternions, -1)
    two_s = 2.0 / (quaternions * quaternions).sum(-1).clamp(min=torch.finfo(i.dtype).eps)
    o = torch.stack((
        1 - two_s * (j * j + k * k), two_s * (i * j - k * r), two_s * (i * k + j * r),
        two_s * (i * j + k * r), 1 - two_s * (i * i + k * k), two_s * (j * k - i * r),
        two_s * (i * k - j * r), two_s * (j * k + i * r), 1 - two_s * (i * i + j * j),
    ), -1)
    return o.reshape(quaternions.shape[:-1] + (3, 3))


def standardize_quaternion(quaternions: torch.Tensor) -> torch.Tensor:
    """Flip xyzw quaternions whose real part (last) is negative."""
    return torch.where(quaternions[..., 3:4] < 0, -quaternions, quaternions)


def mat_to_quat(matrix: torch.Tensor) -> torch.Tensor:
    """``[..., 3, 3]`` rotation matrices -> ``[..., 4]`` standardised xyzw quaternions."""
    if matrix.shape[-2:] != (3, 3):
        raise ValueError(f"expected rotation matrices [..., 3, 3], got {tuple(matrix.shape)}")
    batch = matrix.shape[:-2]
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = torch.unbind(matrix.reshape(batch + (9,)), dim=-1)
    # |r|, |i|, |j|, |k| from the diagonal: sqrt of the positive part, with a zero (not NaN) gradient at 0.
    sq = torch.stack([1.0 + m00 + m11 + m22, 1.0 + m00 - m11 - m22,
                      1.0 - m00 + m11 - m22, 1.0 - m00 - m11 + m22], dim=-1)
    positive = sq > 0
    q_abs = torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))),
                        torch.zeros_like(sq))
    # Row c: the quaternion (r, i, j, k) multiplied by 2 * q_abs[c].
    cand = torch.stack([
        torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
        torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
        torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], dim=-1),
        torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], dim=-1),
    ], dim=-2)
    cand = cand / (2.0 * q_abs[..., None].clamp(min=0.1))
    best = q_abs.argmax(dim=-1)[..., None, None].expand(batch + (1, 4))
    rijk = torch.gather(cand, -2, best).squeeze(-2)
    return standardize_quaternion(rijk[..., [1, 2, 3, 0]])


def _check_type(pose_encoding_type: str) -> None:
    if pose_encoding_type != "absT_quaR_FoV":
        raise ValueError(f"pose_encoding_type must be 'absT_quaR_FoV', got {pose_encoding_type!r}")


def extri_intri_to_pose_encoding(extrinsics: torch.Tensor, intrinsics: torch.Tensor,
                                 image_size_hw: tuple[int, int],
                                 pose_encoding_type: str = "absT_quaR_FoV") -> torch.Tensor:
    """``extrinsics [B, S, 3, 4]`` (camera-from-world), ``intrinsics [B, S, 3, 3]`` -> ``[B, S, 9]`` float32."""
    _check_type(pose_encoding_type)
    h, w = image_size_hw
    quat = mat_to_quat(extrinsics[..., :3, :3])
    fov_h = 2 * torch.atan((h / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((w / 2) / intrinsics[..., 0, 0])
    return torch.cat([extrinsics[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]], dim=-1).float()


def pose_encoding_to_extri_intri(pose_encoding: torch.Tensor, image_size_hw: tuple[int, int] | None = None,
                                 pose_encoding_type: str = "absT_quaR_FoV", build_intrinsics: bool = True
                                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, S, 9]`` -> ``(extrinsics [B, S, 3, 4] camera-from-world, intrinsics [B, S, 3, 3] or None)``."""
    _check_type(pose_encoding_type)
    rot = quat_to_mat(pose_encoding[..., 3:7])
    extrinsics = torch.cat([rot, pose_encoding[..., :3, None]], dim=-1)
    if not build_intrinsics:
        return extrinsics, None
    if image_size_hw is None:
        raise ValueError("image_size_hw=(H, W) is required to build intrinsics")
    h, w = image_size_hw
    intrinsics = pose_encoding.new_zeros(pose_encoding.shape[:-1] + (3, 3))
    intrinsics[..., 0, 0] = (w / 2.0) / torch.tan(pose_encoding[..., 8] / 2.0)
    intrinsics[..., 1, 1] = (h / 2.0) / torch.tan(pose_encoding[..., 7] / 2.0)
    intrinsics[..., 0, 2] = w / 2
    intrinsics[..., 1, 2] = h / 2
    intrinsics[..., 2, 2] = 1.0
    return extrinsics, intrinsics
