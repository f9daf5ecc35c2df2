"""kernels.reproject: every backend against oracles written here, compared exactly.

The oracles do not reuse anything from the module (no packed keys, no scatter): ``oracle_splat`` is a plain
Python loop over frames and points that keeps, per pixel, the smallest (z, point index) tuple;
``painter_oracle`` is a vectorised numpy painter's algorithm with a stable (z, index) order, for larger scenes;
``oracle_unproject`` is numpy. All evaluate the projection of DESIGN.md §4 in float32, one rounding per operation,
left to right:

    Z' = r20 X + r21 Y + r22 Z + t2   (dropped unless Z' > float32(1e-6))
    x  = fx (X'/Z') + s (Y'/Z') + cx,  y = fy (Y'/Z') + cy,  pixel = (floor(x + 0.5), floor(y + 0.5))

so indices, images and depths must match bit for bit. The Triton path runs under TRITON_INTERPRET=1 on CPU
tensors (set by tests/conftest.py) with small shapes.
"""
import math

import numpy as np
import pytest
import torch

from processes import torch_threads
from geoforge.kernels._backend import triton_usable
from geoforge.kernels.reproject import reprojection_error, splat_points, unproject_depth

F = np.float32
Z_MIN = F(1e-6)

# The Triton interpreter evaluates masked-off lanes too (divisions by zero there are harmless).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

BACKENDS = [
    "reference",
    "cpu",
    pytest.param("triton", marks=pytest.mark.skipif(
        not triton_usable(torch.device("cpu")), reason="triton missing or TRITON_INTERPRET unset")),
]


# ---------------------------------------------------------------------------------------------------- oracles
def _project_one(p, e, k, H, W):
    """(v, u, z) of one point in one camera, or None when dropped. float32 scalars throughout."""
    X, Y, Z = p
    zc = e[2, 0] * X + e[2, 1] * Y + e[2, 2] * Z + e[2, 3]
    if not zc > Z_MIN:
        return None
    xc = e[0, 0] * X + e[0, 1] * Y + e[0, 2] * Z + e[0, 3]
    yc = e[1, 0] * X + e[1, 1] * Y + e[1, 2] * Z + e[1, 3]
    xn = xc / zc
    yn = yc / zc
    x = k[0, 0] * xn + k[0, 1] * yn + k[0, 2] + F(0.5)
    y = k[1, 1] * yn + k[1, 2] + F(0.5)
    if not (np.isfinite(x) and np.isfinite(y)):
        return None
    u, v = math.floor(x), math.floor(y)
    if not (0 <= u < W and 0 <= v < H):
        return None
    return v, u, zc


def _as_np_cameras(extrinsic, intrinsic, S=None):
    e = extrinsic.to(torch.float32).reshape(-1, 3, 4).numpy()
    k = intrinsic.to(torch.float32).reshape(-1, 3, 3).numpy()
    S = max(len(e), len(k)) if S is None else S
    return np.broadcast_to(e, (S, 3, 4)), np.broadcast_to(k, (S, 3, 3))


def oracle_splat(points, colors, extrinsic, intrinsic, H, W, background=0.0):
    """Loop oracle: per pixel the smallest (z, index) tuple wins. Returns numpy image, depth, index."""
    pts = points.to(torch.float32).numpy()
    col = colors.to(torch.float32).numpy()
    e, k = _as_np_cameras(extrinsic, intrinsic)
    S, C = len(e), col.shape[1]
    best = {}
    with np.errstate(all="ignore"):
        for s in range(S):
            for i, p in enumerate(pts):
                hit = _project_one(p, e[s], k[s], H, W)
                if hit is None:
                    continue
                v, u, z = hit
                if (s, v, u) not in best or (z, i) < best[(s, v, u)]:
                    best[(s, v, u)] = (z, i)
    image = np.empty((S, C, H, W), np.float32)
    image[:] = np.broadcast_to(np.asarray(background, np.float32).reshape(-1), (C,))[None, :, None, None]
    depth = np.full((S, H, W), np.inf, np.float32)
    index = np.full((S, H, W), -1, np.int64)
    for (s, v, u), (z, i) in best.items():
        image[s, :, v, u] = col[i]
        depth[s, v, u] = z
        index[s, v, u] = i
    return image, depth, index


