"""The blocks of DFoT's U-ViT3D, with DFoT's parameter names (``u_vit_blocks.py``).

Layouts: convolutional blocks take ``x [N, C, H, W]`` (N = batch x frames) and a per-pixel embedding
``emb [N, E, H, W]``; transformer blocks take tokens ``x [B, L, C]`` (L = T x H x W, time slowest) and
``emb [B, L, E]``, plus the RoPE tables ``(cos, sin) [L, head_dim / 2]``. Either may instead get the level's
:class:`~engine.models.uvit3d.folded.FoldedEmb` (the same embedding, never materialised).

- ``ResBlock``: GroupNorm(32) -> SiLU -> conv3x3; ``(scale, shift)`` = 1x1 conv of emb;
  ``GroupNorm(h) (1 + scale) + shift`` -> SiLU -> conv3x3; residual.
- ``TransformerBlock`` (ViT-22B parallel block): ``h = RMSNorm(x) (1 + scale) + shift`` (FiLM from emb; one fused
  kernel, ``kernels.film_norm``, on the backend the recipe's ``backend:`` names),
  one fused linear to ``(q, k, v | mlp hidden 4C)``, QK-RMSNorm, 3D RoPE, full attention through
  GeoForge's backend (``engine.models.attention``), ``x + attn_out(a) + mlp_out(SiLU(mlp))``; under sequence
  parallelism on a token slice, attention through the Ulysses all-to-all (``engine.models.sequence_parallel``).
- ``Downsample``: avg-pool 2 -> conv3x3; ``Upsample``: conv3x3 -> nearest x2.

DFoT zero-initialises the output layers (``ProjectOutput``, ResBlock's last conv, ``attn_out``,
``mlp_out``): :func:`zero_init_outputs` does the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geoforge.engine.models.attention import attention
from geoforge.engine.models.rope import apply_rope
from geoforge.engine.models.sequence_parallel import ulysses_attention
from geoforge.engine.models.uvit3d.folded import FoldedEmb
from geoforge.kernels.film_norm import film_rms_norm


def film(normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``normed * (1 + scale) + shift`` in one fused op."""
    return torch.addcmul(shift, normed, 1 + scale)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_dim: int):
        super().__init__()
        self.emb_layer = nn.Conv2d(emb_dim, 2 * channels, kernel_size=1)
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels, eps=1e-6), nn.SiLU(),
                                       nn.Conv2d(channels, channels, kernel_size=3, padding=1))
        self.out_norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.out_rest = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, channels, kernel_size=3, padding=1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        ss = emb.conv(self.emb_layer) if isinstance(emb, FoldedEmb) else self.emb_layer(emb)
        scale, shift = ss.chunk(2, dim=1)
        return x + self.out_rest(film(self.out_norm(h), scale, shift))


class FiLMRMSNorm(nn.Module):
    """RMSNorm (eps 1e-6, learned weight) modulated per token: DFoT's ``NormalizeWithCond``.

    Computed by the fused ``kernels.film_norm.film_rms_norm`` on ``backend`` (``auto``: Triton on CUDA, C++ on
    CPU, the plain ``nn.RMSNorm`` + ``addcmul`` reference for float64), reading the FiLM layer's packed
    ``(scale | shift)`` output in place. Parameters and state-dict keys are DFoT's (``emb_layer``, ``norm.weight``).
    """

    def __init__(self, dim: int, emb_dim: int, backend: str = "auto"):
        super().__init__()
        self.emb_layer = nn.Linear(emb_dim, 2 * dim)
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.backend = backend

    def forward(self, x: torch.Tensor, emb: torch.Tensor | FoldedEmb) -> torch.Tensor:
        ss = emb.tokens(self.emb_layer) if isinstance(emb, FoldedEmb) else self.emb_layer(emb)
        return film_rms_norm(x, self.norm.weight, ss, eps=self.norm.eps, backend=self.backend)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, emb_dim: int, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm = FiLMRMSNorm(dim, emb_dim, backend)
        self.fused_dims = (3 * dim, 4 * dim)
        self.fused_attn_mlp_proj = nn.Linear(dim, sum(self.fused_dims))
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.attn_out = nn.Linear(dim, dim)
        self.mlp_out = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sp=None
                ) -> torch.Tensor:
        """``sp`` (a :class:`~engine.models.sequence_parallel.SequenceParallel`): ``x`` is this rank's token slice
        and attention runs over the whole sequence through the Ulysses all-to-all."""
        qkv, mlp_h = self.fused_attn_mlp_proj(self.norm(x, emb)).split(self.fused_dims, dim=-1)
        # [B, L, 3, heads, d] -> three [B, heads, L, d] views (no copy before the norms)
        q, k, v = qkv.unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        a = (attention(q, k, v) if sp is None else ulysses_attention(q, k, v, None, sp)).transpose(1, 2).flatten(2)
        x = x + self.attn_out(a)
        return x + self.mlp_out(mlp_h)


class Downsample(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.avg_pool2d(x, kernel_size=2, stride=2))


class Upsample(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=2, mode="nearest")


class Conv(nn.Module):
    """A conv layer under the name ``proj`` (DFoT's EmbedInput / ProjectOutput / timm PatchEmbed)."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def zero_init_outputs(module: nn.Module) -> None:
    """Zero the layers DFoT zero-initialises (last conv of ResBlocks, attn_out, mlp_out)."""
    for m in module.modules():
        layers = []
        if isinstance(m, ResBlock):
            layers = [m.out_rest[1]]
        elif isinstance(m, TransformerBlock):
            layers = [m.attn_out, m.mlp_out[2]]
        for layer in layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
