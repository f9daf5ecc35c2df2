"""Geometry Forcing alignment: projector MLP + angular and scale losses, fused over token chunks.

Shapes: ``x`` [N, in_dim] (DiT features, one row per token), ``target`` [N, target_dim] (frozen
teacher features; never receives a gradient). With p = projector(x) and norms over channels,

    p_hat = p / max(|p|, 1e-6),  y_hat = y / max(|y|, 1e-6)
    angular = mean_tokens(1 - <p_hat, y_hat>)
    scale   = mean_tokens,channels((scale_head(p_hat) - y)^2)

Backends (``kernels._backend.resolve("align", ...)``): ``reference`` (plain autograd, the oracle),
``triton`` (Triton loss-tail kernels; CUDA, or CPU tensors under TRITON_INTERPRET=1), ``cpu`` (the
same tail as C++/OpenMP row kernels from ``csrc/align_tail.cpp``, built once by
torch.utils.cpp_extension), ``auto`` (triton on CUDA, cpu on CPU).

The fused paths (triton, cpu) never hold a [N, target_dim] or [N, hidden] tensor. They walk the
tokens in chunks (Liger's fused-linear-loss pattern, extended through the whole projector and scale
head): per chunk, the matmuls run in torch (cuBLAS / the CPU BLAS), the row-wise tail (normalisation,
cosine, squared error and their gradients) runs in the backend's kernels, and the chunk's gradients
are computed at once - grad_x rows are written and the weight gradients accumulated in float32 -
so nothing is kept for backward except those gradients. A chunk keeps only the pre-activations of
the SiLUs and recomputes the activations in its backward; its buffers are six [chunk, width] views of
one workspace allocated once per pass and reused by every chunk (``_Workspace``). bf16 / fp16 inputs:
matmuls in the input dtype, the tail in float32, weight gradients accumulated in float32.

``loss_tail`` is the tail alone (p and the scale-head output s given as independent inputs), one pass
over the rows per backend; ``tail_losses_reference`` is its autograd oracle.

Two losses, one gradient: the module returns ``angular`` and ``scale`` separately, but a gradient
computed during forward can only be of one combination of them. The fused paths compute the
gradient of ``loss_weights[0] * angular + loss_weights[1] * scale`` (pass the weights your
objective uses; only their ratio matters). If backward then receives grad_outputs in that ratio,
it only rescales the stored gradients. Any other combination (e.g. backward of ``angular`` alone)
is still exact: backward runs the chunked pass again with the received weights, at the cost of one
more pass. Storing per-loss gradients instead would double the projector's backward matmuls and
the stored weight gradients, so it would miss both the time and the memory budget.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Protocol, Sequence

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from geoforge.kernels import _backend, _cpp

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without triton use the cpu / reference paths
    triton = None

EPS = 1e-6
CSRC = _cpp.CSRC / "align_tail.cpp"
DEFAULT_CHUNK = {"cpu": 384, "cuda": 2048}  # tokens per chunk (CPU: measured with profiling/bench_align.py)


def alignment_losses_reference(x: torch.Tensor, target: torch.Tensor, projector: nn.Module,
                               scale_head: nn.Module) -> dict[str, torch.Tensor]:
    """Plain-autograd angular and scale losses (0-dim) of ``x`` [N, in] against ``target`` [N, C]."""
    p = projector(x)
    p_hat = p / p.norm(dim=-1, keepdim=True).clamp_min(EPS)
    y = target.detach()
    y_hat = y / y.norm(dim=-1, keepdim=True).clamp_min(EPS)
    angular = (1 - (p_hat * y_hat).sum(dim=-1)).mean()
    scale = (scale_head(p_hat) - y).square().mean()
    return {"angular": angular, "scale": scale}


def tail_losses_reference(p: torch.Tensor, s: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss tail alone in plain autograd: (angular, scale) of projections ``p`` and a scale-head output ``s``
    taken as independent inputs (all [N, T]); ``target`` gets no gradient."""
    p_hat = p / p.norm(dim=-1, keepdim=True).clamp_min(EPS)
    y = target.detach()
    y_hat = y / y.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return (1 - (p_hat * y_hat).sum(dim=-1)).mean(), (s - y).square().mean()


