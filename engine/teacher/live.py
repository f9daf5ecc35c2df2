"""The live GF teacher: frozen VGGT (+ DINOv2) run on a batch's clean frames, from the ``teacher`` section.

:class:`LiveTeacher` holds VGGT (and optionally DINOv2) frozen - eval mode, ``requires_grad=False``,
run under ``torch.inference_mode`` (VGGT's ``aggregator_features``) / ``torch.no_grad``, under the
process precision's autocast (``engine.precision``) - and is deliberately *not* an ``nn.Module`` attribute of the trained module: the train loop
calls it on each micro-batch and puts its features into the batch (``teacher.<key>``), so the teacher
is outside the optimizer, outside ZeRO partitioning and never receives a gradient.
``engine.teacher.builder.build_teacher`` returns it, or the cache reader of ``engine.teacher.reader``
when ``teacher.cache`` is set (same call, same outputs up to bf16).

Teacher inputs: the clean frames in [0, 1]; only the first ``teacher.frames`` frames (0: all).
VGGT sees each clip's frames as one multi-view sequence, resized bilinearly (antialiased when
shrinking) to width ``teacher.resolution`` and the height of the frame's aspect ratio, both
multiples of 14 (:func:`engine.teacher.spec.teacher_size`; square frames -> square inputs). Output per
requested aggregator layer (``teacher.layers``): patch tokens only (the ``patch_start_idx``
camera/register tokens dropped) on their ``H/14 x W/14`` grid, ``[B, Tt, h, w, 2C]`` float32. DINOv2
sees each frame alone (bicubic resize to ``teacher.dino.resolution``, ImageNet normalisation) and
returns the LayerNorm-ed patch tokens of block ``teacher.dino.layer``.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from geoforge.engine.models.vggt import VGGT, DINOV2_VARIANTS, DinoVisionTransformer, patch_token_grid, resize_for_vggt
from geoforge.engine.objectives.gf_released import RELEASED_KEY, released_target
from geoforge.engine.precision import autocast
from geoforge.engine.weights import load_into, read_state_dict
from geoforge.engine.teacher.spec import BATCH_PREFIX, DINO_KEY, PATCH, DinoConfig, TeacherConfig, TeacherSource, teacher_size, vggt_key

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEADS = ("camera_head", "depth_head", "point_head", "track_head")


def _freeze(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model


def build_vggt(src: TeacherSource, device: torch.device | str = "cpu") -> VGGT:
    """The frozen VGGT teacher (aggregator only: the heads are dropped to save memory)."""
    if src.pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(src.init_seed)
            cfg = dict(src.config or {})
            for head in HEADS:   # random heads are never used: do not build them
                cfg.setdefault(head, None)
            model = VGGT.from_config(cfg)
    else:
        model = VGGT.from_pretrained(src.pretrained, src.config, local_files_only=src.local_files_only)
    for head in HEADS:
        setattr(model, head, None)
    return _freeze(model, device)


def build_dino(cfg: DinoConfig, device: torch.device | str = "cpu") -> DinoVisionTransformer:
    """The frozen DINOv2 teacher: ``variant`` sizes, official hub flags for ``*_reg`` models, ``config``
    overrides; strict load of ``pretrained`` (official DINOv2 state dict) when given."""
    if cfg.variant not in DINOV2_VARIANTS:
        raise ValueError(f"teacher.dino.variant: must be one of {sorted(DINOV2_VARIANTS)}, got {cfg.variant!r}")
    dim, depth, heads = DINOV2_VARIANTS[cfg.variant]
    kwargs: dict[str, Any] = dict(img_size=518, patch_size=PATCH, embed_dim=dim, depth=depth, num_heads=heads,
                                  init_values=1.0, num_register_tokens=4, interpolate_antialias=True,
                                  interpolate_offset=0.0)
    kwargs.update(cfg.config or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        try:
            model = DinoVisionTransformer(**kwargs)
        except TypeError as err:
            raise ValueError(f"teacher.dino.config: {err}") from err
    if not -len(model.blocks) <= cfg.layer < len(model.blocks):
        raise ValueError(f"teacher.dino.layer: {cfg.layer} is not a block of a {len(model.blocks)}-block DINOv2")
    if cfg.pretrained is not None:
        path = Path(cfg.pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"teacher.dino.pretrained: no file {path} (an official DINOv2 state dict, e.g. "
                                    f"dinov2_vitb14_reg4_pretrain.pth)")
        load_into(model, read_state_dict(path), source=f"teacher.dino.pretrained {path}", what=cfg.variant)
    return _freeze(model, device)


def dino_patch_features(vit: DinoVisionTransformer, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """LayerNorm-ed patch tokens of block ``layer`` for ``images [N, 3, H, W]`` in [0, 1]: ``[N, h, w, C]``.

    Normalises with the ImageNet mean/std (as DINOv2 was trained); stops after block ``layer``."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = vit.prepare_tokens((images - mean) / std)
    last = layer % len(vit.blocks)
    for blk in vit.blocks[:last + 1]:
        x = blk(x)
    patches = vit.norm(x)[:, 1 + vit.num_register_tokens:]
    h, w = images.shape[-2] // vit.patch_size, images.shape[-1] // vit.patch_size
    return patches.unflatten(1, (h, w))


