"""Geometry Forcing (GF): align one DiT block's tokens with a frozen geometry teacher, token by token.

Per clip, the teacher (VGGT's aggregator, ``engine.models.teacher``) sees the clean frames as one
multi-view sequence and returns, for each requested aggregator layer, patch tokens on its
``H/14 x W/14`` grid. This module maps them onto the DiT token grid and computes the alignment
losses of ``kernels.align.GeometryAlignment`` (DESIGN §4, the corrected per-token form, not the
original code's token/channel mixing):

- **token grid.** Teacher features ``[B, Tt, h, w, C]`` (``Tt`` = ``gf.teacher_frames`` or all frames)
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
- **REPA term (optional, "GF + REPA").** A DINOv2 teacher (``gf.dino``), its own DiT block, projector
  and weights; the same grid mapping.

The teacher is never part of this module: its features arrive in the batch (``teacher.<key>``,
computed live by ``engine.models.teacher`` or read from a cache by ``engine.data.cache_teacher``), so
it is outside the optimizer, outside ZeRO partitioning and gets no gradient. Logged parts:
``gf_angular``, ``gf_scale`` (layer means, unweighted) and ``dino_angular`` / ``dino_scale``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kernels.align import GeometryAlignment

PATCH = 14                      # VGGT / DINOv2 patch size: teacher resolutions are multiples of it
BATCH_PREFIX = "teacher."       # batch keys of teacher features: "teacher.vggt_L4", "teacher.dino"
LOSS_SETS = ("both", "angular", "scale")


def vggt_key(layer: int) -> str:
    """Feature key of VGGT aggregator output ``layer`` (0-based; negatives as given)."""
    return f"vggt_L{layer}" if layer >= 0 else f"vggt_Lm{-layer}"


DINO_KEY = "dino"


@dataclass
class TeacherSource:
    """Where the VGGT teacher comes from: pretrained weights, or a random init from a config.

    ``kind: oracle`` replaces VGGT by features of the data's true depth and cameras (synthetic data only).
    ``pretrained``: a hub id (``facebook/VGGT-1B``), a local directory or weights file; None builds a
    random VGGT from ``config`` (``engine/models/vggt/config.py`` format) with ``init_seed`` - tiny CPU
    recipes and tests. With ``pretrained`` set, ``config`` (if given) overrides the checkpoint's.
    """

    kind: Literal["vggt", "oracle"] = "vggt"   # oracle: features of the true geometry (engine/objectives/oracle_teacher.py)
    pretrained: str | None = "facebook/VGGT-1B"
    config: dict[str, Any] | None = None
    init_seed: int = 0
    local_files_only: bool = False
    oracle_freqs: int = 4                       # oracle: Fourier frequencies of the world coordinates and log depth

    def validate(self) -> None:
        if self.oracle_freqs < 0:
            raise ValueError(f"gf.teacher.oracle_freqs: must be >= 0, got {self.oracle_freqs}")
        if self.kind == "vggt" and self.pretrained is None and self.config is None:
            raise ValueError("gf.teacher: give pretrained (hub id or local path) or config (random init)")


@dataclass
class DinoConfig:
    """The optional semantic teacher of the "GF + REPA" row: DINOv2 (with registers), REPA-style.

    ``pretrained``: an official DINOv2 weights file (e.g. ``dinov2_vitb14_reg4_pretrain.pth`` from the
    DINOv2 release, or a safetensors copy of it), loaded strictly; None: random init (tiny recipes).
    ``variant``: one of ``engine.models.vggt.DINOV2_VARIANTS``; ``config``: ``DinoVisionTransformer``
    keyword overrides (e.g. a tiny ``embed_dim``/``depth``). ``layer``: 0-based block whose output,
    after the final LayerNorm, is the target (-1: the last block = ``x_norm_patchtokens``, as REPA).
    ``resolution``: teacher input width (multiple of 14; height by aspect ratio), REPA: 224.
    """

    pretrained: str | None = None
    variant: str = "dinov2_vitb14_reg"
    config: dict[str, Any] | None = None
    init_seed: int = 0
    layer: int = -1
    resolution: int = 224
    dit_block: int = 8
    angular_weight: float = 0.5
    scale_weight: float = 0.0
    projector_hidden: int = 2048
    scale_hidden: int = 512

    def validate(self) -> None:
        if self.resolution < PATCH or self.resolution % PATCH:
            raise ValueError(f"gf.dino.resolution: must be a positive multiple of {PATCH}, got {self.resolution}")
        if self.dit_block < 1:
            raise ValueError(f"gf.dino.dit_block: 1-based block index, got {self.dit_block}")
        _check_weights(self.angular_weight, self.scale_weight, "gf.dino")
        for name in ("projector_hidden", "scale_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"gf.dino.{name}: must be >= 1, got {getattr(self, name)}")


def _check_weights(w_ang: float, w_scale: float, where: str) -> None:
    for name, w in (("angular_weight", w_ang), ("scale_weight", w_scale)):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"{where}.{name}: must be a finite number >= 0, got {w}")
    if w_ang == 0 and w_scale == 0:
        raise ValueError(f"{where}: angular_weight and scale_weight are both 0 (nothing to align)")


@dataclass
class GFConfig:
    """The recipe's ``gf`` section (Geometry Forcing). Disabled by default.

    Ablation switches: ``losses`` (both / angular / scale only), ``dit_block``, ``teacher_layers``,
    ``teacher_resolution``, ``teacher_frames``. ``teacher_cache``: a directory written by
    ``python -m engine.data.cache_teacher`` whose features replace the live teacher.
    """

    enabled: bool = False
    dit_block: int = 8                                  # 1-based DiT block whose output is aligned
    teacher: TeacherSource = field(default_factory=TeacherSource)
    teacher_layers: list[int] = field(default_factory=lambda: [4, 11, 17, 23])  # 0-based aggregator outputs
    teacher_resolution: int = 518                       # teacher input width (multiple of 14)
    teacher_frames: int = 0                             # align the first N frames only; 0: all
    losses: Literal["both", "angular", "scale"] = "both"
    angular_weight: float = 0.5
    scale_weight: float = 0.05
    projector_hidden: int = 2048
    scale_hidden: int = 512
    chunk_size: int | None = None                       # tokens per chunk of the fused alignment
    teacher_cache: str | None = None
    dino: DinoConfig | None = None

    def validate(self) -> None:
        if self.dit_block < 1:
            raise ValueError(f"gf.dit_block: 1-based block index, got {self.dit_block}")
        if not self.teacher_layers:
            raise ValueError("gf.teacher_layers: name at least one aggregator layer")
        if len(set(self.teacher_layers)) != len(self.teacher_layers):
            raise ValueError(f"gf.teacher_layers: duplicates in {self.teacher_layers}")
        if self.teacher_resolution < PATCH or self.teacher_resolution % PATCH:
            raise ValueError(f"gf.teacher_resolution: must be a positive multiple of {PATCH}, "
                             f"got {self.teacher_resolution}")
        if self.teacher_frames < 0:
            raise ValueError(f"gf.teacher_frames: must be >= 0 (0 = all frames), got {self.teacher_frames}")
        _check_weights(*self.weights(), "gf")
        for name in ("projector_hidden", "scale_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"gf.{name}: must be >= 1, got {getattr(self, name)}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"gf.chunk_size: must be >= 1, got {self.chunk_size}")

    def weights(self) -> tuple[float, float]:
        """(angular, scale) weights after the ``losses`` switch."""
        return (self.angular_weight if self.losses != "scale" else 0.0,
                self.scale_weight if self.losses != "angular" else 0.0)

    def feature_keys(self) -> list[str]:
        """Teacher feature keys this recipe aligns (VGGT layers, then DINO)."""
        return [vggt_key(layer) for layer in self.teacher_layers] + ([DINO_KEY] if self.dino else [])

    def aligned_frames(self, frames: int) -> int:
        return self.teacher_frames or frames


def check_gf_recipe(recipe: Any) -> None:
    """Cross-section checks of ``recipe.gf`` against the model and data (called by ``Recipe.validate``).

    Raises ValueError naming the key."""
    gf = recipe.gf
    if not gf.enabled:
        if gf.teacher_cache or gf.dino is not None:
            raise ValueError("gf.enabled: false, but gf.teacher_cache / gf.dino are set; enable gf or drop them")
        return
    depth = recipe.model.resolved().depth
    blocks = [("gf.dit_block", gf.dit_block)] + ([("gf.dino.dit_block", gf.dino.dit_block)] if gf.dino else [])
    for key, block in blocks:
        if not 1 <= block <= depth:
            raise ValueError(f"{key}: {block} is not a block of the DiT (1-based, model depth {depth})")
    if gf.teacher.kind == "oracle" and (recipe.data.kind != "synthetic" or gf.teacher_cache or gf.dino is not None):
        raise ValueError("gf.teacher.kind: oracle reads the true depth and cameras of synthetic clips: it needs "
                         "data.kind: synthetic and no gf.teacher_cache / gf.dino")
    frames, tp = recipe.data.frames, recipe.model.temporal_patch_size
    if gf.teacher_frames > frames:
        raise ValueError(f"gf.teacher_frames: {gf.teacher_frames} > data.frames={frames}")
    if gf.aligned_frames(frames) % tp:
        raise ValueError(f"gf.teacher_frames: {gf.aligned_frames(frames)} frames do not fill whole DiT tokens "
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
        """(weighted loss, mean angular, mean scale) of DiT features ``[B, T', H', W', D]``."""
        grid_hw = tuple(feats.shape[2:4])
        angular, scale = [], []
        for k in self.keys:
            name = BATCH_PREFIX + k
            if name not in batch:
                raise KeyError(f"GF: the batch has no teacher features {name!r} (keys: {sorted(batch)}); the train "
                               f"loop adds them from engine.models.teacher")
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


class GeometryForcingHead(nn.Module):
    """The trained part of GF: projectors + scale heads (one per teacher layer, one for DINO).

    ``dims``: channels of each teacher feature key (from the teacher or the cache manifest);
    ``hidden_dim``: the DiT width; ``temporal_patch``: the DiT's temporal patch size.
    ``forward(features, batch)`` takes the DiT's ``{block: [B, T', H', W', D]}`` and returns
    ``{"loss": weighted sum, "gf_angular", "gf_scale"[, "dino_angular", "dino_scale"]}``.
    """

    def __init__(self, gf: GFConfig, dims: Mapping[str, int], hidden_dim: int, temporal_patch: int = 1,
                 backend: str = "auto"):
        super().__init__()
        missing = [k for k in gf.feature_keys() if k not in dims]
        if missing:
            raise ValueError(f"GF: no teacher feature size for {missing} (teacher provides {sorted(dims)})")
        self.dit_block = gf.dit_block
        self.temporal_patch = temporal_patch
        self.vggt = _Term([vggt_key(layer) for layer in gf.teacher_layers], dims, hidden_dim, gf.projector_hidden,
                          gf.scale_hidden, gf.weights(), backend, gf.chunk_size)
        self.dino = None
        self.dino_block = None
        if gf.dino is not None:
            d = gf.dino
            self.dino_block = d.dit_block
            self.dino = _Term([DINO_KEY], dims, hidden_dim, d.projector_hidden, d.scale_hidden,
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


__all__ = ["alignment_snapshot", "GFConfig", "TeacherSource", "DinoConfig", "GeometryForcingHead", "teacher_to_dit_grid",
           "check_gf_recipe", "vggt_key", "DINO_KEY", "BATCH_PREFIX", "PATCH"]
