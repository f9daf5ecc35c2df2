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
"""
from __future__ import annotations

import importlib
import logging

import torch
import torch.nn.functional as F

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
            raise RuntimeError(f"attention backend {chosen!r} requested but not usable here "
                               f"(CUDA available: {cuda}); install the 'gpu' extra or use 'sdpa'")
    if _state["backend"] != chosen:
        log.info("attention backend: %s (requested %s)", chosen, requested)
    _state["backend"] = chosen
    return chosen


def attention_backend() -> str:
    return _state["backend"] or set_attention_backend("auto")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d) [+ mask]) v for ``[B, heads, L, d]`` tensors."""
    backend = attention_backend()
    fused_ok = mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash_attn" and fused_ok:
        from flash_attn import flash_attn_func  # layout [B, L, heads, d]
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "xformers" and fused_ok:
        import xformers.ops as xops  # layout [B, L, heads, d]
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def frame_causal_mask(frames: int, tokens_per_frame: int, device=None) -> torch.Tensor:
    """Boolean [L, L] mask: a token attends to every token of its own and earlier frames."""
    f = torch.arange(frames, device=device).repeat_interleave(tokens_per_frame)
    return f[:, None] >= f[None, :]