class LiveTeacher:
    """Frozen VGGT (+ DINOv2) computing GF targets from a batch's clean frames. Not an nn.Module."""

    def __init__(self, teacher: TeacherConfig, device: torch.device | str = "cpu", released_size: int | None = None):
        """``released_size``: produce GF's published target instead (``gf.alignment_form: as_released``):
        ``vggt_released [B, Tt, L, S, S]``, all tokens of each layer resized as an S x S image
        (``engine.objectives.gf_released``)."""
        self.cfg = teacher
        self.released_size = released_size
        self.device = torch.device(device)
        self.vggt = build_vggt(teacher.vggt, self.device)
        self.dino = build_dino(teacher.dino, self.device) if teacher.dino is not None else None
        for layer in teacher.layers:
            depth = self.vggt.aggregator.depth
            if not -depth <= layer < depth:
                raise ValueError(f"teacher.layers: {layer} is not an output of the {depth}-layer VGGT aggregator")
        width = 2 * self.vggt.aggregator.camera_token.shape[-1]
        self.dims = ({RELEASED_KEY: len(teacher.layers)} if released_size is not None
                     else {vggt_key(layer): width for layer in teacher.layers})
        if self.dino is not None:
            self.dims[DINO_KEY] = self.dino.embed_dim

    @torch.no_grad()
    def features(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """``frames [B, T, 3, H, W]`` in [0, 1] -> ``{key: [B, Tt, h, w, C] float32}`` (Tt: teacher frames)."""
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"teacher: frames must be [B, T, 3, H, W], got {tuple(frames.shape)}")
        cfg = self.cfg
        frames = frames[:, :cfg.aligned_frames(frames.shape[1])].to(self.device, torch.float32)
        b, t, _, height, width = frames.shape
        size = teacher_size(height, width, cfg.resolution)
        images = resize_for_vggt(frames, size)
        # inference mode inside; the clones below are ordinary tensors a loss may save for backward
        tokens = self.vggt.aggregator_features(images, cfg.layers)
        if self.released_size is not None:   # GF's published target: every layer's tokens as an image, stacked
            out = {RELEASED_KEY: released_target([tokens[layer] for layer in cfg.layers], self.released_size)}
        else:
            grid = self.vggt.patch_grid(size)
            start = self.vggt.patch_start_idx
            out = {vggt_key(layer): patch_token_grid(tokens[layer], start, grid).float().clone(
                memory_format=torch.contiguous_format) for layer in cfg.layers}
        if self.dino is not None:
            d = cfg.dino
            dsize = teacher_size(height, width, d.resolution)
            flat = frames.flatten(0, 1)
            if tuple(flat.shape[-2:]) != dsize:
                flat = F.interpolate(flat, size=dsize, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            with autocast(self.device):
                feats = dino_patch_features(self.dino, flat, d.layer)
            out[DINO_KEY] = feats.float().unflatten(0, (b, t)).contiguous()
        return out

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The teacher entries to add to a training batch: ``{"teacher.<key>": features}``."""
        return {BATCH_PREFIX + k: v for k, v in self.features(batch["frames"]).items()}


__all__ = ["LiveTeacher", "build_vggt", "build_dino", "dino_patch_features", "IMAGENET_MEAN", "IMAGENET_STD"]
