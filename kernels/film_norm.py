"""Fused RMSNorm + FiLM: ``y = rmsnorm(x) * w * (1 + scale) + shift`` over the last dim (DFoT's ``NormalizeWithCond``).

Shapes: ``x [..., D]`` (one row per token), ``weight [D]`` (the RMSNorm's learned weight, or None), ``scale`` and
``shift`` broadcastable to ``x`` (per token ``[..., D]`` as the U-ViT3D uses them, or e.g. one row per sample
``[B, 1, D]``). ``shift=None`` means ``scale`` is the packed ``[..., 2D]`` tensor ``(scale | shift)`` a FiLM layer
produces (``emb_layer(emb).chunk(2, -1)``): its two halves are read in place and its gradient is written as one
``[..., 2D]`` tensor, so neither the forward split nor the backward concatenation copies anything. With
``rstd = 1 / sqrt(mean(x^2) + eps)`` (eps 1e-6, ``torch.nn.RMSNorm``'s formula):

    forward:  y = x rstd w (1 + scale) + shift                          saves x and rstd [N] (not the normalised x)
    backward: dshift = g,  dscale = g xhat w,  dw = sum_rows g (1 + scale) xhat  (float32 across rows),
              dx = rstd (gw - xhat mean(gw xhat)),  gw = g (1 + scale) w,  xhat = x rstd

Backends (``kernels._backend.resolve("film_norm", ...)``): ``reference`` (``F.rms_norm`` then ``addcmul``: exactly
the eager module's math, the oracle), ``triton`` (one forward kernel, one backward kernel that also reduces dw
per program; CUDA, or CPU tensors under TRITON_INTERPRET=1), ``cpu`` (C++/OpenMP row kernels from
``csrc/film_norm.cpp``, built once by torch.utils.cpp_extension), ``auto`` (triton on CUDA, cpu on CPU; the
reference for float64, which the fused paths do not take). The backward of both fused paths is one pass over
the rows: each row is read once (x, g, scale) and dx, dscale, dshift written once.

dtypes: float32 or bfloat16 storage, independently for x, the modulation and the output (a float32 residual
stream with a bf16 FiLM under autocast is the common mixed case); all arithmetic in float32; the output dtype
is the promotion of x's, scale's and shift's, as in eager (``F.rms_norm`` returns x's dtype whatever the
weight's). float16 is refused on the fused
paths (as in ``kernels.align``; use bfloat16 or the reference).
"""
from __future__ import annotations

import functools
import math
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from geoforge.kernels import _backend, _cpp

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without triton use the cpu / reference paths
    triton = None

EPS = 1e-6
CSRC = _cpp.CSRC / "film_norm.cpp"
FUSED_DTYPES = (torch.float32, torch.bfloat16)
MAX_TRITON_COLS = 4096  # widest row one program holds: the backward keeps three [BLOCK_R, BLOCK_D] tiles live and
# spills at 8192 in bf16 on sm_90 even at 32 warps (compile lane); wider rows take the reference under ``auto``


def film_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor,
                            shift: torch.Tensor | None = None, eps: float = EPS) -> torch.Tensor:
    """Plain autograd: ``F.rms_norm`` then ``addcmul`` (the eager ``FiLMRMSNorm``'s exact math)."""
    if shift is None:
        scale, shift = scale.chunk(2, dim=-1)
    return torch.addcmul(shift, F.rms_norm(x, (x.shape[-1],), weight, eps), 1 + scale)


# ----------------------------------------------------------------------------- row kernels
class FilmOps(Protocol):
    """The fused rows: x, y, grad, dx contiguous [N, D]; w float32 [D]; scale / shift [G, R, D] views."""

    def fwd(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, y: torch.Tensor,
            eps: float) -> torch.Tensor:
        """Writes y; returns rstd float32 [N]."""

    def bwd(self, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, rstd: torch.Tensor,
            dx: torch.Tensor | None, dscale: torch.Tensor | None, dshift: torch.Tensor | None,
            want_dw: bool) -> torch.Tensor | None:
        """Writes dx, dscale, dshift (per row of x, [N, D] with any row stride) where given; returns dw float32
        [D] (None without ``want_dw``)."""


