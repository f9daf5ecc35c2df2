"""DINOv2 ViT (with register tokens) and the plain conv patch embedding used by the VGGT aggregator.

Parameter names and forward semantics follow ``vggt/layers/vision_transformer.py`` /
``patch_embed.py`` (a copy of the DINOv2 code), so both the VGGT checkpoint (``aggregator.patch_embed.*``)
and official DINOv2 ``*_reg`` weights load unchanged. Official behaviour reproduced:

- tokens: ``[cls, registers, patches]``; the positional embedding is added to ``[cls, patches]`` *before*
  the registers are inserted (registers carry no positional embedding);
- the positional embedding is interpolated (bicubic, on the float32 copy) from its square training grid
  to ``(H/p, W/p)`` unless the grid already matches and the image is square. VGGT builds it with
  ``interpolate_antialias=True, interpolate_offset=0.0`` (explicit output size); the DINOv2 hub models
  use ``antialias=False, offset=0.1`` (scale factor ``(h0 + 0.1) / M``) - both paths are implemented;
- blocks use LayerNorm eps 1e-6, LayerScale (``init_values``, 1.0 in VGGT), no QK-norm, no RoPE;
- :meth:`DinoVisionTransformer.forward` returns ``x_norm_patchtokens`` = ``norm(x)[:, 1 + registers:]``,
  which is what the aggregator consumes; ``mask_token`` is kept only for checkpoint compatibility.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import Block

# name -> (embed_dim, depth, num_heads) of the official ``vit_*`` constructors (mlp_ratio 4).
DINOV2_VARIANTS: dict[str, tuple[int, int, int]] = {
    "dinov2_vits14_reg": (384, 12, 6),
    "dinov2_vitb14_reg": (768, 12, 12),
    "dinov2_vitl14_reg": (1024, 24, 16),
    "dinov2_vitg2_reg": (1536, 40, 24),
}


class PatchEmbed(nn.Module):
    """Non-overlapping conv patchify: ``[B, C, H, W] -> [B, (H/p)*(W/p), embed_dim]`` (row-major)."""

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT. ``forward(x [B,3,H,W]) -> normalised patch tokens [B, (H/p)*(W/p), embed_dim]``."""

    def __init__(self, img_size: int = 518, patch_size: int = 14, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, ffn_bias: bool = True, proj_bias: bool = True,
                 init_values: float | None = 1.0, num_register_tokens: int = 4,
                 interpolate_antialias: bool = True, interpolate_offset: float = 0.0):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        num_patches = (img_size // patch_size) ** 2
        # Own parameters first, in the official registration order (state_dict order).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                  ffn_bias=ffn_bias, init_values=init_values, norm_eps=1e-6)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def interpolate_pos_encoding(self, num_tokens: int, height: int, width: int,
                                 dtype: torch.dtype) -> torch.Tensor:
        """Positional embedding ``[1, 1 + (H/p)*(W/p), C]`` for an ``height x width`` image."""
        n_trained = self.pos_embed.shape[1] - 1
        if num_tokens - 1 == n_trained and height == width:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        grid = int(math.sqrt(n_trained))
        if grid * grid != n_trained:
            raise ValueError(f"pos_embed holds {n_trained} patch positions, not a square grid")
        gh, gw = height // self.patch_size, width // self.patch_size
        patch_pos = pos_embed[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((gh + self.interpolate_offset) / grid, (gw + self.interpolate_offset) / grid)
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic",
                                      antialias=self.interpolate_antialias)
        else:
            patch_pos = F.interpolate(patch_pos, size=(gh, gw), mode="bicubic",
                                      antialias=self.interpolate_antialias)
        if patch_pos.shape[-2:] != (gh, gw):
            raise RuntimeError(f"interpolated pos_embed grid {tuple(patch_pos.shape[-2:])} != {(gh, gw)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([pos_embed[:, :1], patch_pos], dim=1).to(dtype)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, 1 + registers + patches, C]`` (pos-embedded, before the blocks)."""
        height, width = x.shape[-2:]
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1], height, width, x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Official output dict: ``x_norm_clstoken [B,C]``, ``x_norm_regtokens``,
        ``x_norm_patchtokens [B,P,C]`` and ``x_prenorm [B,1+R+P,C]``."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.training and torch.is_grad_enabled() else blk(x)
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_regtokens": x_norm[:, 1:r + 1],
                "x_norm_patchtokens": x_norm[:, r + 1:], "x_prenorm": x}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["x_norm_patchtokens"]


def build_patch_embed(name: str, img_size: int, patch_size: int, num_register_tokens: int,
                      embed_dim: int) -> nn.Module:
    """The aggregator's patch embedding: ``"conv"`` or one of :data:`DINOV2_VARIANTS`.

    As in ``Aggregator.__build_patch_embed__``, the ViT variants use their own fixed width (which must
    equal the aggregator ``embed_dim``), ``init_values=1.0``, antialiased bicubic pos-embed
    interpolation without offset, and ``num_register_tokens`` registers.
    """
    if name == "conv":
        return PatchEmbed(patch_size, 3, embed_dim)
    if name not in DINOV2_VARIANTS:
        raise ValueError(f"aggregator.patch_embed must be 'conv' or one of {sorted(DINOV2_VARIANTS)}, "
                         f"got {name!r}")
    width, depth, heads = DINOV2_VARIANTS[name]
    if width != embed_dim:
        raise ValueError(f"aggregator.patch_embed {name!r} outputs {width}-d tokens but "
                         f"aggregator.embed_dim is {embed_dim}")
    vit = DinoVisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=width, depth=depth,
                                num_heads=heads, init_values=1.0, num_register_tokens=num_register_tokens,
                                interpolate_antialias=True, interpolate_offset=0.0)
    vit.mask_token.requires_grad_(False)  # unused by VGGT; frozen as in the official aggregator
    return vit
