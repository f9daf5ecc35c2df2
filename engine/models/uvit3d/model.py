"""DFoT's U-ViT3D with pose conditioning (``UViT3DPose``), loadable from the released state dicts.

Structure (SiD2's residual U-ViT, levels ``i = 0 .. n-1``; RealEstate10K: channels 128/256/576/1152):

    x [B, T, C, H, W] -> embed_input (conv, kernel = stride = patch) -> [BT, c0, H/p, W/p]
    emb = noise_level_pos_embedding(noise) [B, T, E] + external_cond_embedding(rays) [B, T, E, H/p, W/p]
          (per pixel of level 0; average-pooled by 2^i for level i)
    down level i < n-1: blocks -> (latent i) -> keep h_before -> Downsample -> keep h_after
    mid (level n-1): blocks -> (latent n-1)
    up level i = n-2 .. 0: x = Upsample(x - h_after) + h_before -> blocks -> (latent)
    project_output (transposed conv) -> [B, T, C, H, W]

ResBlock levels run on ``[BT, C, h, w]``; transformer levels on tokens ``[B, T h w, C]`` with full 3D
attention and DFoT's 3D RoPE (``engine.models.rope`` with the ``dfot_axis_dims`` split), converted once
per level. Parameter names are DFoT's, so its state dict (``diffusion_model.model.`` prefix stripped)
loads with ``strict=True``.

Two call forms:

- ``dfot_forward(x, noise_levels, external_cond, external_cond_mask=None, return_latents=False)``: the
  official call (``noise_levels`` = the network noise input ``0.125 logSNR [B, T]``, ``external_cond`` =
  the ray condition ``[B, T, 180, H, W]`` from :func:`engine.models.uvit3d.rays.ray_condition`); with
  ``return_latents`` it returns ``(out, latents)``, the 7 per-level maps ``[B, T, C_i, h_i, w_i]`` in
  the official order (down 0, down 1, down 2, mid, up 2, up 1, up 0).
- ``forward(x, noise_levels, *, poses16= | intrinsics=, extrinsics=, drop_cond=, return_features=())``:
  GeoForge's form (rays computed inside); ``return_features`` are **1-based** latent indices (3 = the
  level-2 map Geometry Forcing aligns, GF's ``latents_info=2``), returned channels-last
  ``{i: [B, T, h, w, C]}`` like the DiT's block features.

Activation checkpointing (``engine.models.checkpointing``): per level from ``cfg.use_checkpointing`` (DFoT:
the middle level), and every block (:meth:`UViT3D.blocks`) when the trainer applies
``distributed.activation_checkpointing``.

Sequence parallelism (``distributed.sequence_parallel: N``, training forwards; ``engine.models.sequence_parallel``
explains the layout and why the gradients are exact): each run of a transformer level's blocks works on this
rank's slice of the level's ``T h w`` tokens (FiLM embedding and RoPE tables sliced the same way, attention
through the Ulysses all-to-all, dropout from a per-rank RNG stream) and all-gathers the whole map at its end;
the ResBlock levels, Downsample / Upsample and the skip connections run on whole maps on every rank of the
group. ``forward``'s ``return_features`` of a transformer level are then this rank's slice
(:class:`~engine.models.sequence_parallel.ShardedFeatures`), those of a ResBlock level the whole map.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from geoforge.engine.models.checkpointing import enable_activation_checkpointing
from geoforge.engine.models.rope import dfot_axis_dims, rope_tables
from geoforge.engine.models.sequence_parallel import SequenceParallel, ShardedFeatures, gather_tokens, sequence_parallel
from geoforge.engine.models.uvit3d.blocks import (Conv, Downsample, ResBlock, TransformerBlock, Upsample,
                                         zero_init_outputs)
from geoforge.engine.models.uvit3d.config import UViT3DConfig
from geoforge.engine.models.uvit3d.embeddings import NoiseEmbedding, PoseEmbedding
from geoforge.engine.models.uvit3d.folded import FoldedEmb, ray_patches
from geoforge.engine.models.uvit3d.rays import poses16_from_cameras, ray_condition


FOLD_MODES = ("auto", "always", "never")


class UViT3D(nn.Module):
    """See the module docstring. ``fold_pose``: where the pose patch embedding is folded into the blocks'
    FiLM layers (``engine.models.uvit3d.folded``): ``auto`` (where it saves work), ``always``, ``never``.
    ``backend``: the fused kernels' backend (``kernels._backend``; the recipe's ``backend:``), used by the
    transformer blocks' RMSNorm + FiLM (``kernels.film_norm``)."""

    def __init__(self, cfg: UViT3DConfig, fold_pose: str = "auto", backend: str = "auto"):
        super().__init__()
        if fold_pose not in FOLD_MODES:
            raise ValueError(f"fold_pose must be one of {FOLD_MODES}, got {fold_pose!r}")
        cfg.validate()
        self.cfg = cfg
        self.fold_pose = fold_pose
        ch, e, n = cfg.channels, cfg.emb_channels, cfg.num_levels
        self.noise_level_pos_embedding = NoiseEmbedding(cfg.noise_freq_dim, e, cfg.use_fourier_noise_embedding)
        self.external_cond_embedding = PoseEmbedding(cfg.cond_dim, e, cfg.patch_size, cfg.external_cond_dropout)
        self.embed_input = Conv(nn.Conv2d(cfg.in_channels, ch[0], kernel_size=cfg.patch_size, stride=cfg.patch_size))
        self.project_output = Conv(nn.ConvTranspose2d(ch[0], cfg.in_channels, kernel_size=cfg.patch_size,
                                                      stride=cfg.patch_size))

        def blocks(level: int, count: int) -> list[nn.Module]:
            if cfg.is_transformer(level):
                return [TransformerBlock(ch[level], cfg.num_heads, e, cfg.block_dropouts[level], backend)
                        for _ in range(count)]
            return [ResBlock(ch[level], e) for _ in range(count)]

        self.down_blocks = nn.ModuleList(
            nn.ModuleList(blocks(i, cfg.num_updown_blocks[i]) + [Downsample(ch[i], ch[i + 1])]) for i in range(n - 1))
        self.up_blocks = nn.ModuleList(   # registered before mid_blocks: DFoT's state-dict order
            nn.ModuleList([Upsample(ch[i + 1], ch[i])] + blocks(i, cfg.num_updown_blocks[i]))
            for i in reversed(range(n - 1)))
        self.mid_blocks = nn.ModuleList(blocks(n - 1, cfg.num_mid_blocks))
        nn.init.zeros_(self.project_output.proj.weight)
        nn.init.zeros_(self.project_output.proj.bias)
        zero_init_outputs(self)
        enable_activation_checkpointing(blk for level in range(n) if cfg.use_checkpointing[level]
                                        for up in (False, True) for blk in self._level_blocks(level, up))

    def blocks(self) -> list[nn.Module]:
        """Every ResBlock / transformer block, for activation checkpointing applied from outside."""
        n = self.cfg.num_levels
        return list(dict.fromkeys(blk for level in range(n) for up in (False, True)
                                  for blk in self._level_blocks(level, up)))

    @classmethod
    def from_dfot_config(cls, constructor: Mapping[str, Any], **kwargs: Any) -> UViT3D:
        """Build from the ``constructor`` object of a resolved DFoT config (``cfg``, ``x_shape``, ...)."""
        return cls(UViT3DConfig.from_dfot_constructor(constructor), **kwargs)

    # ------------------------------------------------------------------ running the levels
    def _level_blocks(self, level: int, up: bool) -> nn.ModuleList | list[nn.Module]:
        n = self.cfg.num_levels
        if level == n - 1:
            return self.mid_blocks
        return self.up_blocks[n - 2 - level][1:] if up else self.down_blocks[level][:-1]

    def _run_level(self, x: torch.Tensor, emb: torch.Tensor, level: int, frames: int, up: bool = False,
                   sp: SequenceParallel | None = None) -> tuple[torch.Tensor, ShardedFeatures | None]:
        """Blocks of one level on ``x [BT, C, h, w]`` with ``emb [BT, E, h, w]``; returns ``[BT, C, h, w]`` and,
        for a transformer level under sequence parallelism ``sp``, this rank's token slice of it (else None)."""
        cfg = self.cfg
        blocks = self._level_blocks(level, up)
        if len(blocks) == 0:
            return x, None
        if not cfg.is_transformer(level):
            for blk in blocks:
                x = blk(x, emb)
            return x, None
        bt, c, h, w = x.shape
        tokens = x.unflatten(0, (-1, frames)).permute(0, 1, 3, 4, 2).flatten(1, 3)      # [B, T h w, C]
        head_dim = c // cfg.num_heads
        cos, sin = rope_tables(frames, h, w, head_dim, cfg.rope_theta, x.device, dfot_axis_dims(head_dim))
        if sp is None:
            emb_tokens = (emb if isinstance(emb, FoldedEmb)
                          else emb.unflatten(0, (-1, frames)).permute(0, 1, 3, 4, 2).flatten(1, 3))
            for blk in blocks:
                tokens = blk(tokens, emb_tokens, cos, sin)
            return tokens.unflatten(1, (frames, h, w)).permute(0, 1, 4, 2, 3).flatten(0, 1), None
        # sequence parallelism: this rank's tokens in, the whole level out (module docstring); the slices are
        # copied so that the blocks' saved inputs do not keep the whole level's token maps alive
        start, stop = sp.token_range(tokens.shape[1])
        tokens = tokens[:, start:stop].clone()
        emb_tokens = (emb.slice(start, stop) if isinstance(emb, FoldedEmb)
                      else emb.unflatten(0, (-1, frames)).permute(0, 1, 3, 4, 2).flatten(1, 3)[:, start:stop].clone())
        cos, sin = cos[start:stop], sin[start:stop]
        if self.training and cfg.block_dropouts[level] > 0:
            # the ranks of a group share one RNG stream (same seed, same draws): without this their slices would
            # drop the same positions. A seed drawn from the shared stream (advancing it alike on every rank),
            # offset by the rank, seeds the blocks' dropout; checkpointed blocks replay it (RNG state is kept).
            seed = int(torch.randint(0, 2 ** 62, ()))
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                torch.manual_seed(seed + sp.rank)
                for blk in blocks:
                    tokens = blk(tokens, emb_tokens, cos, sin, sp)
        else:
            for blk in blocks:
                tokens = blk(tokens, emb_tokens, cos, sin, sp)
        shard = ShardedFeatures(tokens, (frames, h, w), start, stop, sp)
        full = gather_tokens(tokens, sp)
        return full.unflatten(1, (frames, h, w)).permute(0, 1, 4, 2, 3).flatten(0, 1), shard

    def _folds(self, level: int, pixels: int) -> bool:
        """Whether level ``level`` (``pixels`` = B T h w) takes the folded embedding (``engine.models.uvit3d.folded``)."""
        if self.fold_pose != "auto":
            return self.fold_pose == "always"
        k = self.cfg.cond_dim * self.cfg.patch_size ** 2
        return self.cfg.emb_channels > k and pixels >= 4 * k

    def _level_embeddings(self, noise_levels: torch.Tensor, rays: torch.Tensor, mask: torch.Tensor | None,
                          hw: tuple[int, int]) -> list[torch.Tensor | FoldedEmb]:
        """Per level: the conditioning ``[B T, E, h_i, w_i]`` (DFoT: noise + pose, average-pooled by 2^i) or the
        same as a :class:`FoldedEmb`."""
        b, frames = noise_levels.shape
        n = self.cfg.num_levels
        pose = self.external_cond_embedding
        mask = pose.drop_mask(b, rays.device, mask)   # drawn once for both forms
        noise = self.noise_level_pos_embedding(noise_levels)
        folds = [self._folds(i, b * frames * (hw[0] >> i) * (hw[1] >> i)) for i in range(n)]
        embs: list = [None] * n
        if not all(folds):
            emb = (noise[..., None, None] + pose(rays, mask)).flatten(0, 1)
            for i in range(n):
                if not folds[i]:
                    embs[i] = emb if i == 0 else F.avg_pool2d(emb, kernel_size=2 ** i, stride=2 ** i)
        if any(folds):
            r0 = ray_patches(rays.flatten(0, 1), self.cfg.patch_size)
            keep = None if mask is None else (~mask).to(r0.dtype).repeat_interleave(frames)
            proj = pose.patch_embedder.proj
            for i in range(n):
                if folds[i]:
                    r = r0 if i == 0 else F.avg_pool2d(r0, kernel_size=2 ** i, stride=2 ** i)
                    embs[i] = FoldedEmb(noise.flatten(0, 1), r, proj.weight.flatten(1), proj.bias, keep, frames)
        return embs

    def _check(self, x: torch.Tensor, noise_levels: torch.Tensor) -> None:
        cfg = self.cfg
        if x.ndim != 5 or x.shape[2] != cfg.in_channels:
            raise ValueError(f"x must be [B, T, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        size = cfg.patch_size * 2 ** (cfg.num_levels - 1)
        if x.shape[3] % size or x.shape[4] % size:
            raise ValueError(f"x: H x W = {x.shape[3]} x {x.shape[4]} must be divisible by patch_size * "
                             f"2^(levels - 1) = {size}")
        if noise_levels.shape != x.shape[:2]:
            raise ValueError(f"noise_levels must be [B, T] = {tuple(x.shape[:2])}, got {tuple(noise_levels.shape)}")

    def _backbone(self, x: torch.Tensor, noise_levels: torch.Tensor, external_cond: torch.Tensor,
                  external_cond_mask: torch.Tensor | None, wanted: Sequence[int]
                  ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, ShardedFeatures]]:
        """Output, the requested latents (0-based indices) as ``[BT, C, h, w]`` and, under sequence parallelism
        (training forwards), this rank's token slices of those of them a transformer level computed."""
        self._check(x, noise_levels)
        sp = sequence_parallel() if self.training else None   # sampling / validation: whole clips
        b, frames = x.shape[:2]
        n = self.cfg.num_levels
        dtype = self.embed_input.proj.weight.dtype
        h = self.embed_input(x.to(dtype).flatten(0, 1))
        embs = self._level_embeddings(noise_levels, external_cond.to(dtype), external_cond_mask, h.shape[-2:])
        latents: dict[int, torch.Tensor] = {}
        shards: dict[int, ShardedFeatures] = {}
        keep = set(wanted)

        def kept(index: int, h: torch.Tensor, shard: ShardedFeatures | None) -> None:
            if index in keep:
                latents[index] = h
                if shard is not None:
                    shards[index] = shard

        before, after = [], []
        for level in range(n - 1):
            h, shard = self._run_level(h, embs[level], level, frames, sp=sp)
            kept(level, h, shard)
            before.append(h)
            h = self.down_blocks[level][-1](h)
            after.append(h)
        h, shard = self._run_level(h, embs[-1], n - 1, frames, sp=sp)
        kept(n - 1, h, shard)
        for index, level in enumerate(reversed(range(n - 1)), start=n):
            h = self.up_blocks[n - 2 - level][0](h - after.pop()) + before.pop()
            h, shard = self._run_level(h, embs[level], level, frames, up=True, sp=sp)
            kept(index, h, shard)
        out = self.project_output(h).unflatten(0, (b, frames))
        return out, latents, shards

    # ------------------------------------------------------------------ public calls
    def dfot_forward(self, x: torch.Tensor, noise_levels: torch.Tensor, external_cond: torch.Tensor,
                     external_cond_mask: torch.Tensor | None = None, return_latents: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The official ``UViT3DPose.forward`` (see the module docstring)."""
        if external_cond is None:
            raise ValueError("external_cond (the ray condition [B, T, 180, H, W]) is required")
        wanted = range(self.cfg.num_feature_maps) if return_latents else ()
        out, latents, _ = self._backbone(x, noise_levels, external_cond, external_cond_mask, wanted)
        if not return_latents:
            return out
        b = x.shape[0]
        return out, [latents[i].unflatten(0, (b, -1)) for i in range(self.cfg.num_feature_maps)]

    def forward(self, x: torch.Tensor, noise_levels: torch.Tensor, *, poses16: torch.Tensor | None = None,
                intrinsics: torch.Tensor | None = None, extrinsics: torch.Tensor | None = None,
                drop_cond: torch.Tensor | None = None, return_features: Sequence[int] = ()
                ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """GeoForge's call: cameras as raw ``poses16`` or ``intrinsics`` / ``extrinsics``; ``return_features``
        1-based latent indices -> ``(out, {i: [B, T, h, w, C]})``; under sequence parallelism a transformer level's
        map is this rank's token slice (:class:`~engine.models.sequence_parallel.ShardedFeatures`)."""
        maps = self.cfg.num_feature_maps
        wanted = sorted(set(return_features))
        if any(i < 1 or i > maps for i in wanted):
            raise ValueError(f"return_features: 1-based U-ViT latent indices in [1, {maps}], got {wanted}")
        if poses16 is None:
            if intrinsics is None or extrinsics is None:
                raise ValueError("UViT3D.forward needs the cameras: poses16 [B, T, 16] or intrinsics + extrinsics")
            poses16 = poses16_from_cameras(intrinsics, extrinsics, x.shape[-2], x.shape[-1])
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"x: DFoT's ray condition is defined for square frames, got {tuple(x.shape[-2:])}")
        ray_dtype = torch.promote_types(self.embed_input.proj.weight.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):   # DFoT: rays in float32 (float64 for a float64 model)
            rays = ray_condition(poses16.to(ray_dtype), x.shape[-1])
        out, latents, shards = self._backbone(x, noise_levels, rays, drop_cond, [i - 1 for i in wanted])
        if not wanted:
            return out
        b = x.shape[0]
        return out, {i: shards[i - 1] if i - 1 in shards
                     else latents[i - 1].unflatten(0, (b, -1)).permute(0, 1, 3, 4, 2) for i in wanted}

    def feature_channels(self, index: int) -> int:
        """Channels of the 1-based latent ``index`` (for the GF projector)."""
        n = self.cfg.num_levels
        level = index - 1 if index <= n else 2 * n - 1 - index
        return self.cfg.channels[level]


def num_params(cfg: UViT3DConfig) -> int:
    """Exact parameter count of ``UViT3D(cfg)``, built on the meta device."""
    with torch.device("meta"):
        model = UViT3D(cfg)
    return sum(p.numel() for p in model.parameters())
