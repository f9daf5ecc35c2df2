"""Camera-trajectory errors (RotErr, TransErr, CamMC as in CamI2V) and the revisit error (RVE).

Inputs are camera-from-world extrinsics (OpenCV), ``[..., T, 3, 4]`` or ``[..., T, 4, 4]``: the
generated trajectory (e.g. poses estimated on generated frames) and the ground truth. Following
CamI2V (``evaluation/glomap_evaluation.py``), both are first expressed relative to their first
camera: P_i = E_0 · E_i⁻¹, the pose of camera i in camera 0's frame (camera-to-first-camera; its
translation is camera i's centre seen from camera 0). Then translations are brought to one scale
(``scale``):

- ``"own"``: each trajectory is divided by its own scale, max_i ‖t_i‖ (+1e-9). This is CamI2V's
  "rel" protocol (TransErr_rel / CamMC_rel) and the default, for poses known only up to scale;
- ``"lstsq"``: the generated translations are multiplied by the least-squares factor
  s = Σ⟨t_gen, t_gt⟩ / Σ‖t_gen‖² (the ground truth keeps its units);
- ``"gt"``: both are divided by the ground truth's scale (CamI2V's "abs" protocol, for metric poses);
- ``"none"``: translations are compared as given.

Per frame: rotation error = geodesic angle arccos((tr(R_gtᵀ R_gen) − 1) / 2) in radians (computed
with atan2 for accuracy near 0 and π), translation error = ‖t_gt − t_gen‖₂, CamMC = ‖[R|t]_gen −
[R|t]_gt‖ over the flattened 3×4. ``reduction`` = ``"sum"`` over the T frames (CamI2V; the first
frame contributes 0) or ``"mean"`` (sum / T).
"""
from __future__ import annotations

import torch

from geoforge.engine.eval.image_metrics import psnr, ssim

SCALE_MODES = ("own", "lstsq", "gt", "none")
FRAME_REDUCTIONS = ("sum", "mean")
_EPS = 1e-9


def _rotation_translation(extrinsics: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if extrinsics.ndim < 3 or extrinsics.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"{name} must be [..., T, 3, 4] or [..., T, 4, 4] extrinsics, got {tuple(extrinsics.shape)}")
    e = extrinsics.to(torch.float64)
    return e[..., :3, :3], e[..., :3, 3]


def relative_poses(extrinsics: torch.Tensor, name: str = "extrinsics") -> tuple[torch.Tensor, torch.Tensor]:
    """Camera-to-first-camera poses of camera-from-world ``extrinsics`` [..., T, 3|4, 4].

    Returns rotations [..., T, 3, 3] = R_0 R_iᵀ and translations [..., T, 3] = t_0 − R_0 R_iᵀ t_i
    (float64); frame 0 is the identity.
    """
    rot, trans = _rotation_translation(extrinsics, name)
    rel_rot = rot[..., :1, :, :] @ rot.transpose(-1, -2)
    rel_trans = trans[..., :1, :] - (rel_rot @ trans.unsqueeze(-1)).squeeze(-1)
    return rel_rot, rel_trans


def rotation_angle(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Geodesic angle (radians) between rotations [..., 3, 3]: arccos((tr(r1ᵀ r2) − 1) / 2)."""
    d = r1.transpose(-1, -2) @ r2
    cos = (d.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    skew = torch.stack([d[..., 2, 1] - d[..., 1, 2], d[..., 0, 2] - d[..., 2, 0],
                        d[..., 1, 0] - d[..., 0, 1]], dim=-1)
    return torch.atan2(skew.norm(dim=-1) / 2, cos)


def _trajectory_scale(trans: torch.Tensor) -> torch.Tensor:
    return trans.norm(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1) + _EPS


def align_translations(t_gen: torch.Tensor, t_gt: torch.Tensor, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative translations [..., T, 3] of both trajectories brought to one scale (module doc)."""
    if scale == "own":
        return t_gen / _trajectory_scale(t_gen), t_gt / _trajectory_scale(t_gt)
    if scale == "gt":
        gt_scale = _trajectory_scale(t_gt)
        return t_gen / gt_scale, t_gt / gt_scale
    if scale == "lstsq":
        factor = (t_gen * t_gt).sum(dim=(-2, -1)) / (t_gen.square().sum(dim=(-2, -1)) + _EPS)
        return t_gen * factor[..., None, None], t_gt
    if scale == "none":
        return t_gen, t_gt
    raise ValueError(f"scale must be one of {SCALE_MODES}, got {scale!r}")


def camera_errors(generated: torch.Tensor, ground_truth: torch.Tensor, scale: str = "own",
                  reduction: str = "sum") -> dict[str, torch.Tensor]:
    """RotErr, TransErr and CamMC of ``generated`` vs ``ground_truth`` extrinsics [..., T, 3|4, 4].

    Returns ``{"rot_err", "trans_err", "cammc"}``, each float64 with the leading (batch) shape.
    """
    if generated.shape[:-2] != ground_truth.shape[:-2]:
        raise ValueError(f"generated and ground_truth must have the same [..., T] shape, got "
                         f"{tuple(generated.shape)} and {tuple(ground_truth.shape)}")
    if reduction not in FRAME_REDUCTIONS:
        raise ValueError(f"reduction must be one of {FRAME_REDUCTIONS}, got {reduction!r}")
    r_gen, t_gen = relative_poses(generated, "generated")
    r_gt, t_gt = relative_poses(ground_truth, "ground_truth")
    t_gen, t_gt = align_translations(t_gen, t_gt, scale)
    per_frame = {
        "rot_err": rotation_angle(r_gt, r_gen),
        "trans_err": (t_gt - t_gen).norm(dim=-1),
        "cammc": torch.cat([r_gen - r_gt, (t_gen - t_gt).unsqueeze(-1)], dim=-1).flatten(-2).norm(dim=-1),
    }
    return {k: v.sum(-1) if reduction == "sum" else v.mean(-1) for k, v in per_frame.items()}


def revisit_error(first_frame: torch.Tensor, last_frame: torch.Tensor, lpips: torch.nn.Module | None = None,
                  data_range: float = 1.0) -> dict[str, torch.Tensor]:
    """Revisit error of a 360° rotation video: first vs last frame, [..., 3, H, W] in [0, 1].

    Returns per-video ``{"psnr", "ssim"}`` and, when an ``engine.eval.lpips.LPIPS`` is given,
    ``"lpips"``; a video that truly returns to its start has +inf PSNR, SSIM 1 and LPIPS 0.
    """
    out = {"psnr": psnr(last_frame, first_frame, data_range), "ssim": ssim(last_frame, first_frame, data_range)}
    if lpips is not None:
        with torch.no_grad():
            out["lpips"] = lpips(last_frame, first_frame)
    return out
