"""Geometry Forcing (GF): align one DiT block's tokens with a frozen geometry teacher, token by token.

Per clip, the teacher (VGGT's aggregator, ``engine.teacher``) sees the clean frames as one
multi-view sequence and returns, for each requested aggregator layer, patch tokens on its
``H/14 x W/14`` grid. This module maps them onto the DiT token grid and computes the alignment
losses of ``kernels.align.GeometryAlignment`` (DESIGN §4, the corrected per-token form, not the
original code's token/channel mixing):

- **token grid.** Teacher features ``[B, Tt, h, w, C]`` (``Tt`` = ``teacher.frames`` or all frames)
  -> the DiT grid ``[B, Tt / tp, H', W', C]`` of the same frames (:func:`teacher_to_dit_grid`):
  1. time: a DiT token spans ``tp = temporal_patch_size`` frames, so the teacher features of those
     ``tp`` frames are **averaged** (their mean is the one target of the token);
  2. space: bilinear resize of the ``h x w`` grid to ``H' x W'`` with ``align_corners=False`` - both
     grids tile the same image (the teacher's input is a resize of the whole frame, no crop), so a
     token's centre ``((i + 0.5) / H', (j + 0.5) / W')`` is sampled from the teacher grid at the same
     image position. Downscaling uses the antialiased (wider triangle) bilinear filter. Non-square
     grids are handled per axis. Both steps are linear, so their order does not matter.
- **losses.** For teacher layer ``l``: ``p = f_l(h)`` with the DiT features ``h`` of block
  ``gf.dit_block`` (1-based), ``L_ang,l = mean_tokens(1 - cos(p, y_l))``,
  ``L_scale,l = mean_tokens,channels((g_l(p / |p|) - y_l)^2)`` (one projector ``f_l`` and scale head
  ``g_l`` per layer). Layers are averaged; the objective adds
  ``gf.angular_weight * L_ang + gf.scale_weight * L_scale`` (defaults 0.5 / 0.05) to flow matching.
  Those weights are also the ``loss_weights`` of every ``GeometryAlignment``, so its fused single
  pass (gradients made during the forward) is used.
- **as released** (``gf.alignment_form: as_released``): GF's published form instead of the per-token one
  (``engine.objectives.gf_released``: all tokens of the ``teacher.layers`` resized as images to
  ``released_size``, stacked as channels; ConvProjector; plane-normalised angular sum; scale head), so both
  can be trained side by side; ``angular_weight`` / ``scale_weight`` are GF's ``alignment_coeff`` and
  ``alignment_coeff * unormalize_lambda``.
- **iREPA-style** (``gf.alignment_form: irepa``, ``engine.objectives.gf_irepa``): per teacher layer, a 3x3
  convolution over each frame's token grid instead of the MLP projector, and the target spatially normalised
  (per frame and channel: minus ``gf.irepa_alpha`` x its mean over the frame's tokens, divided by its standard
  deviation over them), as iREPA (Singh et al. 2025, arXiv 2512.10794); the losses stay the angular + scale ones
  above (against the normalised target), the token grid mapping the same.
- **REPA term (optional, "GF + REPA").** A DINOv2 teacher (``teacher.dino``) with its own DiT block,
  projector and weights (``gf.dino``); the same grid mapping.

The teacher is never part of this module: its features arrive in the batch (``teacher.<key>``,
computed live by ``engine.teacher.live`` or read from a cache by ``engine.teacher.reader``), so
it is outside the optimizer, outside ZeRO partitioning and gets no gradient. Logged parts:
``gf_angular``, ``gf_scale`` (layer means, unweighted) and ``dino_angular`` / ``dino_scale``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from geoforge.engine.schema import ConfigError
from geoforge.engine.teacher.spec import BATCH_PREFIX, DINO_KEY
from geoforge.engine.models.sequence_parallel import ShardedFeatures
from geoforge.engine.objectives.gf_irepa import IrepaAlignment, spatial_normalise
from geoforge.engine.objectives.gf_released import RELEASED_KEY, ReleasedAlignment
from geoforge.kernels.align import GeometryAlignment

LOSS_SETS = ("both", "angular", "scale")


@dataclass
class DinoTermConfig:
    """The optional "GF + REPA" alignment term (``gf.dino``): its DiT block, weights and projector.

    The DINOv2 teacher it aligns with is ``teacher.dino`` (:class:`engine.teacher.spec.DinoConfig`);
    both are given or neither.
    """

    MOVED_KEYS = {k: f"teacher.dino.{k}" for k in ("pretrained", "variant", "config", "init_seed", "layer",
                                                   "resolution")}

    dit_block: int = 8
    angular_weight: float = 0.5
    scale_weight: float = 0.0
    projector_hidden: int = 2048
    scale_hidden: int = 512

    def validate(self) -> None:
        if self.dit_block < 1:
            raise ConfigError(f"dit_block: 1-based block index, got {self.dit_block}")
        check_weights(self.angular_weight, self.scale_weight)
        for name in ("projector_hidden", "scale_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")


def check_weights(w_ang: float, w_scale: float) -> None:
    """Alignment weights: finite, >= 0, not both 0 (ConfigError naming the key)."""
    for name, w in (("angular_weight", w_ang), ("scale_weight", w_scale)):
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"{name}: must be a finite number >= 0, got {w}")
    if w_ang == 0 and w_scale == 0:
        raise ConfigError("angular_weight / scale_weight: both 0 (nothing to align)")


@dataclass
class GFConfig:
    """The recipe's ``gf`` section (the Geometry Forcing objective). Disabled by default.

    Ablation switches: ``losses`` (both / angular / scale only), ``dit_block``; the teacher's layers,
    resolution, frames and cache are the ``teacher`` section's (:class:`engine.teacher.spec.TeacherConfig`).
    """

    MOVED_KEYS = {"teacher": "teacher.vggt", "teacher_layers": "teacher.layers",
                  "teacher_resolution": "teacher.resolution", "teacher_frames": "teacher.frames",
                  "teacher_cache": "teacher.cache"}

    enabled: bool = False
    dit_block: int = 8                                  # 1-based DiT block whose output is aligned
    losses: Literal["both", "angular", "scale"] = "both"
    angular_weight: float = 0.5
    scale_weight: float = 0.05
    projector_hidden: int = 2048
    scale_hidden: int = 512
    # the alignment head (projectors, scale heads) frozen at its initialisation, outside the optimizer, as GF's
    # released code leaves it (engine/objectives/video_loss.py); false: trained, as the paper describes
    freeze_projector: bool = False
    chunk_size: int | None = None                       # tokens per chunk of the fused alignment
    dino: DinoTermConfig | None = None                  # the REPA term (its teacher: teacher.dino)
    # per_token: DESIGN §4; as_released: GF's published code; irepa: conv projector + spatially normalised target
    alignment_form: Literal["per_token", "as_released", "irepa"] = "per_token"
    released_size: int = 512                            # as_released: the S x S plane every layer is resized to
    released_mid_channels: int = 128                    # as_released: ConvProjector / scale-head width
    irepa_alpha: float = 1.0                            # irepa: y - alpha * spatial mean (iREPA's code: 0.6 / 0.8)

    def validate(self) -> None:
        if self.dit_block < 1:
            raise ConfigError(f"dit_block: 1-based block index, got {self.dit_block}")
        check_weights(*self.weights())
        for name in ("projector_hidden", "scale_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.released_size < 1 or self.released_mid_channels < 1:
            raise ConfigError(f"released_size / released_mid_channels: must be >= 1, got "
                              f"{self.released_size} / {self.released_mid_channels}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"chunk_size: must be >= 1, got {self.chunk_size}")
        if not 0.0 <= self.irepa_alpha <= 1.0:
            raise ConfigError(f"irepa_alpha: must be in [0, 1], got {self.irepa_alpha}")

    def weights(self) -> tuple[float, float]:
        """(angular, scale) weights after the ``losses`` switch."""
        return (self.angular_weight if self.losses != "scale" else 0.0,
                self.scale_weight if self.losses != "angular" else 0.0)


def check_gf_recipe(recipe: Any) -> None:
    """Cross-section checks of ``recipe.gf`` against the teacher, model and data (called by
    ``Recipe.validate``). Raises ConfigError naming the full key path."""
    gf, teacher = recipe.gf, recipe.teacher
    if not gf.enabled:
        if teacher.cache or teacher.dino is not None or gf.dino is not None:
            raise ConfigError("gf.enabled: false, but teacher.cache / teacher.dino / gf.dino are set; enable gf or "
                             "drop them")
        return
    if (gf.dino is None) != (teacher.dino is None):
        given, missing = ("gf.dino", "teacher.dino") if teacher.dino is None else ("teacher.dino", "gf.dino")
        raise ConfigError(f"{missing}: {given} is set, so the REPA term needs {missing} too (the DINOv2 teacher "
                         f"in teacher.dino, its alignment in gf.dino), or drop {given}")
    if gf.alignment_form == "as_released" and teacher.cache:
        raise ConfigError("teacher.cache: the teacher cache holds per-token features; gf.alignment_form "
                         "as_released needs the live teacher (drop teacher.cache)")
    model = recipe.model
    depth = model.feature_count if hasattr(model, "feature_count") else model.resolved().depth
    blocks = [("gf.dit_block", gf.dit_block)] + ([("gf.dino.dit_block", gf.dino.dit_block)] if gf.dino else [])
    for key, block in blocks:
        if not 1 <= block <= depth:
            raise ConfigError(f"{key}: {block} is not a block of the DiT (1-based, model depth {depth})")
    if teacher.kind == "oracle" and (recipe.data.kind != "synthetic" or teacher.cache or teacher.dino is not None):
        raise ConfigError("teacher.kind: oracle reads the true depth and cameras of synthetic clips: it needs "
                         "data.kind: synthetic and no teacher.cache / teacher.dino")
    if teacher.kind == "random" and (teacher.cache or teacher.dino is not None):
        raise ConfigError("teacher.kind: random (the oracle's control without geometry) computes its features from "
                         "the clip and frame indices: it needs no teacher.cache / teacher.dino")
    frames, tp = recipe.data.frames, recipe.model.temporal_patch_size
    if teacher.frames > frames:
        raise ConfigError(f"teacher.frames: {teacher.frames} > data.frames={frames}")
    if teacher.aligned_frames(frames) % tp:
        raise ConfigError(f"teacher.frames: {teacher.aligned_frames(frames)} frames do not fill whole DiT tokens "
                         f"of model.temporal_patch_size={tp} frames")


# ----------------------------------------------------------------------------- token grid
def teacher_to_dit_grid(target: torch.Tensor, grid_hw: tuple[int, int], temporal_patch: int = 1) -> torch.Tensor:
    """Teacher patch features ``[B, Tt, h, w, C]`` -> the DiT token grid ``[B, Tt / tp, H', W', C]``.

    Frames: the ``tp`` frames a DiT token spans are averaged. Space: bilinear, ``align_corners=False``
    (grids tile the same image), antialiased where the DiT grid is coarser. See the module docstring.
    """
    if target.dim() != 5:
        raise ValueError(f"teacher features must be [B, T, h, w, C], got {tuple(target.shape)}")
    b, frames, h, w, c = target.shape
    if frames % temporal_patch:
        raise ValueError(f"{frames} teacher frames do not fill DiT tokens of {temporal_patch} frames")
    if temporal_patch > 1:
        target = target.unflatten(1, (frames // temporal_patch, temporal_patch)).mean(2)
    height, width = grid_hw
    if (h, w) == (height, width):
        return target
    x = target.flatten(0, 1).permute(0, 3, 1, 2)  # [B*T', C, h, w]
    x = F.interpolate(x.float(), size=(height, width), mode="bilinear", align_corners=False,
                      antialias=height < h or width < w)
    return x.permute(0, 2, 3, 1).unflatten(0, (b, -1)).to(target.dtype)


# ----------------------------------------------------------------------------- the trained head
class _Term(nn.Module):
    """One teacher's alignment: a GeometryAlignment per teacher feature key, losses averaged."""

    def __init__(self, keys: list[str], dims: Mapping[str, int], in_dim: int, hidden: int, scale_hidden: int,
                 weights: tuple[float, float], backend: str, chunk_size: int | None):
        super().__init__()
        self.keys = list(keys)
        self.weights = weights
        self.align = nn.ModuleDict({
            k: GeometryAlignment(in_dim, hidden, dims[k], scale_hidden, backend, loss_weights=weights,
                                 chunk_size=chunk_size) for k in self.keys})

    def forward(self, feats: torch.Tensor, batch: Mapping[str, torch.Tensor], temporal_patch: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weighted loss, mean angular, mean scale) of DiT features ``[B, T', H', W', D]``, or under sequence
        parallelism of this rank's token slice (:class:`ShardedFeatures`, the teacher features sliced the same
        way; the means are over the slice's tokens, see ``engine.models.sequence_parallel``)."""
        if isinstance(feats, ShardedFeatures):
            return self._forward_shard(feats, batch, temporal_patch)
        grid_hw = tuple(feats.shape[2:4])
        angular, scale = [], []
        for k in self.keys:
            name = BATCH_PREFIX + k
            if name not in batch:
                raise KeyError(f"GF: the batch has no teacher features {name!r} (keys: {sorted(batch)}); the train "
                               f"loop adds them from engine.teacher")
            y = teacher_to_dit_grid(batch[name], grid_hw, temporal_patch)
            aligned = y.shape[1]
            if aligned > feats.shape[1]:
                raise ValueError(f"GF: teacher features span {aligned} DiT token frames, the DiT has {feats.shape[1]}")
            x = feats[:, :aligned].reshape(-1, feats.shape[-1])
            out = self.align[k](x, y.reshape(-1, y.shape[-1]).to(x.device))
            angular.append(out["angular"].float())
            scale.append(out["scale"].float())
        ang, sc = torch.stack(angular).mean(), torch.stack(scale).mean()
        return self.weights[0] * ang + self.weights[1] * sc, ang, sc

    def _forward_shard(self, feats: ShardedFeatures, batch: Mapping[str, torch.Tensor], temporal_patch: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = feats.tokens.reshape(-1, feats.tokens.shape[-1])
        angular, scale = [], []
        for k in self.keys:
            y = teacher_to_dit_grid(batch[BATCH_PREFIX + k], feats.grid[1:], temporal_patch)
            if tuple(y.shape[1:4]) != tuple(feats.grid):
                raise ValueError(f"GF with sequence parallelism: teacher features cover {tuple(y.shape[1:4])} tokens, "
                                 f"the DiT {feats.grid} (teacher.frames must be 0)")
            y = feats.local(y)
            out = self.align[k](x, y.reshape(-1, y.shape[-1]).to(x.device))
            angular.append(out["angular"].float())
            scale.append(out["scale"].float())
        ang, sc = torch.stack(angular).mean(), torch.stack(scale).mean()
        return self.weights[0] * ang + self.weights[1] * sc, ang, sc


class _ReleasedTerm(nn.Module):
    """GF's published alignment (``engine.objectives.gf_released``): one ConvProjector for the stacked layers."""

    def __init__(self, gf: GFConfig, dims: Mapping[str, int], in_dim: int):
        super().__init__()
        self.weights = gf.weights()
        self.align = ReleasedAlignment(in_dim, dims[RELEASED_KEY], gf.released_size, gf.released_mid_channels)

    def forward(self, feats: torch.Tensor, batch: Mapping[str, torch.Tensor], temporal_patch: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        name = BATCH_PREFIX + RELEASED_KEY
        if name not in batch:
            raise KeyError(f"GF as_released: the batch has no {name!r} (keys: {sorted(batch)})")
        if temporal_patch != 1:
            raise ValueError("gf.alignment_form as_released: needs one token frame per frame (temporal_patch_size 1)")
        if isinstance(feats, ShardedFeatures):   # sequence parallelism: the whole map on every rank of the group
            feats = feats.gather()
        y = batch[name]
        aligned = y.shape[1]
        latent = feats[:, :aligned].permute(0, 1, 4, 2, 3).flatten(0, 1)   # [B T', C, h, w]
        ang, sc = self.align(latent, y.flatten(0, 1).to(latent.device))
        return self.weights[0] * ang + self.weights[1] * sc, ang.float(), sc.float()


class _IrepaTerm(nn.Module):
    """iREPA-style alignment (``engine.objectives.gf_irepa``): per teacher key, a 3x3 conv projector over each
    frame's token grid and GF's scale head, against the spatially normalised target; layers averaged."""

    def __init__(self, gf: GFConfig, keys: list[str], dims: Mapping[str, int], in_dim: int):
        super().__init__()
        self.keys = list(keys)
        self.weights = gf.weights()
        self.alpha = gf.irepa_alpha
        self.align = nn.ModuleDict({k: IrepaAlignment(in_dim, dims[k], gf.scale_hidden) for k in self.keys})

    def forward(self, feats: torch.Tensor, batch: Mapping[str, torch.Tensor], temporal_patch: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(feats, ShardedFeatures):   # sequence parallelism: the convolution needs whole frames
            feats = feats.gather()
        grid_hw = tuple(feats.shape[2:4])
        angular, scale = [], []
        for k in self.keys:
            name = BATCH_PREFIX + k
            if name not in batch:
                raise KeyError(f"GF irepa: the batch has no teacher features {name!r} (keys: {sorted(batch)})")
            y = teacher_to_dit_grid(batch[name], grid_hw, temporal_patch)
            aligned = y.shape[1]
            if aligned > feats.shape[1]:
                raise ValueError(f"GF: teacher features span {aligned} DiT token frames, the DiT has {feats.shape[1]}")
            target = spatial_normalise(y.flatten(0, 1), self.alpha).to(feats.device)
            ang, sc = self.align[k](feats[:, :aligned].flatten(0, 1), target)
            angular.append(ang.float())
            scale.append(sc.float())
        ang, sc = torch.stack(angular).mean(), torch.stack(scale).mean()
        return self.weights[0] * ang + self.weights[1] * sc, ang, sc


class GeometryForcingHead(nn.Module):
    """The trained part of GF: projectors + scale heads (one per teacher layer, one for DINO).

    ``dims``: channels of each teacher feature key (the teacher's or the cache's ``dims``, in the
    teacher's order): one projector per VGGT key, and the DINO term when ``gf.dino`` is set;
    ``hidden_dim``: the width of the aligned features (the DiT width, or the U-ViT map's channels);
    ``dino_dim``: that of ``gf.dino.dit_block``'s features when they differ (U-ViT levels; default
    ``hidden_dim``); ``temporal_patch``: the DiT's temporal patch size.
    ``forward(features, batch)`` takes the DiT's ``{block: [B, T', H', W', D]}`` and returns
    ``{"loss": weighted sum, "gf_angular", "gf_scale"[, "dino_angular", "dino_scale"]}``.
    """

    def __init__(self, gf: GFConfig, dims: Mapping[str, int], hidden_dim: int, temporal_patch: int = 1,
                 backend: str = "auto", dino_dim: int | None = None):
        super().__init__()
        vggt_keys = [k for k in dims if k != DINO_KEY]
        if not vggt_keys:
            raise ValueError(f"GF: the teacher provides no VGGT features (keys {sorted(dims)})")
        if (gf.dino is not None) != (DINO_KEY in dims):
            raise ValueError(f"GF: gf.dino is {'set' if gf.dino is not None else 'not set'}, the teacher provides "
                             f"{'' if DINO_KEY in dims else 'no '}DINO features (keys {sorted(dims)}); set both "
                             f"teacher.dino and gf.dino, or neither")
        self.dit_block = gf.dit_block
        self.temporal_patch = temporal_patch
        if gf.alignment_form == "as_released":
            self.vggt = _ReleasedTerm(gf, dims, hidden_dim)
        elif gf.alignment_form == "irepa":
            self.vggt = _IrepaTerm(gf, vggt_keys, dims, hidden_dim)
        else:
            self.vggt = _Term(vggt_keys, dims, hidden_dim, gf.projector_hidden, gf.scale_hidden, gf.weights(),
                              backend, gf.chunk_size)
        self.dino = None
        self.dino_block = None
        if gf.dino is not None:
            d = gf.dino
            self.dino_block = d.dit_block
            self.dino = _Term([DINO_KEY], dims, dino_dim or hidden_dim, d.projector_hidden, d.scale_hidden,
                              (d.angular_weight, d.scale_weight), backend, gf.chunk_size)

    @property
    def dit_blocks(self) -> tuple[int, ...]:
        """DiT blocks whose features the head reads (for ``return_features``)."""
        return tuple(sorted({self.dit_block} | ({self.dino_block} if self.dino is not None else set())))

    def forward(self, features: Mapping[int, torch.Tensor], batch: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        loss, ang, sc = self.vggt(features[self.dit_block], batch, self.temporal_patch)
        parts = {"loss": loss, "gf_angular": ang.detach(), "gf_scale": sc.detach()}
        if self.dino is not None:
            d_loss, d_ang, d_sc = self.dino(features[self.dino_block], batch, self.temporal_patch)
            parts["loss"] = loss + d_loss
            parts["dino_angular"], parts["dino_scale"] = d_ang.detach(), d_sc.detach()
        return parts


def alignment_snapshot(head: GeometryForcingHead, features: Mapping[int, torch.Tensor],
                       batch: Mapping[str, torch.Tensor], parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything needed to recompute one batch's GF losses independently, as plain tensors (for
    safetensors): ``dit_block_<i>`` (the DiT features the head read), the teacher features
    (``teacher.<key>``), the head's parameters (``head.<name>``) and the logged parts (``part.<name>``)."""
    out = {f"dit_block_{i}": features[i].detach() for i in head.dit_blocks}
    out.update({k: v.detach() for k, v in batch.items() if k.startswith(BATCH_PREFIX)})
    out.update({f"head.{n}": p.detach() for n, p in head.named_parameters()})
    out.update({f"part.{k}": v.detach().reshape(()) for k, v in parts.items()})
    return {k: v.float().contiguous().cpu() for k, v in out.items()}


__all__ = ["alignment_snapshot", "GFConfig", "DinoTermConfig", "GeometryForcingHead", "teacher_to_dit_grid",
           "check_gf_recipe", "check_weights"]
