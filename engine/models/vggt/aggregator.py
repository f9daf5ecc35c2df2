"""VGGT aggregator: DINOv2 patch tokens + alternating frame / global attention.

Reproduces ``vggt/models/aggregator.py`` (parameter names ``camera_token, register_token, patch_embed.*,
frame_blocks.i.*, global_blocks.i.*``):

- images ``[B, S, 3, H, W]`` in [0, 1] are normalised with the ImageNet mean/std inside the model;
- per frame: ``[camera (1), registers (R), patches (P)]`` tokens, ``patch_start_idx = 1 + R``. The special
  tokens have two learned slots: slot 0 is used by frame 0 of every sequence, slot 1 by all other frames;
- ``aa_order`` (default ``frame, global``) alternates ``aa_block_size`` frame blocks (attention within each
  frame, tokens ``[B*S, P', C]``) with ``aa_block_size`` global blocks (attention over all frames of a
  sequence, ``[B, S*P', C]``); RoPE uses the same per-frame positions in both (see ``rope.py``);
- output ``i`` of the list is ``cat(frame_block_i_output, global_block_i_output)`` along channels,
  ``[B, S, P', 2C]``; blocks run under gradient checkpointing in training mode.

:meth:`Aggregator.forward_layers` is the teacher path: it keeps only the requested outputs and stops after
the deepest one (with ``aa_block_size > 1`` the group containing it is completed).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .dinov2 import build_patch_embed
from .layers import Block
from .rope import RopeCache, patch_positions, rope_angles

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def special_tokens(tokens: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """``[1, 2, X, C]`` learned slots -> ``[batch * frames, X, C]``: slot 0 for frame 0, slot 1 after."""
    first = tokens[:, :1].expand(batch, 1, *tokens.shape[2:])
    rest = tokens[:, 1:].expand(batch, frames - 1, *tokens.shape[2:])
    return torch.cat([first, rest], dim=1).reshape(batch * frames, *tokens.shape[2:])


class Aggregator(nn.Module):
    """Alternating-attention trunk. ``forward(images) -> (list of depth x [B,S,P',2C], patch_start_idx)``."""

    def __init__(self, img_size: int = 518, patch_size: int = 14, embed_dim: int = 1024, depth: int = 24,
                 num_heads: int = 16, mlp_ratio: float = 4.0, num_register_tokens: int = 4,
                 qkv_bias: bool = True, proj_bias: bool = True, ffn_bias: bool = True,
                 patch_embed: str = "dinov2_vitl14_reg", aa_order: Sequence[str] = ("frame", "global"),
                 aa_block_size: int = 1, qk_norm: bool = True, rope_freq: float = 100,
                 init_values: float = 0.01):
        super().__init__()
        if depth % aa_block_size != 0:
            raise ValueError(f"aggregator.depth ({depth}) must be divisible by aa_block_size ({aa_block_size})")
        bad = [t for t in aa_order if t not in ("frame", "global")]
        if bad or not aa_order:
            raise ValueError(f"aggregator.aa_order entries must be 'frame' or 'global', got {list(aa_order)}")
        # Own parameters first (official state_dict order), then submodules.
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, embed_dim))
        self.register_token = nn.Parameter(torch.randn(1, 2, num_register_tokens, embed_dim))
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)
        self.patch_embed = build_patch_embed(patch_embed, img_size, patch_size, num_register_tokens, embed_dim)

        def blocks() -> nn.ModuleList:
            return nn.ModuleList([
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                      ffn_bias=ffn_bias, init_values=init_values, qk_norm=qk_norm)
                for _ in range(depth)])

        self.frame_blocks = blocks()
        self.global_blocks = blocks()
        self.depth = depth
        self.patch_size = patch_size
        self.aa_order = tuple(aa_order)
        self.aa_block_size = aa_block_size
        self.rope_freq = rope_freq
        self.head_dim = embed_dim // num_heads
        self.patch_start_idx = 1 + num_register_tokens

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(H / patch_size, W / patch_size)`` of an ``height x width`` image."""
        return height // self.patch_size, width // self.patch_size

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, RopeCache | None]:
        """Normalise + patchify + prepend special tokens: ``[B*S, P', C]`` and the per-frame RoPE layout."""
        b, s, c, h, w = images.shape
        if c != 3:
            raise ValueError(f"expected images [B, S, 3, H, W], got {tuple(images.shape)}")
        # The official non-persistent buffers ``_resnet_mean/_resnet_std`` (model dtype).
        const = {"device": images.device, "dtype": self.camera_token.dtype}
        mean = torch.tensor(IMAGENET_MEAN, **const).view(1, 1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, **const).view(1, 1, 3, 1, 1)
        patches = self.patch_embed(((images - mean) / std).reshape(b * s, c, h, w))
        tokens = torch.cat([special_tokens(self.camera_token, b, s),
                            special_tokens(self.register_token, b, s), patches], dim=1)
        rope = None
        if self.rope_freq > 0:
            positions = patch_positions(*self.patch_grid(h, w), self.patch_start_idx, device=images.device)
            rope = RopeCache(rope_angles(positions, self.head_dim, self.rope_freq))
        return tokens, rope

    def _run(self, block: Block, x: torch.Tensor, rope: RopeCache | None) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():  # checkpointing only saves memory for backward
            return checkpoint(block, x, rope, use_reentrant=False)
        return block(x, rope=rope)

    def iter_layers(self, images: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(i, frame_out_i, global_out_i)``, each ``[B, S, P', C]``, lazily block group by group."""
        b, s = images.shape[:2]
        tokens, frame_rope = self._embed(images)
        p, c = tokens.shape[1:]
        global_rope = frame_rope.repeat(s) if frame_rope is not None else None
        for group in range(self.depth // self.aa_block_size):
            outs: dict[str, list[torch.Tensor]] = {}
            for kind in self.aa_order:
                blocks = self.frame_blocks if kind == "frame" else self.global_blocks
                rope = frame_rope if kind == "frame" else global_rope
                tokens = tokens.reshape(b * s, p, c) if kind == "frame" else tokens.reshape(b, s * p, c)
                outs[kind] = []
                for idx in range(group * self.aa_block_size, (group + 1) * self.aa_block_size):
                    tokens = self._run(blocks[idx], tokens, rope)
                    outs[kind].append(tokens.view(b, s, p, c))
            for j in range(self.aa_block_size):
                yield group * self.aa_block_size + j, outs["frame"][j], outs["global"][j]

    def forward_layers(self, images: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Only the requested outputs, ``{layer: [B, S, P', 2C]}`` (keys as given; negatives count from
        the end). Stops after the deepest requested layer."""
        wanted = {}
        for layer in layers:
            if not -self.depth <= layer < self.depth:
                raise ValueError(f"layer {layer} out of range for an aggregator of depth {self.depth}")
            wanted.setdefault(layer % self.depth, []).append(layer)
        if not wanted:
            raise ValueError("layers must name at least one aggregator output")
        out: dict[int, torch.Tensor] = {}
        for i, frame_out, global_out in self.iter_layers(images):
            if i in wanted:
                tokens = torch.cat([frame_out, global_out], dim=-1)
                for key in wanted[i]:
                    out[key] = tokens
            if i == max(wanted):
                break
        return out

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """All ``depth`` outputs ``[B, S, P', 2C]`` and ``patch_start_idx``, as the official aggregator."""
        outputs = [torch.cat([f, g], dim=-1) for _, f, g in self.iter_layers(images)]
        return outputs, self.patch_start_idx


def patch_token_grid(tokens: torch.Tensor, patch_start_idx: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Aggregator tokens ``[B, S, P', C]`` -> patch tokens on their grid ``[B, S, h, w, C]``
    (drops the ``patch_start_idx`` special tokens; patches are row-major)."""
    h, w = grid_hw
    patches = tokens[:, :, patch_start_idx:]
    if patches.shape[2] != h * w:
        raise ValueError(f"{patches.shape[2]} patch tokens do not fill a {h}x{w} grid")
    return patches.unflatten(2, (h, w))