# ----------------------------------------------------------------------------- tail kernels
class TailOps(Protocol):
    """The row-wise loss tail on contiguous [R, T] rows (float32 arithmetic; ``out`` may alias)."""

    def norm_fwd(self, p: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = p / max(|p|, eps); returns float32 [R, 3] stats (|p|, max(|y|, eps), cos(p, y))."""

    def scale_err(self, s: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None, coef: float) -> torch.Tensor:
        """Returns float32 [R] row sums of (s - y)^2; writes out = coef * (s - y) when out is given."""

    def norm_bwd(self, g: torch.Tensor | None, p_hat: torch.Tensor, y: torch.Tensor, stats: torch.Tensor,
                 ang_coef: float, out: torch.Tensor) -> None:
        """out = d loss / d p, where d loss / d p_hat = g - ang_coef * y_hat (g None: zero)."""

    def tail(self, p: torch.Tensor, s: torch.Tensor, y: torch.Tensor, grad_p: torch.Tensor | None,
             grad_s: torch.Tensor | None, ang_coef: float, scale_coef: float) -> torch.Tensor:
        """The whole tail in one pass: float32 [R, 2] rows (cos(p, y), sum (s - y)^2); writes
        grad_p = ang_coef * d(1 - cos)/dp and grad_s = scale_coef * (s - y) when given."""


class _CppTail:
    """TailOps from the C++/OpenMP extension (csrc/align_tail.cpp)."""

    def __init__(self) -> None:
        self.ext = _load_cpp_extension()

    def norm_fwd(self, p, y, out):
        return self.ext.norm_fwd(p, y, out, EPS)

    def scale_err(self, s, y, out, coef):
        return self.ext.scale_err(s, y, out, coef)

    def norm_bwd(self, g, p_hat, y, stats, ang_coef, out):
        self.ext.norm_bwd(g, p_hat, y, stats, ang_coef, EPS, out)

    def tail(self, p, s, y, grad_p, grad_s, ang_coef, scale_coef):
        return self.ext.tail(p, s, y, grad_p, grad_s, ang_coef, scale_coef, EPS)


def _load_cpp_extension():
    return _cpp.load_extension("align", "geoforge_align_tail", CSRC.name)


if triton is not None:
    @triton.jit
    def _norm_fwd_kernel(p_ptr, y_ptr, out_ptr, stats_ptr, R, T, eps,
                         BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_T)
        row_ok = rows < R
        mask = row_ok[:, None] & (cols[None, :] < T)
        offs = rows[:, None].to(tl.int64) * T + cols[None, :]  # int64: N * T may pass 2**31
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        norm_p = tl.sqrt(tl.sum(p * p, axis=1))
        rp = tl.maximum(norm_p, eps)
        ry = tl.maximum(tl.sqrt(tl.sum(y * y, axis=1)), eps)
        cos = tl.sum(p * y, axis=1) / (rp * ry)
        tl.store(out_ptr + offs, (p / rp[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(stats_ptr + rows * 3, norm_p, mask=row_ok)
        tl.store(stats_ptr + rows * 3 + 1, ry, mask=row_ok)
        tl.store(stats_ptr + rows * 3 + 2, cos, mask=row_ok)

    @triton.jit
    def _scale_err_kernel(s_ptr, y_ptr, out_ptr, sq_ptr, R, T, coef,
                          WRITE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_T)
        mask = (rows[:, None] < R) & (cols[None, :] < T)
        offs = rows[:, None].to(tl.int64) * T + cols[None, :]  # int64: N * T may pass 2**31
        e = (tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
             - tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        tl.store(sq_ptr + rows, tl.sum(e * e, axis=1), mask=rows < R)
        if WRITE:
            tl.store(out_ptr + offs, (coef * e).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_bwd_kernel(g_ptr, h_ptr, y_ptr, stats_ptr, out_ptr, R, T, ang_coef, eps,
                         HAS_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_T)
        row_ok = rows < R
        mask = row_ok[:, None] & (cols[None, :] < T)
        offs = rows[:, None].to(tl.int64) * T + cols[None, :]  # int64: N * T may pass 2**31
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        norm_p = tl.load(stats_ptr + rows * 3, mask=row_ok, other=1.0)
        k = ang_coef / tl.load(stats_ptr + rows * 3 + 1, mask=row_ok, other=1.0)
        d = -k[:, None] * y  # d loss / d p_hat
        if HAS_G:
            d += tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        clamped = norm_p < eps  # clamp_min passes the gradient where |p| >= eps
        proj = tl.where(clamped, 0.0, tl.sum(h * d, axis=1))
        inv = 1.0 / tl.where(clamped, eps, norm_p)
        tl.store(out_ptr + offs, ((d - proj[:, None] * h) * inv[:, None]).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _tail_kernel(p_ptr, s_ptr, y_ptr, gp_ptr, gs_ptr, stats_ptr, R, T, ang_coef, scale_coef, eps,
                     GRAD_P: tl.constexpr, GRAD_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_T)
        row_ok = rows < R
        mask = row_ok[:, None] & (cols[None, :] < T)
        offs = rows[:, None].to(tl.int64) * T + cols[None, :]  # int64: N * T may pass 2**31
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) - y
        norm_p = tl.sqrt(tl.sum(p * p, axis=1))
        rp = tl.maximum(norm_p, eps)
        ry = tl.maximum(tl.sqrt(tl.sum(y * y, axis=1)), eps)
        py = tl.sum(p * y, axis=1)
        tl.store(stats_ptr + rows * 2, py / (rp * ry), mask=row_ok)
        tl.store(stats_ptr + rows * 2 + 1, tl.sum(e * e, axis=1), mask=row_ok)
        if GRAD_P:
            k = ang_coef / ry
            clamped = norm_p < eps
            a = -k / tl.where(clamped, eps, norm_p)
            b = tl.where(clamped, 0.0, k * (py / (rp * rp)) / tl.where(clamped, 1.0, norm_p))
            tl.store(gp_ptr + offs, (a[:, None] * y + b[:, None] * p).to(gp_ptr.dtype.element_ty), mask=mask)
        if GRAD_S:
            tl.store(gs_ptr + offs, (scale_coef * e).to(gs_ptr.dtype.element_ty), mask=mask)


MAX_TRITON_COLS = 16384  # widest row a program holds in registers without spilling (sm_80 / sm_90, 32 warps);
# the one-pass tail (``loss_tail``, three live tiles) half of it


def _num_warps(elements: int) -> int:
    """Warps for a program holding ``elements`` values per tile: 16 values per thread, 8 to 32 warps.

    From the compiled kernels (tests/kernels/test_compile_targets.py, sm_90, bf16): ``_norm_bwd`` with 4096
    values per program needs 142 registers at 4 warps, 75 at 8; 16384 values spill at 8 and 16 warps and
    fit at 32 (64 registers)."""
    return max(8, min(32, elements // 512))


def launch_config(rows: int, cols: int, tiles: int = 2, interpreting: bool | None = None) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_T, num_warps) of a tail kernel over [rows, cols]: whole rows per program (the in-place
    kernels rely on it: BLOCK_T >= cols), few large programs under the interpreter. ``tiles``: [BLOCK_R,
    BLOCK_T] tiles live at once (3 for the one-pass tail, which then takes half the rows). ``interpreting``:
    None asks ``_backend``; False gives the GPU configuration (the compile lane asks for it)."""
    interpreting = _backend.triton_interpreting() if interpreting is None else interpreting
    widest = MAX_TRITON_COLS if tiles <= 2 else MAX_TRITON_COLS // 2  # three live tiles: half the width
    if cols > widest and not interpreting:
        raise ValueError(f"align: the triton tail holds a whole row of {cols} channels per program; at most "
                         f"{widest} fit without register spills{' in the one-pass tail' if tiles > 2 else ''} "
                         f"(use backend='reference')")
    block_t = triton.next_power_of_2(cols)
    budget = 1 << 16 if interpreting else 1 << 12  # elements per program
    block_r = max(1, min(triton.next_power_of_2(rows), budget // block_t))
    if tiles > 2:
        block_r = max(1, block_r // 2)
    return block_r, block_t, _num_warps(block_r * block_t)


def _check_tile(op: str, block_t: int, cols: int) -> None:
    """The kernels read a row completely before writing it (outputs may alias inputs): one program per row."""
    if block_t < cols:
        raise ValueError(f"align {op}: BLOCK_T={block_t} < T={cols}; a program must hold whole rows (the "
                         f"in-place tail would read values another program already overwrote)")


class _TritonTail:
    """TailOps as Triton kernels (fixed block configs: no autotune, which the interpreter cannot run).

    Every launch runs under the tensors' CUDA device (``_backend.device_guard``)."""

    config = staticmethod(launch_config)

    def norm_fwd(self, p, y, out):
        rows, cols = p.shape
        stats = torch.empty(rows, 3, device=p.device, dtype=torch.float32)
        block_r, block_t, warps = self.config(rows, cols)
        _check_tile("norm_fwd", block_t, cols)
        with _backend.device_guard(p):
            _norm_fwd_kernel[(triton.cdiv(rows, block_r),)](p, y, out, stats, rows, cols, EPS,
                                                            BLOCK_R=block_r, BLOCK_T=block_t, num_warps=warps)
        return stats

    def scale_err(self, s, y, out, coef):
        rows, cols = s.shape
        sq = torch.empty(rows, device=s.device, dtype=torch.float32)
        block_r, block_t, warps = self.config(rows, cols)
        _check_tile("scale_err", block_t, cols)
        with _backend.device_guard(s):
            _scale_err_kernel[(triton.cdiv(rows, block_r),)](s, y, s if out is None else out, sq, rows, cols, coef,
                                                             WRITE=out is not None, BLOCK_R=block_r, BLOCK_T=block_t,
                                                             num_warps=warps)
        return sq

    def norm_bwd(self, g, p_hat, y, stats, ang_coef, out):
        rows, cols = p_hat.shape
        block_r, block_t, warps = self.config(rows, cols)
        _check_tile("norm_bwd", block_t, cols)
        with _backend.device_guard(p_hat):
            _norm_bwd_kernel[(triton.cdiv(rows, block_r),)](p_hat if g is None else g, p_hat, y, stats, out, rows,
                                                            cols, ang_coef, EPS, HAS_G=g is not None,
                                                            BLOCK_R=block_r, BLOCK_T=block_t, num_warps=warps)

    def tail(self, p, s, y, grad_p, grad_s, ang_coef, scale_coef):
        rows, cols = p.shape
        stats = torch.empty(rows, 2, device=p.device, dtype=torch.float32)
        block_r, block_t, warps = self.config(rows, cols, tiles=3)  # three row tiles live per program
        _check_tile("tail", block_t, cols)
        with _backend.device_guard(p):
            _tail_kernel[(triton.cdiv(rows, block_r),)](p, s, y, p if grad_p is None else grad_p,
                                                        s if grad_s is None else grad_s, stats, rows, cols, ang_coef,
                                                        scale_coef, EPS, GRAD_P=grad_p is not None,
                                                        GRAD_S=grad_s is not None, BLOCK_R=block_r, BLOCK_T=block_t,
                                                        num_warps=warps)
        return stats


def compile_specs(rows: int = DEFAULT_CHUNK["cuda"], widths: Sequence[int] = (1024, 2048, MAX_TRITON_COLS),
                  dtypes: Sequence[str] = ("bf16", "fp32")) -> list[dict]:
    """The kernel variants ``_TritonTail`` launches on a GPU for chunks of ``rows`` tokens of ``widths``
    channels (DINOv2-L 1024, VGGT 2048, the cap), as ahead-of-time compile specs for ``kernels._aot``:
    kernel name, argument types, constexprs and num_warps, from the same ``launch_config`` the wrappers use."""
    specs = []
    for dt in dtypes:
        for cols in widths:
            for kernel, tiles, variants in (("_norm_fwd_kernel", 2, [{}]),
                                            ("_scale_err_kernel", 2, [{"WRITE": True}, {"WRITE": False}]),
                                            ("_norm_bwd_kernel", 2, [{"HAS_G": True}, {"HAS_G": False}]),
                                            ("_tail_kernel", 3, [{"GRAD_P": True, "GRAD_S": True},
                                                                 {"GRAD_P": False, "GRAD_S": False}])):
                width = min(cols, MAX_TRITON_COLS // 2) if tiles > 2 else cols  # the widest loss_tail takes
                block_r, block_t, warps = launch_config(rows, width, tiles, interpreting=False)
                for flags in variants:
                    specs.append({"kernel": kernel, "dtype": dt, "size": f"{rows}x{width}", "num_warps": warps,
                                  "constexprs": {**flags, "BLOCK_R": block_r, "BLOCK_T": block_t},
                                  "types": {"stats_ptr": "*fp32", "sq_ptr": "*fp32", "*": f"*{dt}"}})
    return specs


@functools.lru_cache(maxsize=None)
def tail_ops(backend: str) -> TailOps:
    """The loss-tail kernels of a concrete fused backend, ``'cpu'`` or ``'triton'``."""
    if backend == "cpu":
        return _CppTail()
    if backend == "triton":
        if triton is None:
            raise RuntimeError("align: backend 'triton' needs the triton package")
        return _TritonTail()
    raise ValueError(f"align: tail_ops takes 'cpu' or 'triton', got {backend!r}")


def loss_tail(p: torch.Tensor, s: torch.Tensor, target: torch.Tensor, backend: str = "auto", grad: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The loss tail alone: (angular, scale, d(angular)/dp, d(scale)/ds) for projections ``p`` and a scale-head
    output ``s`` taken as independent inputs, all [N, T] (``target`` gets no gradient). The fused backends
    read each row once and write both gradients in the same pass. Losses are 0-dim in ``p``'s dtype (float32
    accumulation); the gradients (None without ``grad``) have the dtype of ``p``."""
    if p.dim() != 2 or p.shape != s.shape or p.shape != target.shape:
        raise ValueError(f"loss_tail: p, s and target must be [N, T] of one shape, got {tuple(p.shape)}, "
                         f"{tuple(s.shape)}, {tuple(target.shape)}")
    if p.shape[0] == 0:
        raise ValueError("loss_tail: no tokens (N = 0)")
    chosen = _backend.resolve("align_tail", backend, p.device)
    n, t = p.shape
    if chosen != "reference":
        _refuse_fp16("loss_tail", p.dtype, chosen)
    if chosen == "reference":
        if not grad:
            with torch.no_grad():
                angular, scale = tail_losses_reference(p, s, target)
            return angular, scale, None, None
        p_, s_ = p.detach().requires_grad_(True), s.detach().requires_grad_(True)
        with torch.enable_grad():
            angular, scale = tail_losses_reference(p_, s_, target)
            grad_p, = torch.autograd.grad(angular, p_)
            grad_s, = torch.autograd.grad(scale, s_)
        return angular.detach(), scale.detach(), grad_p, grad_s
    ops = tail_ops(chosen)
    p, s = p.detach().contiguous(), s.detach().contiguous()
    y = target.detach().to(p.dtype).contiguous()
    s = s.to(p.dtype)
    grad_p = torch.empty_like(p) if grad else None
    grad_s = torch.empty_like(s) if grad else None
    stats = ops.tail(p, s, y, grad_p, grad_s, 1.0 / n, 2.0 / (n * t))
    sums = stats.sum(dim=0, dtype=torch.float64)
    return (1 - sums[0] / n).to(p.dtype), (sums[1] / (n * t)).to(p.dtype), grad_p, grad_s


def _refuse_fp16(op: str, dtype: torch.dtype, backend: str) -> None:
    """The fused paths write gradients scaled by 1/N (angular) and 2/(N*T) (scale) in the input dtype; at
    realistic N*T (~1e7) that coefficient times a unit error is below fp16's smallest subnormal (6e-8), so
    fp16 gradients would flush to zero. bf16 has float32's exponent range and is fine."""
    if dtype == torch.float16:
        raise TypeError(f"{op}: float16 is not supported on the fused {backend!r} backend (its scaled gradients "
                        f"underflow in fp16); use bfloat16 or float32, or backend='reference'")


# ----------------------------------------------------------------------------- chunked pass
class _Workspace:
    """The chunk buffers of one pass, allocated once and reused by every chunk (views into one flat tensor).

    Fresh multi-MiB allocations are not free on a CPU: each is mmapped and page-faulted anew (about a
    millisecond per MiB on a VM), so allocating a chunk's buffers per chunk would cost more than its
    element-wise work. Layout, widths h (hidden), t (target), s (scale hidden), chunk c:
    ``a1``, ``a2`` [c, h] (pre-activations, kept for the SiLU backward), ``p`` [c, t] (p, then p_hat,
    then d/dp) and a shared region used first by ``h`` [c, h] (h1, then h2, until p exists), then by
    the scale head's ``s1``, ``g1`` [c, s] and ``s`` [c, t] (later d/ds, d/ds1, d/dp_hat), then by
    the recomputed ``h2`` [c, h] (later d/da2). h1 is recomputed into ``a2`` once a2 is consumed.
    ``up``: float32 room for the two operands of a weight-gradient product (``upcast``; CPU with low-precision
    inputs only, ``up_numel`` elements).
    """

    def __init__(self, chunk: int, hid: int, t: int, shid: int, up_numel: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.chunk, self.hid, self.t, self.shid = chunk, hid, t, shid
        shared = max(chunk * hid, 2 * chunk * shid + chunk * t)
        self.flat = torch.empty(2 * chunk * hid + chunk * t + shared, dtype=dtype, device=device)
        self.up = torch.empty(up_numel, dtype=torch.float32, device=device) if up_numel else None

    def _view(self, offset: int, rows: int, cols: int) -> torch.Tensor:
        return self.flat[offset:offset + rows * cols].view(rows, cols)

    def views(self, rows: int) -> dict[str, torch.Tensor]:
        c, h, t, sh = self.chunk, self.hid, self.t, self.shid
        shared = 2 * c * h + c * t
        return {"a1": self._view(0, rows, h), "a2": self._view(c * h, rows, h), "p": self._view(2 * c * h, rows, t),
                "h": self._view(shared, rows, h), "s1": self._view(shared, rows, sh),
                "g1": self._view(shared + c * sh, rows, sh), "s": self._view(shared + 2 * c * sh, rows, t)}

    def upcast(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 copies of ``a`` and ``b`` in the workspace (a may be a transposed view: it is copied as its
        contiguous transpose and handed back transposed)."""
        na = a.numel()
        if self.up is None or self.up.numel() < na + b.numel():
            self.up = torch.empty(na + b.numel(), dtype=torch.float32, device=a.device)
        at = a.t()
        a32 = self.up[:na].view(at.shape).copy_(at).t()
        b32 = self.up[na:na + b.numel()].view(b.shape).copy_(b)
        return a32, b32


def _accumulate(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, ws: _Workspace) -> None:
    """acc += a @ b, the product accumulated in acc's precision (float32 for bf16 operands).

    CUDA: one cuBLAS GEMM with bf16 operands and the float32 accumulator as C (``addmm`` with
    ``out_dtype``), no bf16 temporary. Elsewhere (the CPU has no mixed-dtype GEMM): the chunk's operands are
    up-cast into the workspace and multiplied in float32. Never through a bf16 [out, in] product, which
    would round every chunk's contribution to 8 bits before the sum (and cost a read + write of it).
    """
    if acc is None:
        return
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _MIXED_GEMM["ok"]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError) as err:  # a torch without the mixed-dtype cuBLAS path
            _MIXED_GEMM["ok"] = False
            logging.getLogger("geoforge.kernels").warning(
                "align: addmm with out_dtype=float32 failed (%s); weight gradients use float32 copies of the "
                "chunk operands instead", err)
    a32, b32 = ws.upcast(a, b)
    acc.addmm_(a32, b32)


_MIXED_GEMM = {"ok": True}


def _accumulate_bias(acc: torch.Tensor | None, grad: torch.Tensor) -> None:
    if acc is not None:
        acc.add_(grad.sum(dim=0, dtype=acc.dtype))


def _silu_backward_(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """grad *= silu'(pre), in place."""
    return torch.ops.aten.silu_backward.grad_input(grad, pre, grad_input=grad)


def _silu_into(pre: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.silu.out(pre, out=out)


def _fused_pass(x: torch.Tensor, y: torch.Tensor, params: Sequence[torch.Tensor], ops: TailOps, w_ang: float,
                w_scale: float, chunk: int, need: Sequence[bool]
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Losses and, per chunk, the gradient of ``w_ang * angular + w_scale * scale``.

    ``params``: W1, b1, W2, b2, W3, b3 (projector), V1, c1, V2, c2 (scale head). ``need``: 11 flags,
    for x then each parameter; all False runs the forward only. Returns float64 0-dim (angular, scale)
    and [grad_x, *param_grads] (None where not needed; weight gradients in float32 for low precision).
    """
    w1, b1, w2, b2, w3, b3, v1, c1, v2, c2 = params
    n, t = y.shape
    hid, shid = w1.shape[0], v1.shape[0]
    chunk = min(chunk, n)
    train = any(need)
    acc_dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    accs = [torch.zeros(p.shape, dtype=acc_dtype, device=x.device) if want else None
            for p, want in zip(params, need[1:])]
    grad_x = torch.empty_like(x) if need[0] else None
    widest = max(hid, t, shid, x.shape[1])
    up_numel = 2 * chunk * widest if train and acc_dtype != x.dtype and not x.is_cuda else 0
    ws = _Workspace(chunk, hid, t, shid, up_numel, x.dtype, x.device)
    into_l1 = need[0] or need[1] or need[2]  # how far back the chain has to run
    into_l2 = into_l1 or need[3] or need[4]
    into_p = into_l2 or need[5] or need[6]
    scale_back = train and w_scale != 0.0
    cos_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    sq_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    for lo in range(0, n, chunk):
        xc, yc = x[lo:lo + chunk], y[lo:lo + chunk]
        v = ws.views(xc.shape[0])
        a1, a2, p, h = v["a1"], v["a2"], v["p"], v["h"]
        torch.addmm(b1, xc, w1.t(), out=a1)
        _silu_into(a1, h)
        torch.addmm(b2, h, w2.t(), out=a2)
        _silu_into(a2, h)
        torch.addmm(b3, h, w3.t(), out=p)  # h is dead from here on (its region holds the scale head)
        stats = ops.norm_fwd(p, yc, p)  # p is p_hat from here on
        s1, g1, s = v["s1"], v["g1"], v["s"]
        torch.addmm(c1, p, v1.t(), out=s1)
        _silu_into(s1, g1)
        torch.addmm(c2, g1, v2.t(), out=s)
        sq = ops.scale_err(s, yc, s if scale_back else None, 2.0 * w_scale / (n * t))  # s becomes d/ds
        cos_sum += stats[:, 2].sum(dtype=torch.float64)
        sq_sum += sq.sum(dtype=torch.float64)
        if not train:
            continue
        g = None
        if scale_back:
            _accumulate(accs[8], s.t(), g1, ws)
            _accumulate_bias(accs[9], s)
            if into_p or need[7] or need[8]:
                _silu_backward_(torch.mm(s, v2, out=g1), s1)  # g1 becomes d/ds1
                _accumulate(accs[6], g1.t(), p, ws)
                _accumulate_bias(accs[7], g1)
                if into_p:
                    g = torch.mm(g1, v1, out=s)  # d scale-part / d p_hat
        if not into_p:
            continue
        ops.norm_bwd(g, p, yc, stats, w_ang / n, p)  # p becomes d/dp; the shared region is free again
        h2 = _silu_into(a2, h)
        _accumulate(accs[4], p.t(), h2, ws)
        _accumulate_bias(accs[5], p)
        if not into_l2:
            continue
        _silu_backward_(torch.mm(p, w3, out=h2), a2)  # h2 becomes d/da2; a2 is dead
        h1 = _silu_into(a1, a2)
        _accumulate(accs[2], h2.t(), h1, ws)
        _accumulate_bias(accs[3], h2)
        if not into_l1:
            continue
        _silu_backward_(torch.mm(h2, w2, out=h1), a1)  # h1 becomes d/da1
        _accumulate(accs[0], h1.t(), xc, ws)
        _accumulate_bias(accs[1], h1)
        if grad_x is not None:
            torch.mm(h1, w1, out=grad_x[lo:lo + chunk])
    return 1 - cos_sum / n, sq_sum / (n * t), [grad_x, *accs]


def _common_factor(g_ang: torch.Tensor, g_scale: torch.Tensor, weights: tuple[float, float]) -> float | None:
    """c with (g_ang, g_scale) == c * weights, or None when the ratio differs.

    "Equal" is to 1e-6 relative, or to the rounding of the grad_outputs' dtype when that is coarser: a bf16
    loss scaled by 0.05 receives bf16(0.05), which is 0.05 only to 2**-9, and rerunning the whole pass for
    that difference would buy nothing that bf16 gradients can hold.
    """
    ga, gs = float(g_ang), float(g_scale)
    wa, ws = weights
    c = ga / wa if wa != 0.0 else gs / ws
    tol = max(1e-6, torch.finfo(g_ang.dtype).eps)
    ok = all(math.isclose(g, c * w, rel_tol=tol, abs_tol=0.0) for g, w in ((ga, wa), (gs, ws)))
    return c if ok else None


class _FusedAlignment(torch.autograd.Function):
    """Inputs (x, y, ops, loss_weights, chunk, out_dtype, *params) -> (angular, scale) in ``out_dtype``; gradients
    made in forward."""

    @staticmethod
    def forward(ctx, x, y, ops, weights, chunk, out_dtype, *params):
        need = (ctx.needs_input_grad[0], *ctx.needs_input_grad[6:])
        angular, scale, grads = _fused_pass(x, y, params, ops, *weights, chunk, need)
        ctx.save_for_backward(x, y, *params)
        ctx.ops, ctx.weights, ctx.chunk, ctx.need, ctx.grads = ops, weights, chunk, need, grads
        return angular.to(out_dtype), scale.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ang, g_scale):
        x, y, *params = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None  # hand the buffers over (autograd can then adopt them as .grad)
        factor = _common_factor(g_ang, g_scale, ctx.weights)
        if grads is None or factor is None:  # another combination of the losses, or a second backward
            _, _, grads = _fused_pass(x, y, params, ctx.ops, float(g_ang), float(g_scale), ctx.chunk, ctx.need)
        elif factor != 1.0:
            for g in grads:
                if g is not None:
                    g.mul_(factor)
        grads = [None if g is None else g.to(ref.dtype) for g, ref in zip(grads, (x, *params))]
        return grads[0], None, None, None, None, None, *grads[1:]


# ----------------------------------------------------------------------------- module
class GeometryAlignment(nn.Module):
    """Projector MLP + scale head with the angular and scale alignment losses.

    ``projector``: Linear(in, hidden) SiLU Linear(hidden, hidden) SiLU Linear(hidden, target);
    ``scale_head``: Linear(target, scale_hidden) SiLU Linear(scale_hidden, target).
    ``loss_weights``: (w_ang, w_scale) with which the caller sums the two losses before backward; the
    fused backends precompute that sum's gradient (see the module docstring; any other combination is
    exact too, at one extra pass). ``chunk_size``: tokens per chunk of the fused backends (default
    per device, ``DEFAULT_CHUNK``).
    """

    def __init__(self, in_dim: int, hidden_dim: int, target_dim: int, scale_hidden_dim: int, backend: str = "auto",
                 *, loss_weights: tuple[float, float] = (1.0, 1.0), chunk_size: int | None = None) -> None:
        super().__init__()
        self.backend = _backend.check_backend(backend)
        if len(loss_weights) != 2 or not all(math.isfinite(w) for w in loss_weights) or not any(loss_weights):
            raise ValueError(f"GeometryAlignment: loss_weights must be two finite numbers, not both zero; "
                             f"got {loss_weights!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"GeometryAlignment: chunk_size must be >= 1, got {chunk_size}")
        self.loss_weights = (float(loss_weights[0]), float(loss_weights[1]))
        self.chunk_size = chunk_size
        self.projector = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim),
                                       nn.SiLU(), nn.Linear(hidden_dim, target_dim))
        self.scale_head = nn.Sequential(nn.Linear(target_dim, scale_hidden_dim), nn.SiLU(),
                                        nn.Linear(scale_hidden_dim, target_dim))

    def _params(self) -> list[torch.Tensor]:
        return [t for layer in (*self.projector[::2], *self.scale_head[::2]) for t in (layer.weight, layer.bias)]

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"angular", "scale"}: 0-dim losses in ``x``'s dtype; ``target`` is cast to it and detached.

        Under autocast (bf16 mixed precision) the fused paths take x, the target and the parameters in the
        autocast dtype - the matmuls run in bf16, the tail and the weight gradients' accumulation in float32, the
        gradients flow back to the float32 parameters through the casts - and return float32 losses, as
        autocast's own losses are; the reference runs under autocast as any module does."""
        in_dim, target_dim = self.projector[0].in_features, self.projector[-1].out_features
        if x.dim() != 2 or x.shape[1] != in_dim:
            raise ValueError(f"GeometryAlignment: x must be [N, {in_dim}], got {tuple(x.shape)}")
        if target.dim() != 2 or target.shape != (x.shape[0], target_dim):
            raise ValueError(f"GeometryAlignment: target must be [{x.shape[0]}, {target_dim}] (N of x), "
                             f"got {tuple(target.shape)}")
        if x.shape[0] == 0:
            raise ValueError("GeometryAlignment: x has no tokens (N = 0)")
        target = target.detach().to(x.dtype)
        backend = _backend.resolve("align", self.backend, x.device)
        if backend == "reference":
            return alignment_losses_reference(x, target, self.projector, self.scale_head)
        out_dtype = x.dtype
        params = self._params()
        if torch.is_autocast_enabled(x.device.type):   # the fused paths' ops are not autocast's: cast once here
            low = torch.get_autocast_dtype(x.device.type)
            x, target, params, out_dtype = x.to(low), target.to(low), [p.to(low) for p in params], torch.float32
        _refuse_fp16("GeometryAlignment", x.dtype, backend)
        if any(p.dtype != x.dtype or p.device != x.device for p in params):
            raise ValueError(f"GeometryAlignment: parameters must match x ({x.dtype}, {x.device}) on the "
                             f"{backend} backend")
        ops = tail_ops(backend)
        chunk = self.chunk_size or DEFAULT_CHUNK.get(x.device.type, DEFAULT_CHUNK["cuda"])
        x, target = x.contiguous(), target.contiguous()
        with torch.autocast(x.device.type, enabled=False):
            if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
                angular, scale = _FusedAlignment.apply(x, target, ops, self.loss_weights, chunk, out_dtype, *params)
            else:
                angular, scale, _ = _fused_pass(x, target, params, ops, *self.loss_weights, chunk, (False,) * 11)
                angular, scale = angular.to(out_dtype), scale.to(out_dtype)
        return {"angular": angular, "scale": scale}
