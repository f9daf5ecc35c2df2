"""Transformer building blocks shared by DINOv2, the VGGT aggregator and the camera head.

Parameter names match ``vggt/layers/{attention,block,mlp,layer_scale}.py`` so the official checkpoint
loads unchanged (``norm1, attn.qkv, attn.q_norm, attn.k_norm, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ls2.gamma``). Official behaviour reproduced:

- pre-norm residual block: ``x = x + ls1(attn(norm1(x)))``; ``x = x + ls2(mlp(norm2(x)))``;
- LayerScale is ``x * gamma`` (out of place), absent (identity) when ``init_values`` is falsy;
- attention: ``qkv -> [3, B, heads, N, d]``, then QK-norm (``LayerNorm(d)``, eps 1e-5) on q and k,
  then RoPE on q and k, then scaled dot-product attention with scale ``d**-0.5``, then ``proj``;
- MLP: ``fc2(GELU(fc1(x)))`` with the exact (erf) GELU.

Attention goes through :func:`engine.models.attention.attention` (flash-attn / xformers / SDPA, chosen
once per process). Under autocast, a LayerNorm-ed q/k is float32 while v is half precision; SDPA would
cast all three to the autocast dtype, so q and k are cast to v's dtype first (same numbers, and it lets
the flash-attn backend take the call). Without autocast this is a no-op.
"""
from __future__ import annotations

import torch
from torch import nn

from geoforge.engine.models.attention import attention

from .rope import RopeCache


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (``gamma`` initialised to ``init_values``)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``; ``out_features`` defaults to ``in_features``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention on ``[B, N, dim]`` with optional QK-norm and 2D RoPE."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, rope: RopeCache | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope.apply(q), rope.apply(k)
        if q.dtype != v.dtype:
            q, k = q.to(v.dtype), k.to(v.dtype)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block (attention + MLP, each with LayerScale and a residual)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, init_values: float | None = None,
                 qk_norm: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor, rope: RopeCache | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        return x + self.ls2(self.mlp(self.norm2(x)))
