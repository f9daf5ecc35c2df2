"""VGGT camera utilities: pose encoding <-> (extrinsic, intrinsic), quaternions, depth unprojection (against
``kernels.reproject.unproject_depth`` and an independent formula)."""
import math

import pytest
import torch

from geoforge.engine.models.vggt import (closed_form_inverse_se3, extri_intri_to_pose_encoding, mat_to_quat,
                                pose_encoding_to_extri_intri, quat_to_mat, unproject_depth_map_to_point_map)
from geoforge.engine.models.vggt.geometry import unproject_depth_reference
from geoforge.kernels.reproject import unproject_depth


def random_rotations(n, generator):
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return quat_to_mat(q / q.norm(dim=-1, keepdim=True))


def random_pose_encoding(b, s, generator):
    t = torch.randn(b, s, 3, generator=generator)
    q = torch.randn(b, s, 4, generator=generator)
    q = q / q.norm(dim=-1, keepdim=True)
    q = torch.where(q[..., 3:] < 0, -q, q)  # standard form: real part >= 0
    fov = 0.3 + 1.2 * torch.rand(b, s, 2, generator=generator)
    return torch.cat([t, q, fov], dim=-1)


def test_pose_encoding_conventions():
    h, w = 28, 42
    enc = torch.tensor([[[1.0, -2.0, 3.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.2]]])
    extrinsic, intrinsic = pose_encoding_to_extri_intri(enc, (h, w))
    assert extrinsic.shape == (1, 1, 3, 4) and intrinsic.shape == (1, 1, 3, 3)
    torch.testing.assert_close(extrinsic[0, 0], torch.tensor([[1.0, 0, 0, 1.0], [0, 1.0, 0, -2.0], [0, 0, 1.0, 3.0]]))
    fy, fx = (h / 2) / math.tan(1.0 / 2), (w / 2) / math.tan(1.2 / 2)
    torch.testing.assert_close(intrinsic[0, 0], torch.tensor([[fx, 0, w / 2], [0, fy, h / 2], [0, 0, 1.0]]))
    ext_only, none = pose_encoding_to_extri_intri(enc, build_intrinsics=False)
    assert none is None and torch.equal(ext_only, extrinsic)
    with pytest.raises(ValueError, match="image_size_hw"):
        pose_encoding_to_extri_intri(enc)
    with pytest.raises(ValueError, match="absT_quaR_FoV"):
        pose_encoding_to_extri_intri(enc, (h, w), pose_encoding_type="relT_quaR_FoV")


def test_pose_encoding_round_trips():
    g = torch.Generator().manual_seed(0)
    enc = random_pose_encoding(2, 5, g)
    extrinsic, intrinsic = pose_encoding_to_extri_intri(enc, (56, 70))
    rot = extrinsic[..., :3]
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), torch.eye(3).expand(2, 5, 3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(2, 5), atol=1e-6, rtol=0)
    back = extri_intri_to_pose_encoding(extrinsic, intrinsic, (56, 70))
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, enc, atol=2e-6, rtol=1e-5)
    ext2, int2 = pose_encoding_to_extri_intri(back, (56, 70))
    torch.testing.assert_close(ext2, extrinsic, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(int2, intrinsic, atol=1e-4, rtol=1e-5)


def test_quaternions_round_trip_including_half_turns():
    g = torch.Generator().manual_seed(1)
    rot = torch.cat([random_rotations(64, g),
                     torch.diag_embed(torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)),
                     torch.eye(3, dtype=torch.float64)[None]])
    q = mat_to_quat(rot)
    assert bool((q[..., 3] >= 0).all())
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(len(rot), dtype=torch.float64))
    torch.testing.assert_close(quat_to_mat(q), rot, atol=1e-12, rtol=0)
    # a quaternion and its negation are the same rotation; quat_to_mat accepts any norm
    torch.testing.assert_close(quat_to_mat(-3.0 * q), rot, atol=1e-12, rtol=0)


def test_closed_form_inverse_se3():
    g = torch.Generator().manual_seed(2)
    se3 = torch.cat([random_rotations(4, g), torch.randn(4, 3, 1, generator=g, dtype=torch.float64)], dim=-1)
    inv = closed_form_inverse_se3(se3)
    full = torch.cat([se3, torch.tensor([[[0, 0, 0, 1.0]]], dtype=torch.float64).expand(4, 1, 4)], dim=1)
    torch.testing.assert_close(inv, torch.linalg.inv(full))


def independent_unproject(depth, extrinsic, intrinsic):
    """World point of pixel (u, v): R^T (d K^-1 [u, v, 1]^T - t), written with explicit inverses."""
    s, h, w = depth.shape
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                          indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # [H, W, 3]
    out = []
    for i in range(s):
        k_inv = torch.linalg.inv(intrinsic[i].double())
        cam = depth[i].double()[..., None] * (pix @ k_inv.T)
        rot, t = extrinsic[i, :, :3].double(), extrinsic[i, :, 3].double()
        out.append((cam - t) @ rot)  # R^T (x - t) for row vectors
    return torch.stack(out)


def test_unprojection_matches_the_shared_kernel_and_an_independent_formula():
    g = torch.Generator().manual_seed(3)
    h, w = 14, 21
    enc = random_pose_encoding(1, 3, g)
    extrinsic, intrinsic = pose_encoding_to_extri_intri(enc, (h, w))
    depth = 0.5 + 2 * torch.rand(3, h, w, 1, generator=g)
    points = unproject_depth_map_to_point_map(depth, extrinsic[0], intrinsic[0], backend="reference")
    assert points.shape == (3, h, w, 3) and points.dtype == torch.float32
    torch.testing.assert_close(points, unproject_depth(depth[..., 0], extrinsic[0], intrinsic[0],
                                                       backend="reference"), rtol=0, atol=0)
    torch.testing.assert_close(points, unproject_depth_reference(depth[..., 0], extrinsic[0], intrinsic[0]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(points.double(), independent_unproject(depth[..., 0], extrinsic[0], intrinsic[0]),
                               rtol=1e-5, atol=1e-5)
    # projecting back lands on the pixel grid at the given depth
    cam = points.double() @ extrinsic[0, :, None, :, :3].double().transpose(-1, -2) + extrinsic[0, :, None, None, :, 3]
    uvw = cam @ intrinsic[0, :, None].double().transpose(-1, -2)
    torch.testing.assert_close(cam[..., 2], depth[..., 0].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uvw[..., 0] / uvw[..., 2], torch.arange(w, dtype=torch.float64).expand(3, h, w),
                               rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="extrinsics"):
        unproject_depth_map_to_point_map(depth, extrinsic[0, :2], intrinsic[0], backend="reference")