class _CppFilm:
    def __init__(self) -> None:
        self.ext = _load_cpp_extension()

    def fwd(self, x, w, scale, shift, y, eps):
        return self.ext.fwd(x, w, scale, shift, y, eps)

    def bwd(self, g, x, w, scale, rstd, dx, dscale, dshift, want_dw):
        part = self.ext.bwd(g, x, w, scale, rstd, dx, dscale, dshift, want_dw)
        return part.sum(dim=0) if want_dw else None


class _MetaFilm:
    """Shape-only rows for meta tensors: the fused autograd function then saves exactly what it saves on a
    real device (x, w, the modulation view, rstd), so memory accounting on the meta device
    (``profiling/bench_train.py --model``) counts the fused path, not the reference's intermediates."""

    def fwd(self, x, w, scale, shift, y, eps):
        return torch.empty(x.shape[0], dtype=torch.float32, device=x.device)

    def bwd(self, g, x, w, scale, rstd, dx, dscale, dshift, want_dw):
        return torch.empty(w.shape, dtype=torch.float32, device=w.device) if want_dw else None


def _load_cpp_extension():
    return _cpp.load_extension("film_norm", "geoforge_film_norm", CSRC.name)


if triton is not None:
    @triton.jit
    def _film_norm_fwd_kernel(x_ptr, w_ptr, s_ptr, h_ptr, y_ptr, rstd_ptr, N, D, s_sg, s_sr, s_r, h_sg, h_sr, h_r,
                              eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < N
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)  # int64: N * D may pass 2**31
        offs = r64[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        s_off = (r64 // s_r) * s_sg + (r64 % s_r) * s_sr
        h_off = (r64 // h_r) * h_sg + (r64 % h_r) * h_sr
        s = tl.load(s_ptr + s_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + h_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = x * rstd[:, None] * w[None, :] * (1.0 + s) + h
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _film_norm_bwd_kernel(g_ptr, x_ptr, w_ptr, s_ptr, rstd_ptr, dx_ptr, ds_ptr, dh_ptr, dw_ptr, N, D,
                              rows_per_program, s_sg, s_sr, s_r, ds_stride, dh_stride,
                              DMOD: tl.constexpr, DW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        begin = pid * rows_per_program
        end = tl.minimum(begin + rows_per_program, N)
        for start in range(begin, end, BLOCK_R):
            rows = start + tl.arange(0, BLOCK_R)
            row_ok = rows < end
            mask = row_ok[:, None] & col_ok[None, :]
            r64 = rows.to(tl.int64)
            offs = r64[:, None] * D + cols[None, :]
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            s_off = (r64 // s_r) * s_sg + (r64 % s_r) * s_sr
            gs = g * (1.0 + tl.load(s_ptr + s_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32))
            xhat = x * rstd[:, None]
            if DMOD:
                tl.store(ds_ptr + r64[:, None] * ds_stride + cols[None, :],
                         (g * xhat * w[None, :]).to(ds_ptr.dtype.element_ty), mask=mask)
                tl.store(dh_ptr + r64[:, None] * dh_stride + cols[None, :], g.to(dh_ptr.dtype.element_ty),
                         mask=mask)
            if DW:
                dw += tl.sum(gs * xhat, axis=0)
            gw = gs * w[None, :]
            mean = tl.sum(gw * xhat, axis=1) / D
            tl.store(dx_ptr + offs, (rstd[:, None] * (gw - xhat * mean[:, None])).to(dx_ptr.dtype.element_ty),
                     mask=mask)
        if DW:
            tl.store(dw_ptr + pid.to(tl.int64) * D + cols, dw, mask=col_ok)


def _num_warps(elements: int) -> int:
    """Warps for a program holding ``elements`` values per tile: 8 values per thread, 4 to 32 warps.

    From the compile lane (sm_80 / sm_90): the backward holds three tiles; 4096 values per tile fit at 16 warps
    (at most 128 registers, no spill); 8192 spill at 16 warps and still 8 bytes (bf16, sm_90) at 32."""
    return max(4, min(32, elements // 256))


def launch_config(rows: int, cols: int, interpreting: bool | None = None) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) of both kernels over [rows, cols]: whole rows per program (the row's
    mean needs all of it), about 4096 values per tile on a GPU, few large programs under the interpreter.
    ``interpreting``: None asks ``_backend``; False gives the GPU configuration (the compile lane asks for it)."""
    interpreting = _backend.triton_interpreting() if interpreting is None else interpreting
    if cols > MAX_TRITON_COLS and not interpreting:
        raise ValueError(f"film_norm: the triton kernels hold a whole row of {cols} channels per program; at most "
                         f"{MAX_TRITON_COLS} fit (use backend='reference' or 'cpu')")
    block_d = triton.next_power_of_2(cols)
    budget = 1 << 16 if interpreting else 1 << 12
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), budget // block_d))
    return block_r, block_d, _num_warps(block_r * block_d)


def _bwd_programs(rows: int, block_r: int, device: torch.device) -> int:
    """Programs of the backward (each reduces dw over its rows): a few waves of the GPU's SMs, 4 when
    interpreting."""
    blocks = triton.cdiv(rows, block_r)
    if device.type == "cuda":
        return max(1, min(blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(blocks, 4))


class _TritonFilm:
    """FilmOps as Triton kernels (fixed configs, no autotune). Every launch runs under the tensors' device."""

    def fwd(self, x, w, scale, shift, y, eps):
        rows, cols = x.shape
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        block_r, block_d, warps = launch_config(rows, cols)
        grid = _backend.check_grid("film_norm", (triton.cdiv(rows, block_r),))
        with _backend.device_guard(x):
            _film_norm_fwd_kernel[grid](x, w, scale, shift, y, rstd, rows, cols, *_mod_args(scale), *_mod_args(shift),
                                        eps, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
        return rstd

    def bwd(self, g, x, w, scale, rstd, dx, dscale, dshift, want_dw):
        rows, cols = x.shape
        block_r, block_d, warps = launch_config(rows, cols)
        programs = _bwd_programs(rows, block_r, x.device)
        per = triton.cdiv(triton.cdiv(rows, programs), block_r) * block_r  # whole blocks per program
        programs = triton.cdiv(rows, per)
        dmod = dscale is not None
        if dx is None:
            dx = torch.empty_like(x)
        dw = torch.empty(programs if want_dw else 1, cols, device=x.device, dtype=torch.float32)
        grid = _backend.check_grid("film_norm", (programs,))
        with _backend.device_guard(x):
            _film_norm_bwd_kernel[grid](g, x, w, scale, rstd, dx, dscale if dmod else dx, dshift if dmod else dx, dw,
                                        rows, cols, per, *_mod_args(scale),
                                        dscale.stride(0) if dmod else cols, dshift.stride(0) if dmod else cols,
                                        DMOD=dmod, DW=want_dw, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
        return dw.sum(dim=0) if want_dw else None


def _mod_args(m: torch.Tensor) -> tuple[int, int, int]:
    """(stride of a group, stride of a row in it, rows per group) of a [G, R, D] modulation view."""
    return m.stride(0), m.stride(1), m.shape[1]


def compile_specs(rows: int = 8192, widths: Sequence[int] = (576, 1152, MAX_TRITON_COLS),
                  dtypes: Sequence[tuple[str, str, str]] = (("bf16", "bf16", "bf16"), ("fp32", "bf16", "fp32"),
                                                            ("fp32", "fp32", "fp32"))) -> list[dict]:
    """The kernel variants ``_TritonFilm`` launches on a GPU for ``rows`` tokens of ``widths`` channels (the
    U-ViT3D's transformer levels 576 and 1152, the widest row allowed), as ahead-of-time compile specs for
    ``kernels._aot``.
    ``dtypes``: (x, modulation, output) storage: all bf16, the autocast mix (float32 residual stream, bf16
    FiLM), all float32."""
    specs = []
    for xt, mt, ot in dtypes:
        for cols in widths:
            block_r, block_d, warps = launch_config(rows, cols, interpreting=False)
            base = {"dtype": xt if xt == mt == ot else f"{xt}/{mt}", "size": f"{rows}x{cols}", "num_warps": warps}
            specs.append({**base, "kernel": "_film_norm_fwd_kernel",
                          "constexprs": {"BLOCK_R": block_r, "BLOCK_D": block_d},
                          "types": {"x_ptr": f"*{xt}", "w_ptr": "*fp32", "s_ptr": f"*{mt}", "h_ptr": f"*{mt}",
                                    "y_ptr": f"*{ot}", "rstd_ptr": "*fp32", "*": "*fp32"}})
            for flags in ({"DMOD": True, "DW": True}, {"DMOD": False, "DW": False}):
                specs.append({**base, "kernel": "_film_norm_bwd_kernel",
                              "constexprs": {**flags, "BLOCK_R": block_r, "BLOCK_D": block_d},
                              "types": {"g_ptr": f"*{ot}", "x_ptr": f"*{xt}", "w_ptr": "*fp32", "s_ptr": f"*{mt}",
                                        "rstd_ptr": "*fp32", "dx_ptr": f"*{xt}", "ds_ptr": f"*{mt}",
                                        "dh_ptr": f"*{mt}", "dw_ptr": "*fp32", "*": "*fp32"}})
    return specs


@functools.lru_cache(maxsize=None)
def film_ops(backend: str) -> FilmOps:
    """The row kernels of a concrete fused backend, ``'cpu'`` or ``'triton'``."""
    if backend == "cpu":
        return _CppFilm()
    if backend == "triton":
        if triton is None:
            raise RuntimeError("film_norm: backend 'triton' needs the triton package")
        return _TritonFilm()
    raise ValueError(f"film_norm: film_ops takes 'cpu' or 'triton', got {backend!r}")


# ----------------------------------------------------------------------------- shapes
def _rows_view(m: torch.Tensor, lead: torch.Size, cols: int) -> torch.Tensor | None:
    """``m`` broadcast to ``lead + (cols,)`` as a [G, R, cols] view (row r of x -> (r // R, r % R)), or None when
    no such view exists (then the caller materialises it)."""
    e = m.expand(*lead, cols)
    if e.stride(-1) != 1:
        return None
    for j in range(len(lead) + 1):
        try:
            return e.view(math.prod(lead[:j]), math.prod(lead[j:]), cols)
        except RuntimeError:  # the leading dims do not collapse at this split
            continue
    return None


def _split(scale: torch.Tensor, shift: torch.Tensor | None, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    if shift is None:
        if scale.shape[-1] != 2 * cols:
            raise ValueError(f"film_rms_norm: packed (scale | shift) must have 2 D = {2 * cols} channels, got "
                             f"{tuple(scale.shape)}")
        return scale[..., :cols], scale[..., cols:]
    return scale, shift


def _refuse(dtypes: Sequence[torch.dtype], backend: str) -> None:
    bad = [d for d in dtypes if d not in FUSED_DTYPES]
    if bad:
        raise TypeError(f"film_rms_norm: the fused {backend!r} backend takes float32 and bfloat16 tensors, got "
                        f"{bad[0]} (float16 would need its own range handling; float64 has the reference); use "
                        f"backend='reference'")


class _FusedFilmNorm(torch.autograd.Function):
    """(x, weight, scale, shift, eps, ops) -> y; ``shift`` None: ``scale`` is the packed (scale | shift)."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, eps, ops):
        cols = x.shape[-1]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, cols).contiguous()
        s, h = _split(scale, shift, cols)
        s3, h3 = _rows_view(s, lead, cols), _rows_view(h, lead, cols)
        if s3 is None:
            s3 = s.expand(*lead, cols).contiguous().view(1, -1, cols)
        if h3 is None:
            h3 = h.expand(*lead, cols).contiguous().view(1, -1, cols)
        w = torch.ones(cols, device=x.device) if weight is None else weight.float().contiguous()
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, s.dtype), h.dtype)  # eager: rms_norm keeps x's
        y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        rstd = ops.fwd(x2, w, s3, h3, y, eps)
        ctx.save_for_backward(x2, w, s3, rstd)
        ctx.ops, ctx.packed, ctx.has_weight = ops, shift is None, weight is not None
        ctx.shapes = (x.shape, scale.shape, None if shift is None else shift.shape)
        ctx.dtypes = (s.dtype, h.dtype, None if weight is None else weight.dtype)
        return y.view(x.shape[:-1] + (cols,))

    @staticmethod
    def backward(ctx, grad):
        x2, w, s3, rstd = ctx.saved_tensors
        x_shape, scale_shape, shift_shape = ctx.shapes
        s_dtype, h_dtype, w_dtype = ctx.dtypes
        n, cols = x2.shape
        lead = x_shape[:-1]
        need_x, need_w, need_s, need_h = ctx.needs_input_grad[:4]
        g = grad.reshape(n, cols).contiguous()
        dx = torch.empty_like(x2) if need_x else None
        # per-token modulation of one dtype: the kernel writes its gradient (one [N, 2D] buffer when packed)
        need_mod = need_s or need_h
        per_row = (tuple(scale_shape[:-1]) == tuple(lead) and (ctx.packed or tuple(shift_shape[:-1]) == tuple(lead))
                   and s_dtype == h_dtype == s3.dtype)
        dscale = dshift = packed = None
        if need_mod and per_row:
            if ctx.packed:
                packed = torch.empty(n, 2 * cols, dtype=s_dtype, device=x2.device)
                dscale, dshift = packed[:, :cols], packed[:, cols:]
            else:
                dscale = torch.empty(n, cols, dtype=s_dtype, device=x2.device)
                dshift = torch.empty(n, cols, dtype=h_dtype, device=x2.device)
        dw = ctx.ops.bwd(g, x2, w, s3, rstd, dx, dscale, dshift, need_w and ctx.has_weight)
        if need_mod and not per_row:   # broadcast modulation: reduce the per-row gradients in float32
            gf = g.float()
            d_s = (gf * (x2.float() * rstd[:, None]) * w).view(*lead, cols)
            d_h = gf.view(*lead, cols)
            if ctx.packed:
                half = scale_shape[:-1] + (cols,)
                packed = torch.cat([d_s.sum_to_size(half), d_h.sum_to_size(half)], dim=-1).to(s_dtype)
            else:
                dscale = d_s.sum_to_size(scale_shape).to(s_dtype)
                dshift = d_h.sum_to_size(shift_shape).to(h_dtype)
        grad_x = dx.view(x_shape) if need_x else None
        grad_w = dw.to(w_dtype) if dw is not None else None
        if ctx.packed:
            grad_s = packed.view(scale_shape) if need_mod else None
            grad_h = None
        else:
            grad_s = dscale.view(scale_shape) if need_s else None
            grad_h = dshift.view(shift_shape) if need_h else None
        return grad_x, grad_w, grad_s, grad_h, None, None


def resolve(backend: str, *tensors: torch.Tensor | None) -> str:
    """The concrete backend of a call: ``auto`` takes the reference for float64 (the fused paths are float32 /
    bfloat16) and for CUDA rows wider than ``MAX_TRITON_COLS``; a forced fused backend refuses other dtypes
    (float16 included, as ``kernels.align`` does). ``tensors[0]`` is x."""
    dtypes = [t.dtype for t in tensors if t is not None]
    device = tensors[0].device
    if _backend.check_backend(backend) == "auto" and any(d == torch.float64 for d in dtypes):
        return _backend.resolve("film_norm", "reference", device)
    if backend == "auto" and device.type == "cuda" and tensors[0].shape[-1] > MAX_TRITON_COLS:
        return _backend.resolve("film_norm", "reference", device)   # wider than a Triton program holds
    chosen = _backend.resolve("film_norm", backend, device)
    if chosen != "reference":
        _refuse(dtypes, chosen)
    return chosen


def film_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor,
                  shift: torch.Tensor | None = None, *, eps: float = EPS, backend: str = "auto") -> torch.Tensor:
    """``rmsnorm(x) * weight * (1 + scale) + shift`` over the last dim (module docstring); ``shift=None``: ``scale``
    is the packed ``[..., 2D]`` (scale | shift)."""
    cols = x.shape[-1]
    if weight is not None and weight.shape != (cols,):
        raise ValueError(f"film_rms_norm: weight must be [{cols}], got {tuple(weight.shape)}")
    s, h = _split(scale, shift, cols)
    for name, m in (("scale", s), ("shift", h)):
        if m.shape[-1] != cols or m.dim() > x.dim() or any(
                a not in (1, b) for a, b in zip(m.shape[-x.dim():][::-1], x.shape[::-1])):
            raise ValueError(f"film_rms_norm: {name} {tuple(m.shape)} does not broadcast to x {tuple(x.shape)}")
    if x.device.type == "meta" and backend == "auto" and x.dtype != torch.float64:
        return _FusedFilmNorm.apply(x, weight, scale, shift, eps, _MetaFilm())
    chosen = resolve(backend, x, weight, s, h)
    if chosen == "reference" or x.numel() == 0:
        return film_rms_norm_reference(x, weight, scale, shift, eps)
    if shift is not None and s.dtype != h.dtype:
        common = torch.promote_types(s.dtype, h.dtype)
        scale, shift = scale.to(common), shift.to(common)
    return _FusedFilmNorm.apply(x, weight, scale, shift, eps, film_ops(chosen))
