"""Z-buffer reprojection: unproject depth to world points, splat a coloured cloud into cameras, per-frame error.

Conventions (DESIGN.md §4):

- cameras are OpenCV (x right, y down, z forward); ``extrinsic`` [S,3,4] = [R|t] is camera-from-world
  (x_cam = R x_world + t, R orthonormal); ``intrinsic`` [S,3,3] = [[fx,s,cx],[0,fy,cy],[0,0,1]] in pixels with
  pixel centres at integer coordinates: pixel (u,v) covers [u-0.5,u+0.5) x [v-0.5,v+0.5);
- a point projects to x = fx*X/Z + s*Y/Z + cx, y = fy*Y/Z + cy and lands in pixel (floor(x+0.5), floor(y+0.5));
  points with Z <= 1e-6 (float32) or outside the image are dropped;
- z-buffer: each pixel keeps the point of smallest Z; an exact depth tie goes to the lower point index. Every
  backend packs (float32 bits of Z) << 32 | index into one int64 key and keeps the minimum, so the result is
  deterministic and identical on every backend (unlike a depth sort + ``index_put``, whose duplicate writes are
  undefined). The index needs 31 bits: at most 2^31 - 1 points;
- empty pixels: image = background, depth = +inf, index = -1.

All backends evaluate the same float32 expressions in the same order with one rounding per operation (no fused
multiply-add, IEEE division), so their pixels, indices, depths and images agree exactly; per-frame MSEs agree to
float rounding (they are sums in different orders). Backends (``kernels._backend.resolve``):

- ``reference``: plain PyTorch, the oracle: packed keys + ``scatter_reduce(amin)``;
- ``cpu``: C++ on the ATen thread pool (``csrc/reproject.cpp``, built on first use with
  ``torch.utils.cpp_extension``). ``reprojection_error`` is one fused call (unproject into a structure-of-arrays
  cloud, vectorised projection + branch-free z-buffer min per frame, resolve + error) with no Python-side
  intermediates; results do not depend on the thread count;
- ``triton``: three kernels (unproject; z-buffer with ``tl.atomic_min`` on the int64 keys, each program projecting
  a block of points into every camera; resolve with the per-frame error), fixed block sizes, no autotune. Runs on
  CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests exercise it).

Only ``reference`` supports autograd (``unproject_depth``).
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from geoforge.kernels import _cpp
from geoforge.kernels._backend import check_grid, device_guard, resolve

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without triton
    triton = None

Z_MIN = torch.tensor(1e-6, dtype=torch.float32).item()  # float32(1e-6), exact in every backend
MAX_POINTS = 2**31 - 1
_EMPTY = torch.iinfo(torch.int64).max
_CSRC = _cpp.CSRC / "reproject.cpp"


# ----------------------------------------------------------------------------------------------- validation
def _check_tensors(op: str, floating: bool = True, **tensors: object) -> None:
    """Each named argument is a tensor; floating point (``floating``) or at least real-valued."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if floating and not t.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.is_complex():
            raise TypeError(f"{op}: {name} must be real-valued, got {t.dtype}")


def _size(op: str, name: str, value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}") from None
    if value < 1:
        raise ValueError(f"{op}: {name} must be positive, got {value}")
    return value


