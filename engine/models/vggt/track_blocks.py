"""Transformer of the VGGT tracker (``EfficientUpdateFormer``, CoTracker style).

Reproduces ``vggt/heads/track_modules/{blocks,modules}.py``. Parameter names are those of
``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) so the checkpoint loads
unchanged, but attention itself goes through :func:`engine.models.attention.attention`; the math equals
``nn.MultiheadAttention`` (batch_first, no mask, no dropout) up to float rounding.

Official behaviour reproduced: blocks normalise *before* attention and the residual is taken from the
normalised input (``x = norm1(x); x = x + attn(x); x = x + mlp(norm2(x))``); 64 learned virtual tracks are
appended along the track axis; each of the ``depth`` steps runs time attention over the frames of every
track, then (every ``time_depth // space_depth`` steps) virtual<-points cross attention, virtual self
attention and points<-virtual cross attention over the tracks of every frame; finally the virtual tracks
are dropped, the input projection is added back, and ``output_norm`` + ``flow_head`` give
``[B, N, S, output_dim]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geoforge.engine.models.attention import attention

from .layers import Mlp


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``-compatible (batch_first, same parameters) attention without masks."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``query [B, Lq, E]`` attends to ``context [B, Lk, E]`` (``query`` itself when None)."""
        e = query.shape[-1]
        if context is None:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q = F.linear(query, self.in_proj_weight[:e], self.in_proj_bias[:e])
            k, v = F.linear(context, self.in_proj_weight[e:], self.in_proj_bias[e:]).chunk(2, dim=-1)
        out = attention(self._heads(q), self._heads(k), self._heads(v))
        return self.out_proj(out.transpose(1, 2).flatten(2))


class AttnBlock(nn.Module):
    """Self-attention block: ``x = norm1(x); x = x + attn(x); x + mlp(norm2(x))``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.attn = MultiheadAttention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        x = x + self.attn(x)
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """Cross-attention block: ``x = norm1(x); x = x + attn(x, norm_context(ctx)); x + mlp(norm2(x))``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.cross_attn = MultiheadAttention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        x = x + self.cross_attn(x, self.norm_context(context))
        return x + self.mlp(self.norm2(x))


class EfficientUpdateFormer(nn.Module):
    """``forward(x [B, N, S, input_dim]) -> [B, N, S, output_dim]`` (tracks N, frames S)."""

    def __init__(self, space_depth: int = 6, time_depth: int = 6, input_dim: int = 320,
                 hidden_size: int = 384, num_heads: int = 8, output_dim: int = 130, mlp_ratio: float = 4.0,
                 add_space_attn: bool = True, num_virtual_tracks: int = 64):
        super().__init__()
        self.add_space_attn = add_space_attn
        self.num_virtual_tracks = num_virtual_tracks
        # Own parameter first (official state_dict order); the typo is the official name.
        self.virual_tracks = (nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size))
                              if add_space_attn else None)
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim)
        self.time_blocks = nn.ModuleList([AttnBlock(hidden_size, num_heads, mlp_ratio)
                                          for _ in range(time_depth)])
        if add_space_attn:
            if not 0 < space_depth <= time_depth:
                raise ValueError(f"space_depth ({space_depth}) must be in [1, time_depth={time_depth}]")
            self.space_virtual_blocks = nn.ModuleList([AttnBlock(hidden_size, num_heads, mlp_ratio)
                                                       for _ in range(space_depth)])
            self.space_point2virtual_blocks = nn.ModuleList([CrossAttnBlock(hidden_size, num_heads, mlp_ratio)
                                                             for _ in range(space_depth)])
            self.space_virtual2point_blocks = nn.ModuleList([CrossAttnBlock(hidden_size, num_heads, mlp_ratio)
                                                             for _ in range(space_depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.input_transform(self.input_norm(x))
        init_tokens = tokens
        b, _, t, _ = tokens.shape
        if self.add_space_attn:
            tokens = torch.cat([tokens, self.virual_tracks.repeat(b, 1, t, 1)], dim=1)
        n = tokens.shape[1]
        every = len(self.time_blocks) // len(self.space_virtual_blocks) if self.add_space_attn else 0
        j = 0
        for i, time_block in enumerate(self.time_blocks):
            tokens = time_block(tokens.contiguous().view(b * n, t, -1)).view(b, n, t, -1)
            if self.add_space_attn and i % every == 0:
                space = tokens.permute(0, 2, 1, 3).contiguous().view(b * t, n, -1)
                points = space[:, : n - self.num_virtual_tracks]
                virtual = space[:, n - self.num_virtual_tracks:]
                virtual = self.space_virtual2point_blocks[j](virtual, points)
                virtual = self.space_virtual_blocks[j](virtual)
                points = self.space_point2virtual_blocks[j](points, virtual)
                tokens = torch.cat([points, virtual], dim=1).view(b, t, n, -1).permute(0, 2, 1, 3)
                j += 1
        if self.add_space_attn:
            tokens = tokens[:, : n - self.num_virtual_tracks]
        return self.flow_head(self.output_norm(tokens + init_tokens))