def painter_oracle(points, colors, extrinsic, intrinsic, H, W, background=0.0):
    """Vectorised painter's algorithm: sort hits by (z, index), the first hit of each pixel wins."""
    pts = points.to(torch.float32).numpy()
    col = colors.to(torch.float32).numpy()
    e, k = _as_np_cameras(extrinsic, intrinsic)
    S, C, P = len(e), col.shape[1], len(pts)
    X, Y, Z = pts[:, 0], pts[:, 1], pts[:, 2]
    image = np.empty((S, C, H * W), np.float32)
    image[:] = np.broadcast_to(np.asarray(background, np.float32).reshape(-1), (C,))[None, :, None]
    depth = np.full((S, H * W), np.inf, np.float32)
    index = np.full((S, H * W), -1, np.int64)
    with np.errstate(all="ignore"):
        for s in range(S):
            es, ks = e[s], k[s]
            zc = es[2, 0] * X + es[2, 1] * Y + es[2, 2] * Z + es[2, 3]
            xc = es[0, 0] * X + es[0, 1] * Y + es[0, 2] * Z + es[0, 3]
            yc = es[1, 0] * X + es[1, 1] * Y + es[1, 2] * Z + es[1, 3]
            xn, yn = xc / zc, yc / zc
            u = np.floor(ks[0, 0] * xn + ks[0, 1] * yn + ks[0, 2] + F(0.5))
            v = np.floor(ks[1, 1] * yn + ks[1, 2] + F(0.5))
            ok = (zc > Z_MIN) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
            ids = np.arange(P)[ok]
            pix = v[ok].astype(np.int64) * W + u[ok].astype(np.int64)
            order = np.lexsort((ids, zc[ok]))  # by z, then by index
            _, first = np.unique(pix[order], return_index=True)
            win = order[first]
            image[s][:, pix[win]] = col[ids[win]].T
            depth[s, pix[win]] = zc[ok][win]
            index[s, pix[win]] = ids[win]
    return image.reshape(S, C, H, W), depth.reshape(S, H, W), index.reshape(S, H, W)


def oracle_unproject(depth, extrinsic, intrinsic):
    """world = R^T (d K^-1 [u,v,1] - t) in the depth's float dtype, numpy, formula written out."""
    dt = np.float64 if depth.dtype == torch.float64 else np.float32
    d = depth.numpy().astype(dt)
    S, H, W = d.shape
    e = np.broadcast_to(extrinsic.reshape(-1, 3, 4).numpy().astype(dt), (S, 3, 4))
    k = np.broadcast_to(intrinsic.reshape(-1, 3, 3).numpy().astype(dt), (S, 3, 3))
    u = np.arange(W, dtype=dt)[None, :]
    v = np.arange(H, dtype=dt)[:, None]
    out = np.empty((S, H, W, 3), dt)
    for s in range(S):
        fx, sk, cx, fy, cy = k[s, 0, 0], k[s, 0, 1], k[s, 0, 2], k[s, 1, 1], k[s, 1, 2]
        yn = (v - cy) / fy
        xn = ((u - cx) - sk * yn) / fx
        cam = (xn * d[s] - e[s, 0, 3], yn * d[s] - e[s, 1, 3], d[s] - e[s, 2, 3])
        for j in range(3):
            out[s, :, :, j] = e[s, 0, j] * cam[0] + e[s, 1, j] * cam[1] + e[s, 2, j] * cam[2]
    return out


def oracle_reprojection(frames, depth, conf, extrinsic, intrinsic, threshold=0.0):
    S, C, H, W = frames.shape
    world = torch.from_numpy(oracle_unproject(depth.float(), extrinsic, intrinsic)).reshape(-1, 3)
    keep = (conf > threshold).reshape(-1)
    colors = frames.permute(0, 2, 3, 1).reshape(-1, C)
    image, _, index = oracle_splat(world[keep], colors[keep], extrinsic, intrinsic, H, W)
    err = (image.astype(np.float64) - frames.double().numpy()) ** 2
    return image, err.mean(axis=(1, 2, 3)), (index >= 0).mean(axis=(1, 2))


