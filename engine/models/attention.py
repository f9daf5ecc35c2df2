"""Attention with one backend choice for the whole process: flash-attn, xformers or PyTorch SDPA.

Tensors are ``[B, heads, L, head_dim]``. ``mask`` is an optional boolean mask broadcastable to
``[B, heads, L, L]`` where True means "may attend" (SDPA's convention).

The backend is resolved once (``set_attention_backend``, called by the training entry point from the
recipe, or lazily on first use) and logged:

- ``flash_attn``: flash-attn 2/3 ``flash_attn_func`` on CUDA fp16/bf16 without a mask;
- ``xformers``: ``memory_efficient_attention`` on CUDA without a mask;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (cuDNN/flash/efficient kernels on
  GPU, the math kernel on CPU) - the path the CPU tests exercise, and the fallback for every call the
  GPU libraries cannot take (masks, fp32, CPU tensors).

q and k are cast to v's dtype first: under autocast a normalised q/k (``rms_norm`` and ``layer_norm`` are on
CUDA autocast's float32 list) is float32 while v is bf16, which would send every call to SDPA.

What actually ran is recorded per call site (the calling function, e.g.
``geoforge.engine.models.dit:DiTBlock.attend``): the first call of each site logs ``attention <site>: <kernel>`` with
the reason when a fused backend was not taken, and :func:`attention_report` returns the table (the training
loop logs it after its first step).
"""
from __future__ import annotations

import importlib
import logging
import sys

import torch
import torch.nn.functional as F

from geoforge.engine.errors import MissingCapability

log = logging.getLogger("geoforge.attention")
ATTENTION_BACKENDS = ("auto", "flash_attn", "xformers", "sdpa")
_state = {"backend": None}


def _available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def set_attention_backend(requested: str = "auto") -> str:
    """Resolve and remember the attention backend; log the choice once. Returns the chosen name."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {requested!r}")
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda and _available("flash_attn"):
            chosen = "flash_attn"
        elif cuda and _available("xformers.ops"):
            chosen = "xformers"
        else:
            chosen = "sdpa"
    else:
        chosen = requested
        if chosen in ("flash_attn", "xformers") and not (cuda and _available(
                "flash_attn" if chosen == "flash_attn" else "xformers.ops")):
            raise MissingCapability(f"attention: {chosen!r} requested but not usable here (CUDA available: {cuda}); "
                                    f"on a CUDA machine install the 'gpu' extra (pip install -e '.[gpu]'), or "
                                    f"--set attention=auto (picks {chosen} where it works, sdpa elsewhere)")
    if _state["backend"] != chosen:
        log.info("attention backend: %s (requested %s)", chosen, requested)
    _state["backend"] = chosen
    return chosen


def attention_backend() -> str:
    return _state["backend"] or set_attention_backend("auto")


_used: dict[str, str] = {}   # call site -> the kernel that ran there (with the reason for a fallback)


def kernel_for(backend: str, device_type: str, dtype: torch.dtype, has_mask: bool) -> tuple[str, str]:
    """(kernel, reason): the kernel a call runs with, and why a fused backend was not taken ("" if it was)."""
    if backend == "sdpa":
        return "sdpa", ""
    if has_mask:
        return "sdpa", f"{backend} not taken: a mask"
    if device_type != "cuda":
        return "sdpa", f"{backend} not taken: {device_type} tensors"
    if dtype not in (torch.float16, torch.bfloat16):
        return "sdpa", f"{backend} not taken: {str(dtype).removeprefix('torch.')}"
    return backend, ""


def _record(site: str | None, kernel: str, reason: str) -> None:
    if site is None:
        frame = sys._getframe(2)
        site = f"{frame.f_globals.get('__name__', '?')}:{frame.f_code.co_qualname}"
    label = f"{kernel} ({reason})" if reason else kernel
    if _used.get(site) != label:
        log.info("attention %s: %s", site, label)
        _used[site] = label


def attention_report() -> dict[str, str]:
    """Call site -> the kernel that ran there last (``"sdpa (flash_attn not taken: a mask)"``, ...)."""
    return dict(_used)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None, site: str | None = None) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d) [+ mask]) v for ``[B, heads, L, d]`` tensors. ``site`` names the call site in
    :func:`attention_report` (default: the calling function)."""
    backend = attention_backend()
    if q.dtype != v.dtype or k.dtype != v.dtype:   # autocast: normalised q/k in fp32, v in bf16
        q, k = q.to(v.dtype), k.to(v.dtype)
    kernel, reason = kernel_for(backend, q.device.type, q.dtype, mask is not None)
    if not torch.compiler.is_compiling():   # traced by torch.compile (distributed.compile): inductor's kernel
        _record(site, kernel, reason)
    if kernel == "flash_attn":
        from flash_attn import flash_attn_func  # layout [B, L, heads, d]
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if kernel == "xformers":
        import xformers.ops as xops  # layout [B, L, heads, d]
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def frame_causal_mask(frames: int, tokens_per_frame: int, device=None) -> torch.Tensor:
    """Boolean [L, L] mask: a token attends to every token of its own and earlier frames."""
    f = torch.arange(frames, device=device).repeat_interleave(tokens_per_frame)
    return f[:, None] >= f[None, :]
