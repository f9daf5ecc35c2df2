"""Camera metrics on synthetic trajectories with known rotations / translations; revisit error; the
360-degree rotation cameras of the rotation protocol."""
from __future__ import annotations

import math

import pytest
import torch

from geoforge.engine.eval.camera_metrics import camera_errors, relative_poses, revisit_error, rotation_angle
from geoforge.engine.eval.image_metrics import ssim
from geoforge.engine.eval.protocols import rotation_extrinsics


def _rot(axis: torch.Tensor, angle: float | torch.Tensor) -> torch.Tensor:
    """Rodrigues: rotation by ``angle`` about unit ``axis`` (float64)."""
    axis = axis.double() / axis.double().norm()
    k = torch.zeros(3, 3, dtype=torch.float64)
    k[0, 1], k[0, 2], k[1, 0], k[1, 2], k[2, 0], k[2, 1] = -axis[2], axis[1], axis[2], -axis[0], -axis[1], axis[0]
    angle = torch.as_tensor(angle, dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + angle.sin() * k + (1 - angle.cos()) * k @ k


def _w2c(c2w_rot: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Camera-from-world [T, 3, 4] of camera-to-world rotations [T, 3, 3] and centres [T, 3]."""
    rot = c2w_rot.transpose(-1, -2)
    return torch.cat([rot, -(rot @ centres[..., None])], dim=-1)


def _trajectory(frames: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random smooth trajectory starting at the identity: c2w rotations and centres."""
    g = torch.Generator().manual_seed(seed)
    rots = [torch.eye(3, dtype=torch.float64)]
    centres = [torch.zeros(3, dtype=torch.float64)]
    for _ in range(frames - 1):
        rots.append(rots[-1] @ _rot(torch.randn(3, generator=g), 0.2 * torch.rand(1, generator=g).item()))
        centres.append(centres[-1] + 0.3 * torch.randn(3, generator=g, dtype=torch.float64))
    return torch.stack(rots), torch.stack(centres)


def test_rotation_angle_of_known_rotations() -> None:
    for angle in (0.0, 1e-4, 0.3, 2.0, math.pi - 1e-3):
        r = _rot(torch.tensor([0.3, -1.0, 0.5]), angle)
        q = _rot(torch.tensor([1.0, 2.0, 0.0]), 0.7)
        assert rotation_angle(q, q @ r).item() == pytest.approx(angle, abs=1e-9)


def test_known_rotation_errors_per_frame() -> None:
    rots, centres = _trajectory()
    angles = torch.tensor([0.0, 0.1, 0.25, 0.4, 0.05, 1.0], dtype=torch.float64)
    axis = torch.tensor([0.2, 1.0, -0.4])
    perturbed = torch.stack([r @ _rot(axis, a) for r, a in zip(rots, angles)])
    gt, gen = _w2c(rots, centres), _w2c(perturbed, centres)
    errs = camera_errors(gen, gt, scale="none")
    assert errs["rot_err"].item() == pytest.approx(angles.sum().item(), abs=1e-9)
    assert errs["trans_err"].item() == pytest.approx(0.0, abs=1e-9)
    # ||R (I - Q)||_F = 2 sqrt(2) |sin(theta / 2)| for a rotation Q by theta.
    assert errs["cammc"].item() == pytest.approx((2 * math.sqrt(2) * (angles / 2).sin()).sum().item(), abs=1e-9)
    mean = camera_errors(gen, gt, scale="none", reduction="mean")
    assert mean["rot_err"].item() == pytest.approx(angles.mean().item(), abs=1e-9)


def test_known_translation_errors_and_scale_modes() -> None:
    rots, centres = _trajectory(seed=1)
    gt = _w2c(rots, centres)
    offsets = torch.zeros_like(centres)
    offsets[1:, 0] = torch.tensor([0.1, -0.2, 0.3, 0.05, 0.4], dtype=torch.float64)
    errs = camera_errors(_w2c(rots, centres + offsets), gt, scale="none")
    assert errs["trans_err"].item() == pytest.approx(offsets.norm(dim=-1).sum().item(), abs=1e-9)
    assert errs["rot_err"].item() == pytest.approx(0.0, abs=1e-9)
    assert errs["cammc"].item() == pytest.approx(offsets.norm(dim=-1).sum().item(), abs=1e-9)
    # A trajectory at twice the scale: "own" and "lstsq" remove it, "gt" normalises both by the GT's
    # largest distance m, leaving sum ||c_i|| / m; "none" leaves sum ||c_i||.
    doubled = _w2c(rots, 2 * centres)
    m = centres.norm(dim=-1).max().item()
    for mode in ("own", "lstsq"):
        assert camera_errors(doubled, gt, scale=mode)["trans_err"].item() == pytest.approx(0.0, abs=1e-7)
    total = centres.norm(dim=-1).sum().item()
    assert camera_errors(doubled, gt, scale="gt")["trans_err"].item() == pytest.approx(total / m, rel=1e-7)
    assert camera_errors(doubled, gt, scale="none")["trans_err"].item() == pytest.approx(total, rel=1e-9)


def test_errors_ignore_the_world_frame_and_scale_of_the_estimate() -> None:
    # The same cameras in a world moved by x' = s Q x + d (and camera units scaled by s):
    # E' = [R Q^T | s t - R Q^T d]. Relative poses and own-scale translations do not change.
    rots, centres = _trajectory(seed=2)
    gt = _w2c(rots, centres)
    q = _rot(torch.tensor([1.0, 0.5, -0.2]), 1.1)
    s, d = 3.7, torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    r, t = gt[..., :3], gt[..., 3]
    moved = torch.cat([r @ q.T, (s * t - (r @ q.T @ d))[..., None]], dim=-1)
    for mode in ("own", "lstsq"):
        errs = camera_errors(moved, gt, scale=mode)
        for key in ("rot_err", "trans_err", "cammc"):
            assert errs[key].item() == pytest.approx(0.0, abs=1e-7), (mode, key)
    as4x4 = torch.cat([moved, torch.tensor([0, 0, 0, 1.0], dtype=torch.float64).expand(6, 1, 4)], dim=1)
    assert camera_errors(as4x4, gt)["rot_err"].item() == pytest.approx(0.0, abs=1e-7)
    batched = camera_errors(torch.stack([moved, gt]), torch.stack([gt, gt]))
    assert batched["rot_err"].shape == (2,)


def test_relative_poses_start_at_identity() -> None:
    rots, centres = _trajectory(seed=3)
    rel_rot, rel_trans = relative_poses(_w2c(rots, centres) @ torch.eye(4, dtype=torch.float64)[None])
    torch.testing.assert_close(rel_rot[0], torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(rel_trans[0], torch.zeros(3, dtype=torch.float64))
    # With camera 0 at the identity, camera i's relative pose is its camera-to-world pose.
    torch.testing.assert_close(rel_rot, rots)
    torch.testing.assert_close(rel_trans, centres)
    with pytest.raises(ValueError, match="same"):
        camera_errors(_w2c(rots, centres), _w2c(rots[:3], centres[:3]))


def test_rotation_protocol_cameras_turn_about_the_camera_y_axis() -> None:
    rots, centres = _trajectory(seed=4)
    first = _w2c(rots, centres)[2].float()
    cams = rotation_extrinsics(first, 16).double()
    torch.testing.assert_close(cams[0], first.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(cams[-1], first.double(), atol=1e-5, rtol=0)  # a full turn returns
    centre = -(cams[..., :3].transpose(-1, -2) @ cams[..., 3:])[..., 0]
    torch.testing.assert_close(centre, centre[:1].expand(16, 3), atol=1e-5, rtol=0)
    step = 2 * math.pi / 15
    for i in range(1, 16):
        # Relative rotation in camera 0's frame is about its y axis by i * step.
        rel = cams[i, :, :3] @ cams[0, :, :3].T
        assert rotation_angle(torch.eye(3, dtype=torch.float64), rel).item() == pytest.approx(
            min(i * step % (2 * math.pi), 2 * math.pi - i * step % (2 * math.pi)), abs=1e-5)
        assert abs(rel[1, 1].item() - 1) < 1e-6  # y is the axis


def test_revisit_error_known_cases() -> None:
    frame = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    same = revisit_error(frame, frame.clone())
    assert bool(torch.isinf(same["psnr"]).all()) and torch.allclose(same["ssim"], torch.ones(2, dtype=torch.float64))
    shifted = (frame + 0.1).clamp(max=2.0)  # MSE exactly 0.01 -> PSNR 20 dB
    out = revisit_error(frame, shifted)
    torch.testing.assert_close(out["psnr"], torch.full((2,), 20.0, dtype=torch.float64))
    torch.testing.assert_close(out["ssim"], ssim(shifted, frame))