# ----------------------------------------------------------------------------------------------- scenes
def make_cameras(S, H, W, seed, skew=True, dtype=torch.float32):
    """S cameras near the identity (small rotations and translations), per-camera intrinsics with skew."""
    g = torch.Generator().manual_seed(seed)
    aa = 0.15 * torch.randn(S, 3, generator=g, dtype=torch.float64)
    cross = torch.zeros(S, 3, 3, dtype=torch.float64)
    cross[:, 0, 1], cross[:, 0, 2], cross[:, 1, 2] = -aa[:, 2], aa[:, 1], -aa[:, 0]
    cross = cross - cross.transpose(1, 2)
    rot = torch.linalg.matrix_exp(cross)
    trans = 0.2 * torch.randn(S, 3, 1, generator=g, dtype=torch.float64)
    extrinsic = torch.cat((rot, trans), dim=-1).to(dtype)
    f = W * (0.8 + 0.4 * torch.rand(S, generator=g, dtype=torch.float64))
    intrinsic = torch.zeros(S, 3, 3, dtype=torch.float64)
    intrinsic[:, 0, 0] = f
    intrinsic[:, 1, 1] = f * (0.9 + 0.2 * torch.rand(S, generator=g, dtype=torch.float64))
    intrinsic[:, 0, 1] = (0.05 * torch.randn(S, generator=g, dtype=torch.float64)) if skew else 0.0
    intrinsic[:, 0, 2] = (W - 1) / 2 + torch.randn(S, generator=g, dtype=torch.float64)
    intrinsic[:, 1, 2] = (H - 1) / 2 + torch.randn(S, generator=g, dtype=torch.float64)
    intrinsic[:, 2, 2] = 1.0
    return extrinsic, intrinsic.to(dtype)


