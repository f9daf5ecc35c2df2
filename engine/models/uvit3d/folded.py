"""The conditioning of a U-ViT3D level with the pose patch-embedding folded into each block's FiLM layer.

DFoT's per-pixel embedding of level i is ``emb = pool_i(noise[frame] + keep * (P r + p))`` (``r``: the ray
condition's p x p patches, ``K = 180 p^2`` numbers; ``P [E, K]``, ``p [E]``: the pose patch conv), and every block
computes ``W emb + b`` from it (``W [2C, E]``: its FiLM / scale-shift layer). All of this is linear, so

    W emb + b = keep * ((W P) pool_i(r))  +  (W noise[frame] + b + keep * W p)
                 \\_ per pixel, K inputs _/    \\_________ per frame ___________/

which is the same function with a per-pixel product of K instead of E inputs, no gradient into the
(constant) rays, and the per-frame part computed once per frame instead of once per pixel. For DFoT's
RealEstate10K model (E = 1024, K = 720) the embedding layers are about half of the level-0 ResBlocks' work,
so :class:`FoldedEmb` is used where it pays (``UViT3D(fold_pose="auto")``: E > K and enough pixels to
amortise the small ``W P`` product); elsewhere the blocks take the plain ``emb`` tensor. Results equal the
unfolded ones up to float rounding (the golden test runs both).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FoldedEmb:
    """One level's conditioning, unmaterialised. ``noise [B T, E]``, ``rays [B T, K, h, w]`` (pooled patches),
    ``pose_w [E, K]``, ``pose_b [E]``, ``keep [B T]`` (1 keep / 0 drop the pose; None: keep all)."""

    def __init__(self, noise: torch.Tensor, rays: torch.Tensor, pose_w: torch.Tensor, pose_b: torch.Tensor,
                 keep: torch.Tensor | None, frames: int):
        self.noise, self.rays, self.pose_w, self.pose_b, self.keep, self.frames = noise, rays, pose_w, pose_b, keep, frames
        self.token_range: tuple[int, int] | None = None   # set by ``slice``: only these tokens of ``tokens``
        self._tokens: torch.Tensor | None = None
        self._slices: dict[tuple[int, int], FoldedEmb] = {}

    def slice(self, start: int, stop: int) -> FoldedEmb:
        """The same conditioning restricted to the tokens ``[start, stop)`` of the level's ``T h w`` (time
        slowest) for :meth:`tokens` (sequence parallelism: a rank's token slice); cached per range."""
        part = self._slices.get((start, stop))
        if part is None:
            part = FoldedEmb(self.noise, self.rays, self.pose_w, self.pose_b, self.keep, self.frames)
            part.token_range = (start, stop)
            self._slices[(start, stop)] = part
        return part

    def _parts(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W P [out, K], per-frame term [B T, out])`` for a layer ``W [out, E]``."""
        folded = weight @ self.pose_w
        pose_bias = weight @ self.pose_b
        per_frame = F.linear(self.noise, weight, bias)
        per_frame = per_frame + (pose_bias if self.keep is None else self.keep[:, None] * pose_bias)
        return folded, per_frame

    def conv(self, layer: nn.Conv2d) -> torch.Tensor:
        """``layer(emb)`` for a 1x1 conv: ``[B T, out, h, w]``."""
        folded, per_frame = self._parts(layer.weight.flatten(1), layer.bias)
        per_pixel = F.conv2d(self.rays, folded[:, :, None, None])
        if self.keep is not None:
            per_pixel = per_pixel * self.keep[:, None, None, None]
        return per_pixel + per_frame[:, :, None, None]

    def tokens(self, layer: nn.Linear) -> torch.Tensor:
        """``layer(emb)`` in token layout ``[B, T h w, out]`` (time slowest), or ``[B, stop - start, out]`` for
        a :meth:`slice`."""
        bt, k, h, w = self.rays.shape
        if self._tokens is None:   # [B, T h w, K] (or the slice), shared by the blocks of the level
            tokens = self.rays.unflatten(0, (-1, self.frames)).permute(0, 1, 3, 4, 2).reshape(
                bt // self.frames, self.frames * h * w, k)
            self._tokens = (tokens if self.token_range is None   # a slice copied: the whole level's is let go
                            else tokens[:, self.token_range[0]:self.token_range[1]].clone())
        folded, per_frame = self._parts(layer.weight, layer.bias)
        per_tok = self._tokens @ folded.t()
        b = per_tok.shape[0]
        if self.keep is not None:
            per_tok = per_tok * self.keep.view(b, self.frames)[:, :1, None]
        if self.token_range is not None:   # each token's frame term
            frame = torch.arange(*self.token_range, device=per_tok.device) // (h * w)
            return per_tok + per_frame.view(b, self.frames, -1)[:, frame]
        per_tok = per_tok.unflatten(1, (self.frames, -1)) + per_frame.view(b, self.frames, 1, -1)
        return per_tok.flatten(1, 2)


def ray_patches(rays: torch.Tensor, patch: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C p p, H / p, W / p]`` in a conv weight's ``(c, kh, kw)`` order."""
    n, c, h, w = rays.shape
    x = rays.view(n, c, h // patch, patch, w // patch, patch).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * patch * patch, h // patch, w // patch)