def _cameras(extrinsic: Tensor, intrinsic: Tensor, frames: int | None, op: str) -> tuple[Tensor, Tensor]:
    """Check and broadcast cameras to [S,3,4], [S,3,3]; a single [3,4] / [3,3] camera broadcasts."""
    _check_tensors(op, extrinsic=extrinsic, intrinsic=intrinsic)
    if extrinsic.shape[-2:] != (3, 4) or extrinsic.dim() not in (2, 3):
        raise ValueError(f"{op}: extrinsic must be [3,4] or [S,3,4] camera-from-world, got {tuple(extrinsic.shape)}")
    if intrinsic.shape[-2:] != (3, 3) or intrinsic.dim() not in (2, 3):
        raise ValueError(f"{op}: intrinsic must be [3,3] or [S,3,3], got {tuple(intrinsic.shape)}")
    if extrinsic.device != intrinsic.device:
        raise ValueError(f"{op}: extrinsic on {extrinsic.device} but intrinsic on {intrinsic.device}")
    extrinsic = extrinsic.reshape(-1, 3, 4)
    intrinsic = intrinsic.reshape(-1, 3, 3)
    count = max(extrinsic.shape[0], intrinsic.shape[0]) if frames is None else frames
    if count < 1 or extrinsic.shape[0] < 1 or intrinsic.shape[0] < 1:
        raise ValueError(f"{op}: need at least one camera and one frame, got extrinsic {tuple(extrinsic.shape)}, "
                         f"intrinsic {tuple(intrinsic.shape)}" + ("" if frames is None else f", {frames} frames"))
    for name, cam in (("extrinsic", extrinsic), ("intrinsic", intrinsic)):
        if cam.shape[0] not in (1, count):
            raise ValueError(f"{op}: {name} holds {cam.shape[0]} cameras, expected 1 or {count}")
    lower = torch.stack((intrinsic[:, 1, 0], intrinsic[:, 2, 0], intrinsic[:, 2, 1], intrinsic[:, 2, 2] - 1))
    if bool((lower != 0).any()):
        raise ValueError(f"{op}: intrinsic must be [[fx,s,cx],[0,fy,cy],[0,0,1]] (upper triangular, last row 0 0 1)")
    return extrinsic.expand(count, 3, 4), intrinsic.expand(count, 3, 3)