def make_points(P, seed, behind=0.1):
    """Points in a frustum-ish box in front of the origin, a fraction ``behind`` of them at Z <= 0."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 + 2.5 * torch.rand(P, generator=g)
    xy = (2 * torch.rand(P, 2, generator=g) - 1) * 0.7 * z[:, None]
    z = torch.where(torch.rand(P, generator=g) < behind, -z + 1.0, z)
    return torch.cat((xy, z[:, None]), dim=1)


def assert_splat_equal(got, want):
    image, depth, index = got
    w_image, w_depth, w_index = (torch.from_numpy(np.ascontiguousarray(a)) for a in want)
    assert index.dtype == torch.int64 and image.dtype == torch.float32 and depth.dtype == torch.float32
    assert torch.equal(index, w_index), f"{(index != w_index).sum()} indices differ"
    assert torch.equal(image, w_image), f"{(image != w_image).sum()} image values differ"
    assert torch.equal(depth, w_depth), f"max depth error {(depth - w_depth).abs().nan_to_num().max()}"


# ------------------------------------------------------------------------------------------ oracle sanity
def test_oracles_agree_on_a_crowded_scene():
    E, K = make_cameras(3, 5, 6, seed=1)
    pts = make_points(400, seed=2)
    pts = torch.cat((pts, pts[::3]))  # duplicated points: exact depth ties
    colors = torch.rand(len(pts), 2)
    loop = oracle_splat(pts, colors, E, K, 5, 6, 0.25)
    vec = painter_oracle(pts, colors, E, K, 5, 6, 0.25)
    for a, b in zip(loop, vec):
        np.testing.assert_array_equal(a, b)
    assert (loop[2] >= 0).mean() > 0.8  # the scene really covers the images


# ------------------------------------------------------------------------------------------------ splat
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("cams", ["single", "batched", "mixed"])
def test_splat_random_scene(backend, C, cams):
    H, W = 9, 11
    E, K = make_cameras(3, H, W, seed=3)
    if cams == "single":
        E, K = E[0], K[0]
    elif cams == "mixed":
        K = K[1]
    pts = make_points(250, seed=4)
    colors = torch.rand(250, C)
    got = splat_points(pts, colors, E, K, H, W, backend=backend)
    assert got[0].shape == (1 if cams == "single" else 3, C, H, W)
    assert_splat_equal(got, oracle_splat(pts, colors, E, K, H, W))


@pytest.mark.parametrize("backend", BACKENDS)
def test_splat_crowded_exact_ties(backend):
    """Hundreds of points on a 3x4 image, three depth levels and duplicated points: ties everywhere."""
    g = torch.Generator().manual_seed(5)
    H, W, P = 3, 4, 300
    E = torch.eye(3, 4)  # zc = Z exactly, so equal Z means an exact tie between different points
    K = torch.tensor([[2.0, 0.0, 1.5], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
    z = torch.tensor([1.0, 1.25, 2.0])[torch.randint(0, 3, (P,), generator=g)]
    xy = (torch.rand(P, 2, generator=g) * 2.4 - 1.2) * z[:, None]
    pts = torch.cat((xy, z[:, None]), dim=1)
    dup = torch.randint(0, P, (100,), generator=g)
    pts = torch.cat((pts, pts[dup]))[torch.randperm(P + 100, generator=g)]  # copies before and after originals
    colors = torch.rand(len(pts), 3, generator=g)
    E2, K2 = make_cameras(2, H, W, seed=6)
    E2, K2 = torch.stack((E, E2[0], E2[1])), torch.stack((K, K2[0], K2[1]))
    want = oracle_splat(pts, colors, E2, K2, H, W)
    assert (want[2][0] >= 0).all()  # every pixel of the identity view is hit, most by many points
    got = splat_points(pts, colors, E2, K2, H, W, backend=backend)
    assert_splat_equal(got, want)
    again = splat_points(pts, colors, E2, K2, H, W, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.parametrize("backend", BACKENDS)
def test_splat_tie_goes_to_lower_index(backend):
    """Hand case: four points on pixel (1,2) of a 3x4 image; 1 and 3 tie at the nearest depth -> index 1."""
    E = torch.eye(3, 4)
    K = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    pts = torch.tensor([[4.0, 2.0, 2.0], [1.0, 0.5, 0.5], [6.0, 3.0, 3.0], [1.0, 0.5, 0.5], [0.0, 0.0, 1.0]])
    colors = torch.arange(5.0)[:, None]
    image, depth, index = splat_points(pts, colors, E, K, 3, 4, background=-1.0, backend=backend)
    want_index = torch.full((1, 3, 4), -1)
    want_index[0, 1, 2], want_index[0, 0, 0] = 1, 4
    assert torch.equal(index, want_index)
    assert torch.equal(image[0, 0], torch.where(want_index[0] >= 0, want_index[0].float(), -1.0))
    assert depth[0, 1, 2] == 0.5 and depth[0, 0, 0] == 1.0 and depth.isinf().sum() == 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_splat_behind_camera_and_near_plane(backend):
    """Z <= 1e-6 (float32) is dropped, the next float32 above it is kept."""
    E = torch.eye(3, 4)
    K = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    above = float(np.nextafter(Z_MIN, F(1)))
    pts = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 0.0], [0.0, 0.0, float(Z_MIN)], [0.0, 0.0, above],
                        [1.0, 0.0, 1.0], [-2.0, -1.0, -1.0], [0.0, 0.0, -0.0]])
    colors = torch.arange(7.0)[:, None] + 1
    image, depth, index = splat_points(pts, colors, E, K, 3, 5, backend=backend)
    # kept: point 3 at (v,u) = (1,2), point 4 at x = 1/1 + 2 = 3 -> (1,3)
    hits = {(v, u): int(index[0, v, u]) for v in range(3) for u in range(5) if index[0, v, u] >= 0}
    assert hits == {(1, 2): 3, (1, 3): 4}
    assert depth[0, 1, 2] == above and image[0, 0, 1, 2] == 4.0
    assert_splat_equal((image, depth, index), oracle_splat(pts, colors, E, K, 3, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_splat_image_border(backend):
    """x = -0.5 lands in column 0, x = W - 0.5 is outside; one float32 step across flips both (same for y)."""
    H, W = 4, 5
    E = torch.eye(3, 4)
    K = torch.eye(3)  # x = X, y = Y for Z = 1, exactly
    below = lambda a: float(np.nextafter(F(a), F(-100)))  # noqa: E731
    cases = [  # (X, Y) -> expected (v, u) or None
        ((-0.5, 1.0), (1, 0)), ((below(-0.5), 2.0), None),
        ((W - 0.5, 1.0), None), ((below(W - 0.5), 2.0), (2, W - 1)),
        ((1.0, -0.5), (0, 1)), ((2.0, below(-0.5)), None),
        ((3.0, H - 0.5), None), ((3.0, below(H - 0.5)), (H - 1, 3)),
        ((-0.5, -0.5), (0, 0)), ((below(W - 0.5), below(H - 0.5)), (H - 1, W - 1)),
        ((1.4999999, 1.0), (1, 1)), ((1.5, 2.0), (2, 2)),  # half-way rounds up
        ((float("inf"), 1.0), None), ((float("nan"), 1.0), None), ((1e30, 1.0), None), ((-1e30, 1.0), None),
    ]
    pts = torch.tensor([[x, y, 1.0] for (x, y), _ in cases])
    colors = torch.rand(len(cases), 3)
    image, depth, index = splat_points(pts, colors, E, K, H, W, backend=backend)
    for i, (_, where) in enumerate(cases):
        found = (index[0] == i).nonzero().tolist()
        assert found == ([list(where)] if where else []), (i, cases[i], found)
    assert_splat_equal((image, depth, index), oracle_splat(pts, colors, E, K, H, W))


@pytest.mark.parametrize("backend", BACKENDS)
def test_splat_empty_cloud_and_background(backend):
    E, K = make_cameras(2, 3, 4, seed=7)
    image, depth, index = splat_points(torch.zeros(0, 3), torch.zeros(0, 2), E, K, 3, 4,
                                       background=torch.tensor([0.25, 0.5]), backend=backend)
    assert image.shape == (2, 2, 3, 4) and (index == -1).all() and depth.isinf().all()
    assert (image[:, 0] == 0.25).all() and (image[:, 1] == 0.5).all()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_splat_cpu_many_points_any_thread_count(threads):
    """Large P with one camera: the CPU path splits the points over private z-buffers; the split must not matter."""
    with torch_threads(threads):
        g = torch.Generator().manual_seed(8)
        P, H, W = 150_000, 12, 16
        E, K = make_cameras(1, H, W, seed=9)
        pts = make_points(P // 2, seed=10).repeat(2, 1)[torch.randperm(P, generator=g)]  # every point twice: ties
        colors = torch.rand(P, 3, generator=g)
        want = painter_oracle(pts, colors, E, K, H, W)
        assert_splat_equal(splat_points(pts, colors, E, K, H, W, backend="cpu"), want)
        assert_splat_equal(splat_points(pts, colors, E, K, H, W, backend="reference"), want)


def test_splat_auto_is_cpu_on_cpu_tensors():
    E, K = make_cameras(2, 5, 6, seed=11)
    pts, colors = make_points(100, seed=12), torch.rand(100, 3)
    got = splat_points(pts, colors, E, K, 5, 6, backend="auto")
    assert_splat_equal(got, oracle_splat(pts, colors, E, K, 5, 6))


# --------------------------------------------------------------------------------------------- unproject
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cams", ["single", "batched"])
def test_unproject_matches_oracle(backend, dtype, cams):
    S, H, W = 3, 5, 7
    E, K = make_cameras(S, H, W, seed=13)
    if cams == "single":
        E, K = E[0], K[0]
    depth = (0.5 + 3 * torch.rand(S, H, W)).to(dtype)
    got = unproject_depth(depth, E.to(dtype), K.to(dtype), backend=backend)
    assert got.shape == (S, H, W, 3) and got.dtype == dtype
    want = torch.from_numpy(oracle_unproject(depth, E.to(dtype), K.to(dtype)))
    assert torch.equal(got, want), (got - want).abs().max()


def test_unproject_inverts_the_pinhole_projection():
    """float64 check of the convention itself: K (R X + t) = d [u, v, 1] for every pixel centre (u, v)."""
    S, H, W = 2, 4, 6
    E, K = make_cameras(S, H, W, seed=14, dtype=torch.float64)  # R orthonormal to float64 precision
    depth = 1 + torch.rand(S, H, W, dtype=torch.float64)
    world = unproject_depth(depth, E, K, backend="reference")
    cam = torch.einsum("sij,shwj->shwi", E[:, :, :3], world) + E[:, None, None, :, 3]
    pix = torch.einsum("sij,shwj->shwi", K, cam)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                          indexing="ij")
    torch.testing.assert_close(pix[..., 2], depth, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pix[..., 0] / pix[..., 2], u.expand(S, H, W), rtol=0, atol=1e-10)
    torch.testing.assert_close(pix[..., 1] / pix[..., 2], v.expand(S, H, W), rtol=0, atol=1e-10)


def test_unproject_reference_is_differentiable():
    E, K = make_cameras(1, 3, 4, seed=15)
    depth = torch.rand(1, 3, 4, requires_grad=True)
    unproject_depth(depth, E, K).sum().backward()  # auto picks the reference when gradients are needed
    assert depth.grad is not None and depth.grad.shape == depth.shape


# ------------------------------------------------------------------------------------ unproject + splat
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [1, 3])
def test_identity_reprojection(backend, C):
    """Unproject a frame and splat it into the same camera: every pixel gets its own point back."""
    H, W = 6, 9
    E, K = make_cameras(1, H, W, seed=16)
    depth = 0.5 + 4 * torch.rand(1, H, W)
    frame = torch.rand(1, C, H, W)
    world = unproject_depth(depth, E, K, backend=backend).reshape(-1, 3)
    image, z, index = splat_points(world, frame[0].reshape(C, -1).t(), E, K, H, W, backend=backend)
    assert torch.equal(index, torch.arange(H * W).view(1, H, W))
    assert torch.equal(image, frame)
    torch.testing.assert_close(z, depth, rtol=1e-5, atol=0)

    out = reprojection_error(frame, depth, torch.ones(1, H, W), E, K, backend=backend)
    assert torch.equal(out["rendered"], frame)
    assert out["per_frame_mse"].tolist() == [0.0] and out["coverage"].tolist() == [1.0]

    conf = torch.rand(1, H, W)
    out = reprojection_error(frame, depth, conf, E, K, conf_threshold=0.5, backend=backend)
    covered = (conf > 0.5)[:, None]
    assert torch.equal(out["rendered"], torch.where(covered, frame, 0.0))
    torch.testing.assert_close(out["per_frame_mse"], (frame * ~covered).square().mean().view(1))
    torch.testing.assert_close(out["coverage"], covered.float().mean().view(1))


# ------------------------------------------------------------------------------------- reprojection error
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_view_hand_computed(backend):
    """Two cameras 0.5 apart along x, flat depth 2, f = 4: disparity f*b/Z = 1 pixel, computed by hand.

    Frame-0 pixel (v,u) goes to frame-1 pixel (v,u-1); frame-1 pixel (v,u) to frame-0 pixel (v,u+1). Depths
    are equal (2) so ties go to the lower point index: frame 0's points. Frame 0 renders itself; frame 1
    renders frame 0 shifted left by one column, its last column from its own points.
    """
    H, W, C = 4, 4, 3
    K = torch.tensor([[4.0, 0.0, 1.5], [0.0, 4.0, 1.5], [0.0, 0.0, 1.0]]).expand(2, 3, 3)
    E = torch.zeros(2, 3, 4)
    E[:, :, :3] = torch.eye(3)
    E[1, 0, 3] = -0.5  # camera 1 centre at world x = +0.5 (x_cam = x_world - 0.5)
    frames = torch.rand(2, C, H, W)
    depth = torch.full((2, H, W), 2.0)

    out = reprojection_error(frames, depth, torch.ones(2, H, W), E, K, backend=backend)
    want1 = torch.cat((frames[0, :, :, 1:], frames[1, :, :, 3:]), dim=-1)
    assert torch.equal(out["rendered"][0], frames[0])
    assert torch.equal(out["rendered"][1], want1)
    torch.testing.assert_close(out["per_frame_mse"], torch.stack((torch.tensor(0.0),
                                                                  (want1 - frames[1]).square().mean())))
    assert out["coverage"].tolist() == [1.0, 1.0]

    # only frame 0's points: frame 1's last column is empty (background 0), frame 0's first column too
    conf = torch.stack((torch.ones(H, W), torch.zeros(H, W)))
    out = reprojection_error(frames, depth, conf, E, K, conf_threshold=0.5, backend=backend)
    want1 = torch.cat((frames[0, :, :, 1:], torch.zeros(C, H, 1)), dim=-1)
    assert torch.equal(out["rendered"][1], want1)
    assert torch.equal(out["rendered"][0], frames[0])
    assert out["coverage"].tolist() == [1.0, 0.75]
    torch.testing.assert_close(out["per_frame_mse"][1], (want1 - frames[1]).square().mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_views_render_the_first_frame(backend):
    """S copies of one camera and one depth map: every pixel has S exactly tied points; frame 0's win."""
    S, C, H, W = 3, 3, 5, 6
    E, K = make_cameras(1, H, W, seed=17)
    depth = (1 + torch.rand(1, H, W)).expand(S, H, W)
    frames = torch.rand(S, C, H, W)
    out = reprojection_error(frames, depth, torch.ones(S, H, W), E.expand(S, 3, 4), K.expand(S, 3, 3),
                             backend=backend)
    assert torch.equal(out["rendered"], frames[:1].expand(S, C, H, W))
    torch.testing.assert_close(out["per_frame_mse"], (frames - frames[:1]).square().mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_reprojection_error_matches_oracle(backend, C, threshold):
    S, H, W = 3, 6, 7
    E, K = make_cameras(S, H, W, seed=18)
    g = torch.Generator().manual_seed(19)
    frames = torch.rand(S, C, H, W, generator=g)
    depth = 1 + 3 * torch.rand(S, H, W, generator=g)
    depth[0, 0, :3] = torch.tensor([0.0, -1.0, 1e-7])  # points at / behind the camera centre
    conf = torch.rand(S, H, W, generator=g)
    conf[1, 2, :] = threshold  # exactly at the threshold: excluded (conf > threshold)
    image, mse, coverage = oracle_reprojection(frames, depth, conf, E, K, threshold)
    out = reprojection_error(frames, depth, conf, E, K, conf_threshold=threshold, backend=backend)
    assert set(out) == {"per_frame_mse", "rendered", "coverage"}
    assert out["rendered"].shape == (S, C, H, W) and out["per_frame_mse"].shape == (S,)
    assert torch.equal(out["rendered"], torch.from_numpy(image))
    torch.testing.assert_close(out["per_frame_mse"], torch.from_numpy(mse).float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["coverage"], torch.from_numpy(coverage).float(), rtol=1e-6, atol=0)
    assert 0.3 < float(coverage.mean()) < 1.0  # the scene is neither empty nor trivially full


def test_reprojection_error_backends_agree_on_a_larger_scene():
    """reference vs cpu (no interpreter) on S=4 frames of 24x32 against the numpy painter oracle."""
    S, C, H, W = 4, 3, 24, 32
    E, K = make_cameras(S, H, W, seed=20)
    g = torch.Generator().manual_seed(21)
    frames, depth, conf = torch.rand(S, C, H, W, generator=g), 1 + torch.rand(S, H, W, generator=g), \
        torch.rand(S, H, W, generator=g)
    world = torch.from_numpy(oracle_unproject(depth, E, K)).reshape(-1, 3)
    keep = (conf > 0.2).reshape(-1)
    want, _, _ = painter_oracle(world[keep], frames.permute(0, 2, 3, 1).reshape(-1, C)[keep], E, K, H, W)
    outs = {b: reprojection_error(frames, depth, conf, E, K, conf_threshold=0.2, backend=b)
            for b in ("reference", "cpu", "auto")}
    for b, out in outs.items():
        assert torch.equal(out["rendered"], torch.from_numpy(want)), b
        torch.testing.assert_close(out["per_frame_mse"], outs["reference"]["per_frame_mse"], rtol=1e-5, atol=0)
        torch.testing.assert_close(out["coverage"], outs["reference"]["coverage"], rtol=1e-6, atol=0)


def test_reprojection_error_cpu_same_bits_for_any_thread_count():
    S, C, H, W = 3, 3, 40, 48
    E, K = make_cameras(S, H, W, seed=23)
    g = torch.Generator().manual_seed(24)
    frames, depth, conf = torch.rand(S, C, H, W, generator=g), 1 + torch.rand(S, H, W, generator=g), \
        torch.rand(S, H, W, generator=g)
    outs = []
    for threads in (1, 2, 5):
        with torch_threads(threads):
            outs.append(reprojection_error(frames, depth, conf, E, K, conf_threshold=0.1, backend="cpu"))
    ref = reprojection_error(frames, depth, conf, E, K, conf_threshold=0.1, backend="reference")
    for out in outs:
        for key in ("per_frame_mse", "rendered", "coverage"):
            assert torch.equal(out[key], outs[0][key]), key
    assert torch.equal(outs[0]["rendered"], ref["rendered"])


# ------------------------------------------------------------------------------------------------ errors
def test_bad_arguments_name_the_argument():
    E, K = make_cameras(2, 4, 5, seed=22)
    pts, colors = torch.rand(10, 3), torch.rand(10, 3)
    frames, depth, conf = torch.rand(2, 3, 4, 5), torch.rand(2, 4, 5), torch.rand(2, 4, 5)
    with pytest.raises(ValueError, match="backend"):
        splat_points(pts, colors, E, K, 4, 5, backend="cuda")
    with pytest.raises(ValueError, match="points"):
        splat_points(torch.rand(10, 2), colors, E, K, 4, 5)
    with pytest.raises(ValueError, match="colors"):
        splat_points(pts, torch.rand(9, 3), E, K, 4, 5)
    with pytest.raises(TypeError, match="points"):
        splat_points(pts.long(), colors, E, K, 4, 5)
    with pytest.raises(TypeError, match="colors"):
        splat_points(pts, colors.to(torch.uint8), E, K, 4, 5)
    with pytest.raises(ValueError, match="extrinsic"):
        splat_points(pts, colors, E[:, :, :3], K, 4, 5)
    with pytest.raises(ValueError, match="intrinsic"):
        splat_points(pts, colors, E, K[:, :2], 4, 5)
    with pytest.raises(ValueError, match="intrinsic holds 2 cameras"):
        splat_points(pts, colors, torch.cat((E, E[:1])), K, 4, 5)  # 3 vs 2 cameras
    with pytest.raises(TypeError, match="intrinsic"):
        splat_points(pts, colors, E, K.int(), 4, 5)
    bad_k = K.clone()
    bad_k[0, 2, 0] = 1.0
    with pytest.raises(ValueError, match="intrinsic"):
        splat_points(pts, colors, E, bad_k, 4, 5)
    with pytest.raises(TypeError, match="height"):
        splat_points(pts, colors, E, K, 4.0, 5)
    with pytest.raises(ValueError, match="width"):
        splat_points(pts, colors, E, K, 4, 0)
    with pytest.raises(ValueError, match="background"):
        splat_points(pts, colors, E, K, 4, 5, background=torch.zeros(2))
    with pytest.raises(ValueError, match="device"):
        splat_points(pts.to("meta"), colors, E, K, 4, 5)
    with pytest.raises(ValueError, match="depth"):
        unproject_depth(depth[0], E, K)
    with pytest.raises(TypeError, match="depth"):
        unproject_depth(depth.int(), E, K)
    with pytest.raises(ValueError, match="extrinsic"):
        unproject_depth(depth, torch.cat((E, E[:1])), K)
    with pytest.raises(ValueError, match="frames"):
        reprojection_error(frames[0], depth, conf, E, K)
    with pytest.raises(ValueError, match="conf"):
        reprojection_error(frames, depth, conf[:, :3], E, K)
    with pytest.raises(ValueError, match="depth"):
        reprojection_error(frames, depth[:1], conf, E, K)
    with pytest.raises(TypeError, match="frames"):
        reprojection_error((frames * 255).to(torch.uint8), depth, conf, E, K)
    with pytest.raises(ValueError, match="device"):
        reprojection_error(frames, depth, conf.to("meta"), E, K)
    with pytest.raises(ValueError, match="intrinsic"):
        reprojection_error(frames, depth, conf, E, torch.cat((K, K[:1])))


@pytest.mark.parametrize("op", ["unproject", "reprojection_error"])
def test_triton_refuses_more_frames_than_grid_axis_1_holds(op):
    """Grid axis 1 holds the frames; CUDA caps it at 65,535. The wrapper refuses before launching (the
    interpreter has no such limit, so without the check this call would run here and fail only on a GPU)."""
    if not triton_usable(torch.device("cpu")):
        pytest.skip("triton missing or TRITON_INTERPRET unset")
    S = 65536
    depth = torch.ones(S, 1, 1)
    extrinsic = torch.eye(3, 4).expand(S, 3, 4)
    intrinsic = torch.eye(3).expand(S, 3, 3)
    with pytest.raises(ValueError, match="grid axis 1 holds 65536 programs"):
        if op == "unproject":
            unproject_depth(depth, extrinsic, intrinsic, backend="triton")
        else:
            reprojection_error(torch.zeros(S, 1, 1, 1), depth, torch.ones(S, 1, 1), extrinsic, intrinsic,
                               backend="triton")


# ------------------------------------------------------------------------------------ GPU lane (compiled Triton)
@pytest.mark.gpu
@pytest.mark.parametrize("C", [1, 3])
def test_cuda_splat_matches_oracle_exactly(C):
    """Compiled Triton on CUDA (IEEE division, no FMA contraction): the same bits as the oracle."""
    H, W = 37, 53
    E, K = make_cameras(5, H, W, seed=3)
    pts, colors = make_points(3000, seed=4), torch.rand(3000, C)
    got = splat_points(pts.cuda(), colors.cuda(), E.cuda(), K.cuda(), H, W, backend="triton")
    assert all(t.is_cuda for t in got)
    assert_splat_equal(tuple(t.cpu() for t in got), oracle_splat(pts, colors, E, K, H, W))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_unproject_matches_reference(dtype):
    E, K = make_cameras(3, 40, 56, seed=8)
    depth = (1 + torch.rand(3, 40, 56)).to(dtype)
    got = unproject_depth(depth.cuda(), E.cuda(), K.cuda(), backend="triton").cpu()
    want = unproject_depth(depth, E, K, backend="reference")
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_cuda_reprojection_error_matches_reference():
    """A VideoGPA-sized call (10 frames of 96x160) on CUDA against the reference on CPU."""
    S, C, H, W = 10, 3, 96, 160
    E, K = make_cameras(S, H, W, seed=20)
    g = torch.Generator().manual_seed(21)
    frames, depth, conf = torch.rand(S, C, H, W, generator=g), 1 + torch.rand(S, H, W, generator=g), \
        torch.rand(S, H, W, generator=g)
    want = reprojection_error(frames, depth, conf, E, K, conf_threshold=0.2, backend="reference")
    got = reprojection_error(*(t.cuda() for t in (frames, depth, conf, E, K)), conf_threshold=0.2, backend="triton")
    assert torch.equal(got["rendered"].cpu(), want["rendered"])
    torch.testing.assert_close(got["per_frame_mse"].cpu(), want["per_frame_mse"], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["coverage"].cpu(), want["coverage"], rtol=1e-6, atol=0)