def _same_device(op: str, **tensors: Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {devices}")
    return next(iter(devices.values()))


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def _block(n: int, device: torch.device, gpu_block: int = 1024) -> int:
    """Triton block: fixed on GPU; under the interpreter one big block (its cost grows with the program count)."""
    return gpu_block if device.type == "cuda" else max(16, min(1 << 16, triton.next_power_of_2(max(n, 1))))


# ------------------------------------------------------------------------------------------------ reference
def _unproject_reference(depth: Tensor, extrinsic: Tensor, intrinsic: Tensor) -> Tensor:
    S, H, W = depth.shape
    k = intrinsic[:, :, :, None, None]  # [S,3,3,1,1], broadcasts over (H,W)
    e = extrinsic[:, :, :, None, None]
    u = torch.arange(W, dtype=depth.dtype, device=depth.device).view(1, W)
    v = torch.arange(H, dtype=depth.dtype, device=depth.device).view(H, 1)
    yn = (v - k[:, 1, 2]) / k[:, 1, 1]
    xn = ((u - k[:, 0, 2]) - k[:, 0, 1] * yn) / k[:, 0, 0]
    dx = xn * depth - e[:, 0, 3]
    dy = yn * depth - e[:, 1, 3]
    dz = depth - e[:, 2, 3]
    world = [e[:, 0, j] * dx + e[:, 1, j] * dy + e[:, 2, j] * dz for j in range(3)]  # R^T (x_cam - t)
    return torch.stack(world, dim=-1)


def _zbuffer_reference(points: Tensor, valid: Tensor | None, extrinsic: Tensor, intrinsic: Tensor,
                       height: int, width: int) -> Tensor:
    """points [P,3] float32 -> keys [S,H*W] int64 via scatter_reduce(amin) on packed keys."""
    S, P = extrinsic.shape[0], points.shape[0]
    X, Y, Z = points.unbind(-1)
    e = extrinsic[:, :, :, None]  # [S,3,4,1], broadcasts over points
    k = intrinsic[:, :, :, None]
    zc = e[:, 2, 0] * X + e[:, 2, 1] * Y + e[:, 2, 2] * Z + e[:, 2, 3]
    xc = e[:, 0, 0] * X + e[:, 0, 1] * Y + e[:, 0, 2] * Z + e[:, 0, 3]
    yc = e[:, 1, 0] * X + e[:, 1, 1] * Y + e[:, 1, 2] * Z + e[:, 1, 3]
    xn, yn = xc / zc, yc / zc
    fu = torch.floor(k[:, 0, 0] * xn + k[:, 0, 1] * yn + k[:, 0, 2] + 0.5)
    fv = torch.floor(k[:, 1, 1] * yn + k[:, 1, 2] + 0.5)
    ok = (zc > Z_MIN) & (fu >= 0) & (fu < width) & (fv >= 0) & (fv < height)
    if valid is not None:
        ok &= valid
    frame = torch.arange(S, device=points.device)[:, None] * (height * width)
    pixel = frame + fv.where(ok, 0).long() * width + fu.where(ok, 0).long()
    key = (zc.view(torch.int32).long() << 32) | torch.arange(P, device=points.device)
    keys = torch.full((S * height * width,), _EMPTY, dtype=torch.int64, device=points.device)
    return keys.scatter_reduce_(0, pixel[ok], key[ok], "amin").view(S, height * width)


def _splat_reference(points: Tensor, colors: Tensor, extrinsic: Tensor, intrinsic: Tensor, height: int,
                     width: int, background: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    S = extrinsic.shape[0]
    keys = _zbuffer_reference(points, None, extrinsic, intrinsic, height, width)
    found = keys != _EMPTY
    index = torch.where(found, keys & 0xFFFFFFFF, -1)
    depth = torch.where(found, (keys >> 32).int().view(torch.float32), torch.inf)
    image = torch.cat((colors, background[None]))[index]  # [S,HW,C]; index -1 picks the background row
    shape = (S, height, width)
    return image.permute(0, 2, 1).reshape(S, -1, height, width), depth.view(shape), index.view(shape)


# ------------------------------------------------------------------------------------------------ triton
if triton is not None:

    @triton.jit
    def _div(a, b, FP64: tl.constexpr):
        """IEEE round-to-nearest division (plain fp32 ``/`` is approximate on GPU)."""
        if FP64:
            return a / b
        else:
            return tl.math.div_rn(a, b)

    @triton.jit
    def _unproject_kernel(depth_ptr, extr_ptr, intr_ptr, out_ptr, H, W, FP64: tl.constexpr, BLOCK: tl.constexpr):
        s = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H * W
        e = extr_ptr + s * 12
        k = intr_ptr + s * 9
        d = tl.load(depth_ptr + s * H * W + offs, mask=mask, other=0.0)
        u = (offs % W).to(d.dtype)
        v = (offs // W).to(d.dtype)
        yn = _div(v - tl.load(k + 5), tl.load(k + 4), FP64)
        xn = _div((u - tl.load(k + 2)) - tl.load(k + 1) * yn, tl.load(k + 0), FP64)
        dx = xn * d - tl.load(e + 3)
        dy = yn * d - tl.load(e + 7)
        dz = d - tl.load(e + 11)
        out = out_ptr + (s * H * W + offs) * 3
        for j in tl.static_range(3):
            world = tl.load(e + j) * dx + tl.load(e + 4 + j) * dy + tl.load(e + 8 + j) * dz
            tl.store(out + j, world, mask=mask)

    @triton.jit
    def _zbuffer_kernel(points_ptr, valid_ptr, extr_ptr, intr_ptr, keys_ptr, P, S, H, W, z_min,
                        HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < P
        X = tl.load(points_ptr + offs * 3, mask=live, other=0.0)
        Y = tl.load(points_ptr + offs * 3 + 1, mask=live, other=0.0)
        Z = tl.load(points_ptr + offs * 3 + 2, mask=live, other=0.0)
        if HAS_VALID:
            live = live & (tl.load(valid_ptr + offs, mask=live, other=0) != 0)
        e = extr_ptr
        k = intr_ptr
        frame_keys = keys_ptr  # pointers advance one camera / one frame per iteration (64-bit offsets)
        for _ in range(S):
            zc = tl.load(e + 8) * X + tl.load(e + 9) * Y + tl.load(e + 10) * Z + tl.load(e + 11)
            xc = tl.load(e + 0) * X + tl.load(e + 1) * Y + tl.load(e + 2) * Z + tl.load(e + 3)
            yc = tl.load(e + 4) * X + tl.load(e + 5) * Y + tl.load(e + 6) * Z + tl.load(e + 7)
            xn = tl.math.div_rn(xc, zc)
            yn = tl.math.div_rn(yc, zc)
            fu = tl.floor(tl.load(k + 0) * xn + tl.load(k + 1) * yn + tl.load(k + 2) + 0.5)
            fv = tl.floor(tl.load(k + 4) * yn + tl.load(k + 5) + 0.5)
            ok = live & (zc > z_min) & (fu >= 0) & (fu < W) & (fv >= 0) & (fv < H)
            pixel = tl.where(ok, fv, 0.0).to(tl.int64) * W + tl.where(ok, fu, 0.0).to(tl.int64)
            key = (zc.to(tl.int32, bitcast=True).to(tl.int64) << 32) | offs
            tl.atomic_min(frame_keys + pixel, key, mask=ok, sem="relaxed")
            e += 12
            k += 9
            frame_keys += H * W

    @triton.jit
    def _resolve_kernel(keys_ptr, src_ptr, s_group, s_chan, s_point, group_size, bg_ptr, image_ptr, depth_ptr,
                        index_ptr, target_ptr, sse_ptr, hits_ptr, HW, C, WITH_ERROR: tl.constexpr,
                        BLOCK: tl.constexpr):
        s = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < HW
        key = tl.load(keys_ptr + s * HW + offs, mask=mask, other=9223372036854775807)
        found = key != 9223372036854775807
        index = tl.where(found, key.to(tl.int32).to(tl.int64), 0)  # low 32 bits = point index
        colour = src_ptr + (index // group_size) * s_group + (index % group_size) * s_point
        err = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(C):
            value = tl.load(colour + c * s_chan, mask=mask & found, other=0.0)
            value = tl.where(found, value, tl.load(bg_ptr + c))
            tl.store(image_ptr + (s * C + c) * HW + offs, value, mask=mask)
            if WITH_ERROR:
                diff = value - tl.load(target_ptr + (s * C + c) * HW + offs, mask=mask, other=0.0)
                err += tl.where(mask, diff * diff, 0.0)
        if WITH_ERROR:
            part = s * tl.num_programs(0) + tl.program_id(0)
            tl.store(sse_ptr + part, tl.sum(err, axis=0))
            tl.store(hits_ptr + part, tl.sum((mask & found).to(tl.int32), axis=0))
        else:
            depth = tl.where(found, (key >> 32).to(tl.int32).to(tl.float32, bitcast=True), float("inf"))
            tl.store(depth_ptr + s * HW + offs, depth, mask=mask)
            tl.store(index_ptr + s * HW + offs, tl.where(found, index, -1), mask=mask)


# ------------------------------------------------------------------------------------------------ fast paths
def _cpu_extension():
    """Build (first call, ~20 s) or load the cached C++/OpenMP extension from ``csrc/reproject.cpp``."""
    return _cpp.load_extension("reproject", "geoforge_reproject", _CSRC.name, ("-ffp-contract=off",))


def _unproject_fast(depth: Tensor, extrinsic: Tensor, intrinsic: Tensor, backend: str) -> Tensor:
    if backend == "cpu":
        return _cpu_extension().unproject(depth, extrinsic, intrinsic)
    S, H, W = depth.shape
    out = torch.empty(S, H, W, 3, dtype=depth.dtype, device=depth.device)
    block = _block(H * W, depth.device)
    grid = check_grid("unproject_depth", (triton.cdiv(H * W, block), S))  # axis 1: frames, at most 65,535
    with device_guard(depth):
        _unproject_kernel[grid](depth, extrinsic, intrinsic, out, H, W, FP64=depth.dtype == torch.float64,
                                BLOCK=block, enable_fp_fusion=False)
    return out


def _zbuffer_triton(points: Tensor, valid: Tensor | None, extrinsic: Tensor, intrinsic: Tensor, height: int,
                    width: int) -> Tensor:
    """points [P,3] float32 (valid [P] bool or None) -> keys [S,H*W] int64."""
    S, P = extrinsic.shape[0], points.shape[0]
    keys = torch.full((S, height * width), _EMPTY, dtype=torch.int64, device=points.device)
    block = _block(P, points.device)
    mask = valid.view(torch.uint8) if valid is not None else points
    if P > 0:
        grid = check_grid("splat_points", (triton.cdiv(P, block),))
        with device_guard(points):
            _zbuffer_kernel[grid](points, mask, extrinsic, intrinsic, keys, P, S, height, width, Z_MIN,
                                  HAS_VALID=valid is not None, BLOCK=block, enable_fp_fusion=False)
    return keys


def _resolve_triton(keys: Tensor, src: Tensor, background: Tensor, target: Tensor | None) -> tuple[Tensor, ...]:
    """keys [S,HW]; colour of point i, channel c = src[i // N, c, i % N] for src [G,C,N].

    Returns (image [S,C,HW], depth [S,HW], index [S,HW]) or, given target [S,C,HW],
    (image, sum of squared errors [S] float64, hit counts [S] int64).
    """
    (S, HW), C = keys.shape, src.shape[1]
    block = _block(HW, keys.device)
    grid = check_grid("reproject resolve", (triton.cdiv(HW, block), S))  # axis 1: frames, at most 65,535
    image = torch.empty(S, C, HW, dtype=torch.float32, device=keys.device)
    if target is not None:
        sse = torch.empty(S, grid[0], dtype=torch.float32, device=keys.device)
        hits = torch.empty(S, grid[0], dtype=torch.int32, device=keys.device)
        outputs = (image, keys, keys, target, sse, hits)
    else:
        depth = torch.empty(S, HW, dtype=torch.float32, device=keys.device)
        index = torch.empty(S, HW, dtype=torch.int64, device=keys.device)
        outputs = (image, depth, index, keys, keys, keys)
    with device_guard(keys):
        _resolve_kernel[grid](keys, src, *src.stride(), max(src.shape[2], 1), background, *outputs, HW, C,
                              WITH_ERROR=target is not None, BLOCK=block)
    if target is not None:
        return image, sse.double().sum(1), hits.long().sum(1)
    return image, depth, index


def compile_specs() -> list[dict]:
    """The kernel variants the Triton path launches on a GPU, as ahead-of-time compile specs for
    ``kernels._aot`` (float32 and the float64 unprojection; fixed blocks from ``_block``, 4 warps)."""
    block = _block(1 << 20, torch.device("cuda"))
    f32 = {"*": "*fp32"}
    specs = [{"kernel": "_unproject_kernel", "dtype": dt, "constexprs": {"FP64": dt == "fp64", "BLOCK": block},
              "types": {"*": f"*{dt}"}} for dt in ("fp32", "fp64")]
    specs += [{"kernel": "_zbuffer_kernel", "dtype": "fp32", "constexprs": {"HAS_VALID": v, "BLOCK": block},
               "types": {**f32, "valid_ptr": "*u8", "keys_ptr": "*i64"}} for v in (True, False)]
    specs += [{"kernel": "_resolve_kernel", "dtype": "fp32", "constexprs": {"WITH_ERROR": e, "BLOCK": block},
               "types": {**f32, "keys_ptr": "*i64", "index_ptr": "*i64", "hits_ptr": "*i32"}} for e in (True, False)]
    for spec in specs:
        # unproject and z-buffer launch with enable_fp_fusion=False (exact, backend-identical arithmetic)
        spec.update(size=f"BLOCK={block}", num_warps=4,
                    options={"enable_fp_fusion": spec["kernel"] == "_resolve_kernel"})
    return specs


# ------------------------------------------------------------------------------------------------ public API
def unproject_depth(depth: Tensor, extrinsic: Tensor, intrinsic: Tensor, backend: str = "auto") -> Tensor:
    """World points [S,H,W,3] of depth maps [S,H,W] (z-depth along the optical axis).

    Pixel (u,v) at integer coordinates maps to depth * K^-1 [u,v,1] in the camera, then to R^T (x_cam - t)
    in the world. ``extrinsic`` [S,3,4] camera-from-world, ``intrinsic`` [S,3,3] (a single camera broadcasts).
    Computes in float64 for float64 depth, else float32. Differentiable with ``backend="reference"``; ``auto``
    picks the reference when gradients are needed.
    """
    _check_tensors("unproject_depth", depth=depth)
    if depth.dim() != 3 or depth.numel() == 0:
        raise ValueError(f"unproject_depth: depth must be a non-empty [S,H,W], got {tuple(depth.shape)}")
    _same_device("unproject_depth", depth=depth, extrinsic=extrinsic, intrinsic=intrinsic)
    extrinsic, intrinsic = _cameras(extrinsic, intrinsic, depth.shape[0], "unproject_depth")
    dtype = torch.float64 if depth.dtype == torch.float64 else torch.float32
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (depth, extrinsic, intrinsic))
    if needs_grad and backend == "auto":
        backend = "reference"
    chosen = resolve("unproject_depth", backend, depth.device)
    if chosen == "reference":
        return _unproject_reference(depth.to(dtype), extrinsic.to(dtype), intrinsic.to(dtype))
    if needs_grad:
        raise ValueError(f"unproject_depth: backend {chosen!r} has no autograd; use backend='reference'")
    cams = (extrinsic.to(dtype).contiguous(), intrinsic.to(dtype).contiguous())
    return _unproject_fast(depth.to(dtype).contiguous(), *cams, chosen)


def splat_points(points: Tensor, colors: Tensor, extrinsic: Tensor, intrinsic: Tensor, height: int, width: int,
                 background: float | Tensor = 0.0, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Z-buffer splat of a coloured cloud into S cameras (one pixel per point, nearest wins, ties -> lower index).

    points [P,3] world, colors [P,C], extrinsic [3,4] or [S,3,4], intrinsic [3,3] or [S,3,3] (a single camera
    means S=1, or broadcasts against the other's S). Computes in float32. Returns image [S,C,H,W] (``background``
    where empty: a float or [C]), depth [S,H,W] (+inf where empty) and index [S,H,W] int64 (-1 where empty).
    P must be below 2^31 (the key's index half).
    """
    _check_tensors("splat_points", points=points, colors=colors)
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"splat_points: points must be [P,3], got {tuple(points.shape)}")
    if colors.dim() != 2 or colors.shape[0] != points.shape[0] or colors.shape[1] < 1:
        raise ValueError(f"splat_points: colors must be [P,C] with P={points.shape[0]}, C>=1, "
                         f"got {tuple(colors.shape)}")
    if points.shape[0] > MAX_POINTS:
        raise ValueError(f"splat_points: at most {MAX_POINTS} points fit the z-buffer key, got {points.shape[0]}")
    height, width = _size("splat_points", "height", height), _size("splat_points", "width", width)
    device = _same_device("splat_points", points=points, colors=colors, extrinsic=extrinsic, intrinsic=intrinsic)
    extrinsic, intrinsic = _cameras(extrinsic, intrinsic, None, "splat_points")
    C = colors.shape[1]
    if isinstance(background, Tensor):
        _check_tensors("splat_points", background=background)
        if background.numel() not in (1, C):
            raise ValueError(f"splat_points: background must be a float or hold 1 or C={C} values, got "
                             f"{tuple(background.shape)}")
        bg = background.detach().to(device=device, dtype=torch.float32).reshape(-1).expand(C).contiguous()
    else:
        bg = torch.full((C,), float(background), dtype=torch.float32, device=device)
    points, colors, extrinsic, intrinsic = (_f32(t) for t in (points, colors, extrinsic, intrinsic))
    chosen = resolve("splat_points", backend, device)
    if chosen == "reference":
        return _splat_reference(points, colors, extrinsic, intrinsic, height, width, bg)
    if chosen == "cpu":
        ext = _cpu_extension()
        image, depth, index = ext.resolve(ext.zbuffer(points, extrinsic, intrinsic, height, width), colors, bg)
    else:
        keys = _zbuffer_triton(points, None, extrinsic, intrinsic, height, width)
        image, depth, index = _resolve_triton(keys, colors.t()[None], bg, None)
    S = extrinsic.shape[0]
    return image.view(S, C, height, width), depth.view(S, height, width), index.view(S, height, width)


def reprojection_error(frames: Tensor, depth: Tensor, conf: Tensor, extrinsic: Tensor, intrinsic: Tensor,
                       conf_threshold: float = 0.0, backend: str = "auto") -> dict[str, Tensor]:
    """VideoGPA's reprojection error: fuse all frames into one cloud, splat it into every frame, compare.

    frames [S,C,H,W] in [0,1], depth/conf [S,H,W], extrinsic [S,3,4], intrinsic [S,3,3]. Every pixel with
    conf > conf_threshold becomes a point coloured by its frame's pixel (point order = (s,v,u) flattening, which
    breaks depth ties). Returns ``rendered`` [S,C,H,W] (background 0), ``per_frame_mse`` [S] over all pixels
    and channels (empty pixels count as 0) and ``coverage`` [S] (fraction of pixels hit). float32, no autograd.
    """
    _check_tensors("reprojection_error", frames=frames, depth=depth)
    _check_tensors("reprojection_error", floating=False, conf=conf)
    if frames.dim() != 4 or frames.numel() == 0:
        raise ValueError(f"reprojection_error: frames must be a non-empty [S,C,H,W], got {tuple(frames.shape)}")
    S, C, H, W = frames.shape
    for name, t in (("depth", depth), ("conf", conf)):
        if tuple(t.shape) != (S, H, W):
            raise ValueError(f"reprojection_error: {name} must be [S,H,W]={[S, H, W]}, got {tuple(t.shape)}")
    if S * H * W > MAX_POINTS:
        raise ValueError(f"reprojection_error: S*H*W={S * H * W} exceeds the {MAX_POINTS}-point key limit")
    device = _same_device("reprojection_error", frames=frames, depth=depth, conf=conf, extrinsic=extrinsic,
                          intrinsic=intrinsic)
    extrinsic, intrinsic = _cameras(extrinsic, intrinsic, S, "reprojection_error")
    frames, depth, extrinsic, intrinsic = (_f32(t) for t in (frames, depth, extrinsic, intrinsic))
    valid = (conf > conf_threshold).reshape(-1)
    chosen = resolve("reprojection_error", backend, device)
    if chosen == "reference":
        points = _unproject_reference(depth, extrinsic, intrinsic).reshape(-1, 3)[valid]
        colors = frames.permute(0, 2, 3, 1).reshape(-1, C)[valid]
        background = torch.zeros(C, device=device)
        rendered, _, index = _splat_reference(points, colors, extrinsic, intrinsic, H, W, background)
        mse = (rendered - frames).square().mean(dim=(1, 2, 3))
        coverage = (index >= 0).float().mean(dim=(1, 2))
        return {"per_frame_mse": mse, "rendered": rendered, "coverage": coverage}
    extrinsic, intrinsic = extrinsic.contiguous(), intrinsic.contiguous()
    if chosen == "cpu":  # one fused C++ call: unproject, z-buffer, resolve, error
        rendered, sse, hits = _cpu_extension().reproject(frames, depth, valid.contiguous(), extrinsic, intrinsic)
    else:
        points = _unproject_fast(depth, extrinsic, intrinsic, chosen).view(-1, 3)
        keys = _zbuffer_triton(points, valid.contiguous(), extrinsic, intrinsic, H, W)
        target = frames.view(S, C, H * W)
        rendered, sse, hits = _resolve_triton(keys, target, torch.zeros(C, device=device), target)
    return {"per_frame_mse": (sse / (C * H * W)).float(), "rendered": rendered.view(S, C, H, W),
            "coverage": (hits.double() / (H * W)).float()}
